"""Data, flowing one way: source (records, `sources`: jsonl / json / parquet / hf / tfds) ->
conversation (`formats` -> `example.Example`) -> tokenizer + chat template (`chat`) -> packing
(`packing`) -> batches (`pipeline`). No module here imports one later in that flow, and none
imports `moejax.data` itself, so the package can be imported from anywhere.
"""
from __future__ import annotations

from moejax.data.example import Example
from moejax.data.sources import SOURCES, SPLITS, Slice, Source, holdout_size, open_source

__all__ = ["Example", "Source", "open_source", "SOURCES", "SPLITS", "Slice", "holdout_size"]
