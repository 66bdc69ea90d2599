"""`json:PATH`: one JSON array of records (pretty-printed or not, e.g. OpenHermes-2.5's 2 GB
`openhermes2_5.json`) as a random-access source of `Example`s, without parsing the file into memory.

Opening streams the file once in 16 MiB pieces: each element of the array is decoded by the C JSON
decoder (`raw_decode`), checked by its format's parser, and only its byte offset and length are
kept (16 bytes a record). The index is cached (`moejax.data.index_cache`, keyed by path, size and
mtime), so only the first run pays the scan. `source[i]` is then one `os.pread` and one
`json.loads` of that record.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

import numpy as np

import moejax.data.index_cache as index_cache
from moejax.data.example import Example
from moejax.data.formats import Validator, check_format, parse_record
from moejax.errors import UserError

CHUNK = 1 << 24  # bytes read at a time: bounds memory to a few chunks plus the largest record
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class _Reader:
    """The file as a sliding window of text decoded as Latin-1: one character per byte, so a
    position is a byte offset (`base + pos`) and decoding is a copy. JSON's structure is ASCII, and
    the bytes of a multi-byte UTF-8 character are all >= 0x80 (never a quote, backslash or control
    character), so the decoder finds exactly the same record boundaries as on the UTF-8 text; keys
    and roles are ASCII, so the format checks see them as they are. `source[i]` decodes the record's
    bytes as UTF-8 (`json.loads`)."""

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "rb")
        self.text = ""
        self.base = 0        # byte offset of text[0]
        self.read_bytes = 0  # bytes read from the file so far
        self.eof = False

    def more(self, keep_from: int) -> int:
        """Drop text[:keep_from], append the next chunk; returns keep_from's new index (0)."""
        self.base += keep_from
        self.text = self.text[keep_from:]
        if not self.eof:
            raw = self.f.read(CHUNK)
            self.text += raw.decode("latin-1")
            self.read_bytes += len(raw)
            self.eof = not raw
        return 0

    def byte_at(self, pos: int) -> int:
        return self.base + pos

    def skip_ws(self, pos: int) -> int:
        """Index of the next non-whitespace character (reading on as needed); len(text) at EOF."""
        while True:
            pos = _WS.match(self.text, pos).end()
            if pos < len(self.text) or self.eof:
                return pos
            pos = self.more(pos)

    def close(self) -> None:
        self.f.close()


def _incomplete(e: json.JSONDecodeError, text: str) -> bool:
    # The piece may end inside this record: the decoder then fails at (or a literal's length
    # before) the window's end, or in a string that runs past it. Pretty-printed or not, a real
    # error elsewhere fails earlier: a JSON string cannot hold a raw newline.
    return e.pos >= len(text) - 8 or e.msg.startswith("Unterminated string")


def scan(path: str, validator: Validator) -> tuple[np.ndarray, np.ndarray, int]:
    """(offsets, lengths) in bytes of the good records of the JSON array in `path`, and the number of
    records in the array. UserError, naming the byte offset, when it is not one well-formed array."""
    r = _Reader(path)
    offsets: list[int] = []
    lengths: list[int] = []
    try:
        pos = r.skip_ws(r.more(0))
        if r.text.startswith("\xef\xbb\xbf", pos):  # a UTF-8 byte order mark
            pos = r.skip_ws(pos + 3)
        if pos >= len(r.text):
            raise UserError(f"{path}: the file is empty; expected a JSON array of records")
        if r.text[pos] != "[":
            hint = " (one JSON object per line is a jsonl: source)" if r.text[pos] == "{" else ""
            raise UserError(f"{path}: byte {r.byte_at(pos)}: expected a JSON array ('['), found "
                            f"{r.text[pos]!r}{hint}")
        pos = r.skip_ws(pos + 1)
        index = 0
        while True:
            if pos >= len(r.text):
                raise UserError(f"{path}: truncated at byte {r.read_bytes}: the array is not closed "
                                f"after {index} records (expected ',' or ']')")
            if r.text[pos] == "]" and index == 0:
                break
            start = r.byte_at(pos)
            while True:  # one element, reading on while it runs past the window
                try:
                    record, end = _DECODER.raw_decode(r.text, pos)
                    break
                except json.JSONDecodeError as e:
                    if r.eof and (e.pos >= len(r.text.rstrip())
                                  or e.msg.startswith("Unterminated string")):
                        raise UserError(f"{path}: truncated at byte {r.read_bytes}: record {index} "
                                        f"(from byte {start}) never ends") from None
                    if r.eof or not _incomplete(e, r.text):
                        raise UserError(f"{path}: record {index} (from byte {start}): invalid JSON: "
                                        f"{e.msg.removesuffix(' at')} (byte {r.byte_at(e.pos)})") from None
                    pos = r.more(pos)
            length = end - pos
            if validator.check(record, f"record {index} (byte {start})"):
                offsets.append(start)
                lengths.append(length)
            index += 1
            pos = r.skip_ws(end)
            if pos >= len(r.text):
                continue  # reported as truncated above
            if r.text[pos] == "]":
                break
            if r.text[pos] != ",":
                raise UserError(f"{path}: byte {r.byte_at(pos)}: expected ',' or ']' after record "
                                f"{index - 1}, found {r.text[pos]!r}")
            pos = r.skip_ws(pos + 1)
            if pos < len(r.text) and r.text[pos] == "]":
                raise UserError(f"{path}: byte {r.byte_at(pos)}: a ',' after the last record "
                                "(trailing commas are not JSON)")
        pos = r.skip_ws(pos + 1)
        if pos < len(r.text):
            raise UserError(f"{path}: byte {r.byte_at(pos)}: data after the end of the array")
    finally:
        r.close()
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), index


