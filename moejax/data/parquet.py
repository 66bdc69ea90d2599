"""`parquet:PATH_OR_GLOB`: Parquet files (e.g. a Hugging Face dataset's `data/train-*.parquet`) as one
random-access source of `Example`s, through pyarrow.

Opening reads only the files' footers for the columns and row counts, then checks every record's
format once, one row group at a time, reading only the columns the format needs; the good rows are
cached (`moejax.data.index_cache`). `source[i]` reads the row group holding row i (those columns
only) and keeps the last few decoded, so nearby rows cost one read.
"""
from __future__ import annotations

import glob
import os
import sys
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

import moejax.data.index_cache as index_cache
from moejax.data.example import Example
from moejax.data.formats import Validator, check_format, parse_record, signature_keys
from moejax.errors import UserError

OPTIONAL_COLUMNS = ("domain", "input")  # read when present: Example.domain, Alpaca's input
_CACHED_GROUPS = 4


def expand(spec: str) -> list[str]:
    """The files of PATH_OR_GLOB (a file, a directory of *.parquet, or a glob), sorted."""
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "**", "*.parquet"), recursive=True))
    elif any(c in spec for c in "*?["):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    else:
        paths = [spec] if os.path.isfile(spec) else []
    if not paths:
        raise UserError(f"data file {spec!r} does not exist (parquet: takes a file, a directory or "
                        "a glob of .parquet files)")
    return paths


def _columns_for(path: str, names: list[str], fmt: str) -> tuple[str, list[str]]:
    """The format (detected from the schema when `auto`) and the columns to read."""
    sigs = signature_keys()
    if fmt == "auto":
        match = [name for keys, name in sigs if all(k in names for k in keys)]
        if not match:
            expected = "; ".join(f"{'+'.join(keys)} ({name})" for keys, name in sigs)
            raise UserError(f"{path}: the parquet columns {names} have none of the expected ones: "
                            f"{expected}")
        fmt = match[0]
    keys = next(keys for keys, name in sigs if name == fmt)
    missing = [k for k in keys if k not in names]
    if missing:
        raise UserError(f"{path}: the parquet file has no column {missing[0]!r}, which data.format "
                        f"{fmt!r} needs; its columns: {names}")
    return fmt, [*keys, *(c for c in OPTIONAL_COLUMNS if c in names and c not in keys)]


class ParquetSource:
    def __init__(self, spec: str, format: str = "auto", skip_bad_lines: bool = False,
                 cache_dir: str = ""):
        import pyarrow.parquet as pq

        check_format(format)
        self.spec = spec
        self.paths = expand(spec)
        self.format = format
        self._columns: list[str] = []
        groups = []  # (file index, row group, rows)
        for f, path in enumerate(self.paths):
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a non-parquet file
                raise UserError(f"{path}: not a readable parquet file ({e})") from None
            names = meta.schema.to_arrow_schema().names
            fmt, columns = _columns_for(path, names, self.format)
            if self.format != "auto" and fmt != self.format:
                raise UserError(f"{path}: its columns are {fmt} but {self.paths[0]} is {self.format}")
            self.format = fmt
            self._columns = columns if not self._columns else [c for c in self._columns if c in columns]
            groups += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        self._groups = groups
        self._starts = np.cumsum([0] + [n for _, _, n in groups])
        self._files: dict[int, Any] = {}
        self._cache: OrderedDict[int, list[dict]] = OrderedDict()
        self._lock = threading.Lock()
        options = {"format": self.format, "skip_bad": skip_bad_lines, "columns": self._columns}
        cached = index_cache.load("parquet", self.paths, options, cache_dir)
        if cached is not None:
            self._rows = cached[0]["rows"]
            self.skipped, self.skip_summary = cached[1]["skipped"], cached[1]["skip_summary"]
        else:
            validator = Validator(self.spec, self.format, skip_bad_lines)
            good = []
            for k, (f, g, _) in enumerate(groups):
                for j, record in enumerate(self._group(k, remember=False)):
                    row = int(self._starts[k]) + j
                    if validator.check(record, f"{self.paths[f]} row {row - int(self._starts[k])} "
                                               f"of row group {g} (record {row})"):
                        good.append(row)
            self._rows = np.asarray(good, np.int64)
            self.skipped, self.skip_summary = validator.total_skipped, validator.summary()
            index_cache.save("parquet", self.paths, options, {"rows": self._rows},
                             {"skipped": self.skipped, "skip_summary": self.skip_summary}, cache_dir)
        self.records = int(self._starts[-1])
        if not len(self._rows):
            raise UserError(f"data source parquet:{spec} has no usable records ({self.records} rows)")
        if self.skipped:
            print(f"warning: skipped {self.skipped} of {self.records} records of parquet:{spec} "
                  f"(data.skip_bad_lines): {self.skip_summary}", file=sys.stderr)

    def _group(self, k: int, remember: bool = True) -> list[dict]:
        """Row group k as records (dicts of the needed columns), kept in a small LRU cache."""
        with self._lock:
            if k in self._cache:
                self._cache.move_to_end(k)
                return self._cache[k]
            import pyarrow.parquet as pq

            f, g, _ = self._groups[k]
            if f not in self._files:
                self._files[f] = pq.ParquetFile(self.paths[f])
            rows = self._files[f].read_row_group(g, columns=self._columns).to_pylist()
            if remember:
                self._cache[k] = rows
                while len(self._cache) > _CACHED_GROUPS:
                    self._cache.popitem(last=False)
            return rows

    def __len__(self) -> int:
        return len(self._rows)

    def raw(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        row = int(self._rows[i])
        k = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self._group(k)[row - int(self._starts[k])]

    def __getitem__(self, i: int) -> Example:
        return parse_record(self.raw(i), self.format)

    def __getstate__(self) -> dict:  # picklable: open files, the cache and the lock stay behind
        return {**self.__dict__, "_files": {}, "_cache": OrderedDict(), "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __repr__(self) -> str:
        return f"ParquetSource({self.spec!r}, format={self.format!r}, examples={len(self)})"
