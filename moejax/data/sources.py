"""Data sources: `data.source = SCHEME:REST` -> a random-access sequence of `Example`s (one registry).

  tfds:NAME             the embedded `moejax_tasks` (generated on first use) or a TFDS dataset on disk
  jsonl:PATH            one JSON record per line
  json:PATH             one JSON array of records (e.g. OpenHermes-2.5's openhermes2_5.json)
  parquet:PATH_OR_GLOB  Parquet files, through pyarrow
  hf:ORG/NAME           a dataset in the local Hugging Face hub cache (parquet, jsonl or json files)

Every file source detects the record format (ShareGPT, OpenAI messages, Alpaca, text) the same way
(`moejax.data.formats`). Files have no splits: the last `holdout_size` examples (5%, at most 1,000)
are the `validation` and `test` split, the rest is `train`.
"""
from __future__ import annotations

import functools
from typing import Callable, Protocol, Sequence

import numpy as np

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


class Concat:
    """Several sources one after the other (the files of one dataset)."""

    def __init__(self, sources: Sequence[Source]):
        self.sources = list(sources)
        self._starts = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.sources[k][i - int(self._starts[k])]


SourceOpener = Callable[[str, DataConfig], Source]
SOURCES: Registry[SourceOpener] = Registry("data source scheme")


def holdout_size(n: int) -> int:
    return min(1000, max(1, n // 20)) if n > 1 else 0


@functools.lru_cache(maxsize=8)
def _file(kind: str, path: str, fmt: str, skip_bad: bool, cache_dir: str) -> Source:
    """One indexed (and validated) source per file, shared by its splits."""
    if kind == "jsonl":
        from moejax.data.jsonl import JsonlSource
        return JsonlSource(path, format=fmt, skip_bad_lines=skip_bad)
    if kind == "json":
        from moejax.data.json_array import JsonArraySource
        return JsonArraySource(path, format=fmt, skip_bad_lines=skip_bad, cache_dir=cache_dir)
    from moejax.data.parquet import ParquetSource
    return ParquetSource(path, format=fmt, skip_bad_lines=skip_bad, cache_dir=cache_dir)


def _opener(kind: str) -> SourceOpener:
    def open_whole(rest: str, cfg: DataConfig) -> Source:
        return _file(kind, rest, cfg.format, cfg.skip_bad_lines, cfg.cache_dir)
    return open_whole


for _kind in ("jsonl", "json", "parquet"):
    SOURCES.register(_kind)(_opener(_kind))


@SOURCES.register("hf")
def _open_hub(rest: str, cfg: DataConfig) -> Source:
    from moejax.data.hub import data_files

    kind, files = data_files(rest)
    if kind == "parquet":  # one source over all files: row groups of every file, one index
        return _file("parquet", files[0] if len(files) == 1 else _as_glob(files), cfg.format,
                     cfg.skip_bad_lines, cfg.cache_dir)
    parts = [_file(kind, p, cfg.format, cfg.skip_bad_lines, cfg.cache_dir) for p in files]
    return parts[0] if len(parts) == 1 else Concat(parts)


def _as_glob(files: list[str]) -> str:
    import os
    directory = os.path.commonpath(files)
    return os.path.join(directory, "**", "*train*.parquet") if all(
        "train" in os.path.relpath(p, directory).lower() for p in files) else \
        os.path.join(directory, "**", "*.parquet")


def open_split(whole: Source, split: str) -> Source:
    cut = len(whole) - holdout_size(len(whole))
    return Slice(whole, 0, cut) if split == "train" else Slice(whole, cut, len(whole))


def open_source(spec: str, split: str, cfg: DataConfig) -> Source:
    """Open `spec` (e.g. `tfds:moejax_tasks`, `json:data/openhermes2_5.json`) at `split`."""
    scheme, sep, rest = spec.partition(":")
    allowed = ", ".join(["tfds", *SOURCES.names()])
    if not sep or not rest:
        raise UserError(f"data.source = {spec!r} must look like SCHEME:REST with SCHEME one of {allowed}")
    if scheme != "tfds" and scheme not in SOURCES:
        raise UserError(f"data.source = {spec!r}: unknown scheme {scheme!r}; allowed: {allowed}")
    if split not in SPLITS:
        raise UserError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if scheme == "tfds":  # TFDS datasets carry their own splits
        import moejax.data.tasks as tasks
        src = tasks.tfds_source(rest, split, cfg.tfds_dir or None)
    else:
        src = open_split(SOURCES.get(scheme)(rest, cfg), split)
    if len(src) == 0:
        raise UserError(f"data.source = {spec!r} has no examples in split {split!r}")
    return src