class JsonArraySource:
    """Random access to the records of one JSON array file (see the module doc)."""

    def __init__(self, path: str | os.PathLike, format: str = "auto", skip_bad_lines: bool = False,
                 cache_dir: str = ""):
        self.path = os.fspath(path)
        check_format(format)
        if not os.path.isfile(self.path):
            raise UserError(f"data file {self.path!r} does not exist")
        options = {"format": format, "skip_bad": skip_bad_lines}
        cached = index_cache.load("json", [self.path], options, cache_dir)
        self.cached = cached is not None
        if cached is not None:
            arrays, meta = cached
            self._offsets, self._lengths = arrays["offsets"], arrays["lengths"]
            self.format, self.records = meta["format"], meta["records"]
            self.skipped, self.skip_summary = meta["skipped"], meta["skip_summary"]
        else:
            t0 = time.perf_counter()
            size = os.path.getsize(self.path)
            if size > 64 << 20:
                print(f"indexing {self.path} ({size / 2**30:.2f} GiB); cached for later runs",
                      file=sys.stderr, flush=True)
            validator = Validator(self.path, format, skip_bad_lines)
            self._offsets, self._lengths, self.records = scan(self.path, validator)
            self.format, self.skipped = validator.format, validator.total_skipped
            self.skip_summary = validator.summary()
            if self.records and self.format == "auto":  # every record was skipped
                self.format = "auto"
            meta = {"format": self.format, "records": self.records, "skipped": self.skipped,
                    "skip_summary": self.skip_summary, "seconds": time.perf_counter() - t0}
            index_cache.save("json", [self.path], options,
                             {"offsets": self._offsets, "lengths": self._lengths}, meta, cache_dir)
        if not len(self._offsets):
            raise UserError(f"data file {self.path!r} has no usable records ({self.records} in the "
                            f"array" + (f"; skipped: {self.skip_summary}" if self.skipped else "") + ")")
        if self.skipped:
            print(f"warning: skipped {self.skipped} of {self.records} records of {self.path!r} "
                  f"(data.skip_bad_lines): {self.skip_summary}", file=sys.stderr)
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def raw(self, i: int) -> Any:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = os.pread(self._fd, int(self._lengths[i]), int(self._offsets[i]))
        try:
            return json.loads(raw)
        except UnicodeDecodeError as e:  # the index pass does not decode text (see _Reader)
            raise UserError(f"{self.path}: record at byte {int(self._offsets[i])}: byte "
                            f"{int(self._offsets[i]) + e.start} is not UTF-8 (a JSON file must be "
                            "UTF-8)") from None

    def __getitem__(self, i: int) -> Example:
        return parse_record(self.raw(i), self.format)

    def __getstate__(self) -> dict:  # picklable for worker processes: they reopen the file
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"JsonArraySource({self.path!r}, format={self.format!r}, examples={len(self)})"
