"""Compress MoE models for serving: expert pruning (`prune`), MC-SMoE merging (`merge`), task-level
sub-network extraction (`extract`), and dense-model merging / mixing (`mix`). Each module holds pure
functions on parameter dicts; `python -m moejax.compress` (and `python -m moejax.convert mix |
merge-dense`) run them on run directories and write new ones (docs/compression.md)."""
