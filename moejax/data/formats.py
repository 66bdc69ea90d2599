"""JSON-lines data sources: one record parser per format (a registry), format detection, and an
indexed, random-access `JsonlSource`.

Formats (`data.format`), each a record -> `Example` parser:
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt" (or "user"|"assistant"), "value": str}]}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": str}]}   (OpenAI chat)
  alpaca    {"instruction": str, "input": str (optional), "output": str}
  text      {"text": str}   -> one ("assistant", text) turn, so every token is trained on
  auto      detected from the keys of the first non-empty line
Any record may carry a "domain": str, which becomes `Example.domain`.
"""
from __future__ import annotations

import json
import os
import sys
from array import array
from typing import Any, Callable, Iterator

from moejax.data import Source
from moejax.data.example import Example
from moejax.errors import UserError
from moejax.registry import Registry

Parser = Callable[[dict], Example]
FORMATS: Registry[Parser] = Registry("data format")


# ----------------------------------------------------------------------------------------------
# Record parsers. Each raises ValueError with a short reason; JsonlSource adds "PATH:LINE: ".


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__}")
    return value


def _field(record: dict, key: str) -> Any:
    if key not in record:
        raise ValueError(f"missing key {key!r}")
    return record[key]


def _domain(record: dict) -> str:
    return _str(record.get("domain", ""), "'domain'")


def _chat(record: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> Example:
    """A list of turns under `key`, each {role_key: one of `roles`, text_key: str}."""
    turns = _field(record, key)
    if not isinstance(turns, list):
        raise ValueError(f"{key!r} must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise ValueError(f"{key!r} is an empty conversation")
    out = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where} must be an object, got {type(turn).__name__}")
        if role_key not in turn or text_key not in turn:
            missing = role_key if role_key not in turn else text_key
            raise ValueError(f"{where} is missing key {missing!r}")
        role = turn[role_key]
        if role not in roles:
            raise ValueError(f"{where}.{role_key} = {role!r} is not allowed; allowed: "
                             f"{', '.join(sorted(roles))}")
        out.append((roles[role], _str(turn[text_key], f"{where}.{text_key}")))
    if not any(role == "assistant" for role, _ in out):
        raise ValueError(f"{key!r} has no assistant turn to train on")
    return Example(tuple(out), _domain(record))


@FORMATS.register("sharegpt")
def parse_sharegpt(record: dict) -> Example:
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
             "assistant": "assistant"}
    return _chat(record, "conversations", "from", "value", roles)


@FORMATS.register("messages")
def parse_messages(record: dict) -> Example:
    roles = {"system": "system", "user": "user", "assistant": "assistant"}
    return _chat(record, "messages", "role", "content", roles)


@FORMATS.register("alpaca")
def parse_alpaca(record: dict) -> Example:
    instruction = _str(_field(record, "instruction"), "'instruction'")
    output = _str(_field(record, "output"), "'output'")
    extra = record.get("input")
    extra = "" if extra is None else _str(extra, "'input'")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return Example((("user", prompt), ("assistant", output)), _domain(record))


@FORMATS.register("text")
def parse_text(record: dict) -> Example:
    text = _str(_field(record, "text"), "'text'")
    if not text:
        raise ValueError("'text' is empty")
    return Example((("assistant", text),), _domain(record))


# Checked in order: a record with both "messages" and "text" is a chat.
_SIGNATURES = ((("conversations",), "sharegpt"), (("messages",), "messages"),
               (("instruction", "output"), "alpaca"), (("text",), "text"))


def detect_format(record: Any) -> str:
    """The format name of a record, from its keys; ValueError when no format fits."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for keys, name in _SIGNATURES:
        if all(k in record for k in keys):
            return name
    expected = "; ".join(f"{'+'.join(keys)} ({name})" for keys, name in _SIGNATURES)
    raise ValueError(f"cannot detect the format from keys {sorted(record)}; expected one of: {expected}")


def parse_record(record: Any, fmt: str) -> Example:
    """Parse one decoded JSON value with the named format; ValueError with a reason when malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return FORMATS.get(fmt)(record)


def _check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"data.format = {fmt!r} is not allowed; allowed: "
                        f"{', '.join(['auto'] + FORMATS.names())}")


# ----------------------------------------------------------------------------------------------
# The source.


class JsonlSource:
    """Random access to the examples of a .jsonl file.

    Opening makes one full pass: every non-blank line is parsed and validated (so a bad line stops
    the run before training starts, naming PATH:LINE), and only the byte offset and length of each good
    line is kept; `__getitem__` reads and parses one line again with `os.pread`, so big files are never
    held in memory and concurrent readers share the file descriptor safely.
    """

    def __init__(self, path: str | os.PathLike, format: str = "auto", skip_bad_lines: bool = False):
        self.path = os.fspath(path)
        _check_format(format)
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
                    record = _loads(raw)
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
        return parse_record(_loads(raw), self.format)

    def __getstate__(self) -> dict:  # picklable for worker processes: they reopen the file
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, format={self.format!r}, examples={len(self)})"


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None


def iter_texts(source: Source, limit: int | None = None) -> Iterator[str]:
    """The plain-text renderings (chat template, `moejax.tokenizer.render`) of up to `limit` examples,
    spread evenly over the source so a file sorted by domain still shows every domain."""
    from moejax.tokenizer import render  # late: moejax.tokenizer imports the data package

    n = len(source)
    count = n if limit is None else min(limit, n)
    for j in range(count):
        yield render(source[j * n // count])
