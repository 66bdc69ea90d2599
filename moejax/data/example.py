"""The one record every data source yields: a conversation (or plain text) with an optional domain tag."""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """`turns`: (role, text) pairs, role in ROLES. Plain text is one ("assistant", text) turn, so
    every token of it is trained on. `domain`: a tag for per-domain evaluation and analysis."""

    turns: tuple[tuple[str, str], ...]
    domain: str = ""

    def messages(self) -> list[dict[str, str]]:
        """The turns as transformers-style messages: [{"role": ..., "content": ...}]."""
        return [{"role": role, "content": text} for role, text in self.turns]

    def split_answer(self) -> tuple["Example", str]:
        """The conversation up to its last assistant turn, and that turn's text (for exact match)."""
        if not self.turns or self.turns[-1][0] != "assistant":
            raise ValueError("example does not end with an assistant turn")
        return Example(self.turns[:-1], self.domain), self.turns[-1][1]
