"""Data: sources of `Example`s (registry by scheme), the tokenizer's chat rendering, packing.

`data.source` is `SCHEME:REST`: `tfds:NAME` (the embedded `moejax_tasks`, generated on first use, or
any TFDS dataset already in the data dir) or `jsonl:PATH` (ShareGPT, messages, Alpaca or text lines).
A JSONL file has no splits: its last `holdout` examples (5%, at most 1,000) are the `validation` and
`test` split, the rest is `train`.
"""
from __future__ import annotations

import functools
from typing import Callable, Protocol

from moejax.config import DataConfig
from moejax.data.example import Example
from moejax.errors import UserError
from moejax.registry import Registry

SPLITS = ("train", "validation", "test")


class Source(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Example: ...


class Slice:
    """A contiguous view [start, stop) of a source."""

    def __init__(self, source: Source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.source[self.start + i]


SourceOpener = Callable[[str, str, DataConfig], Source]
SOURCES: Registry[SourceOpener] = Registry("data source scheme")


@SOURCES.register("tfds")
def _open_tfds(rest: str, split: str, cfg: DataConfig) -> Source:
    from moejax.data import tasks
    return tasks.tfds_source(rest, split, cfg.tfds_dir or None)


def holdout_size(n: int) -> int:
    return min(1000, max(1, n // 20)) if n > 1 else 0


@functools.lru_cache(maxsize=8)
def _jsonl(path: str, fmt: str, skip_bad_lines: bool):
    """One indexed (and validated) source per file, shared by its splits."""
    from moejax.data.formats import JsonlSource
    return JsonlSource(path, format=fmt, skip_bad_lines=skip_bad_lines)


@SOURCES.register("jsonl")
def _open_jsonl(rest: str, split: str, cfg: DataConfig) -> Source:
    src = _jsonl(rest, cfg.format, cfg.skip_bad_lines)
    cut = len(src) - holdout_size(len(src))
    return Slice(src, 0, cut) if split == "train" else Slice(src, cut, len(src))


def open_source(spec: str, split: str, cfg: DataConfig) -> Source:
    """Open `spec` (e.g. `tfds:moejax_tasks`, `jsonl:data/chat.jsonl`) at `split`."""
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise UserError(f"data.source = {spec!r} must look like SCHEME:REST with SCHEME one of "
                        f"{', '.join(SOURCES.names())}")
    if scheme not in SOURCES:
        raise UserError(f"data.source = {spec!r}: unknown scheme {scheme!r}; allowed: "
                        f"{', '.join(SOURCES.names())}")
    if split not in SPLITS:
        raise UserError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    src = SOURCES.get(scheme)(rest, split, cfg)
    if len(src) == 0:
        raise UserError(f"data.source = {spec!r} has no examples in split {split!r}")
    return src


__all__ = ["Example", "Source", "open_source", "SOURCES", "SPLITS", "Slice"]
