"""`jsonl:PATH`: a JSON-lines file as a random-access source of `Example`s (one record per line)."""
from __future__ import annotations

import os
import sys
from array import array

from moejax.data.example import Example
from moejax.data.formats import check_format, detect_format, loads, parse_record
from moejax.errors import UserError




class JsonlSource:
    """Random access to the examples of a .jsonl file.

    Opening makes one full pass: every non-blank line is parsed and validated (so a bad line stops
    the run before training starts, naming PATH:LINE), and only the byte offset and length of each good
    line is kept; `__getitem__` reads and parses one line again with `os.pread`, so big files are never
    held in memory and concurrent readers share the file descriptor safely.
    """

    def __init__(self, path: str | os.PathLike, format: str = "auto", skip_bad_lines: bool = False):
        self.path = os.fspath(path)
        check_format(format)
        if not os.path.isfile(self.path):
            raise UserError(f"data file {self.path!r} does not exist")
        self.format = format  # "auto" is replaced by the detected name below
        self.skipped = 0
        self._offsets = array("q")
        self._lengths = array("q")
        self._index(skip_bad_lines)
        if not self._offsets:
            raise UserError(f"data file {self.path!r} has no examples" +
                            (f" ({self.skipped} bad lines skipped)" if self.skipped else ""))
        if self.skipped:
            print(f"warning: skipped {self.skipped} bad lines of {self.path!r} (data.skip_bad_lines)",
                  file=sys.stderr)
        self._file = None

    def _index(self, skip_bad_lines: bool) -> None:
        offset = 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                try:
                    record = loads(raw)
                    if self.format == "auto":
                        self.format = detect_format(record)
                    parse_record(record, self.format)
                except ValueError as e:  # includes json.JSONDecodeError and UnicodeDecodeError
                    if not skip_bad_lines:
                        raise UserError(f"{self.path}:{lineno}: {e}") from None
                    self.skipped += 1
                    continue
                self._offsets.append(start)
                self._lengths.append(len(raw))

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        if self._file is None:
            self._file = open(self.path, "rb")
        raw = os.pread(self._file.fileno(), self._lengths[i], self._offsets[i])
        return parse_record(loads(raw), self.format)

    def __getstate__(self) -> dict:  # picklable for worker processes: they reopen the file
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, format={self.format!r}, examples={len(self)})"


