"""Record formats: one record -> `Example` parser per format (a registry) and format detection,
shared by every file source (jsonl, json, parquet, hf).

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
from typing import Any, Callable

from moejax.data.example import Example
from moejax.errors import UserError
from moejax.registry import Registry

Parser = Callable[[dict], Example]
FORMATS: Registry[Parser] = Registry("data format")


# ----------------------------------------------------------------------------------------------
# Record parsers. Each raises ValueError with a short reason; the source adds where ("PATH:LINE: ").


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__}")
    return value


def _field(record: dict, key: str) -> Any:
    if key not in record:
        raise ValueError(f"missing key {key!r}")
    return record[key]


def _domain(record: dict) -> str:
    domain = record.get("domain")  # null (OpenHermes writes every absent key as null) = no domain
    return "" if domain is None else _str(domain, "'domain'")


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


def check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"data.format = {fmt!r} is not allowed; allowed: "
                        f"{', '.join(['auto'] + FORMATS.names())}")


def signature_keys() -> tuple[tuple[tuple[str, ...], str], ...]:
    """(keys, format) pairs in detection order: what a parquet schema is matched against."""
    return _SIGNATURES


def loads(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None


class Validator:
    """Checks the records of one file as its index is built: detects the format on the first good
    record (`auto`), then parses each. A bad record stops with one line naming the file and where
    (`PATH: record 12 (byte 3456): 'conversations' has no assistant turn`), or, with
    `data.skip_bad_lines`, is counted by reason, so nothing is dropped silently."""

    def __init__(self, path: str, fmt: str, skip_bad: bool):
        check_format(fmt)
        self.path, self.format, self.skip_bad = path, fmt, skip_bad
        self.skipped: dict[str, int] = {}  # reason -> count
        self.first_skipped: dict[str, str] = {}  # reason -> where it was first seen

    def check(self, record: Any, where: str) -> bool:
        """True when the record is good; False when skipped; UserError otherwise."""
        try:
            if self.format == "auto":
                fmt = detect_format(record)
                parse_record(record, fmt)
                self.format = fmt
            else:
                parse_record(record, self.format)
            return True
        except ValueError as e:
            return self.bad(str(e), where)

    def bad(self, reason: str, where: str) -> bool:
        if not self.skip_bad:
            raise UserError(f"{self.path}: {where}: {reason} (set data.skip_bad_lines=true to skip "
                            "and count such records)")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_skipped.setdefault(reason, where)
        return False

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        return "; ".join(f"{n} x {reason} (first at {self.first_skipped.get(reason, '?')})"
                         for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
