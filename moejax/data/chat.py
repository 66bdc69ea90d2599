"""Conversation -> tokens: an `Example` as the `[{"role", "content"}]` messages of transformers,
through the tokenizer's chat template, to (ids, loss mask). A conversation the template refuses
(`moejax.tokenizer.ChatTemplateError`: roles that do not alternate, a template that rewrites earlier
turns so the mask cannot be derived, ...) becomes a `Skip` with the reason, which the packer counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moejax.data.example import Example
from moejax.errors import UserError

Tokenized = tuple[list[int], list[int]]  # (ids, mask: 1 = trained)


@dataclass(frozen=True)
class Skip:
    """An example that could not be tokenized, and why."""
    reason: str


def to_messages(example: Example) -> list[dict[str, str]]:
    return [{"role": role, "content": text} for role, text in example.turns]


def _refusal_types() -> tuple[type, ...]:
    try:  # the Hugging Face side of moejax.tokenizer; older tokenizers have no such refusals
        from moejax.tokenizer import ChatTemplateError
        return (ChatTemplateError,)
    except ImportError:
        return ()


class ChatEncoder:
    """`encoder(example) -> (ids, mask) | Skip`. A tokenizer with `apply_chat_template` (Hugging
    Face style) gets the messages and `chat_template`; one without (moejax's own SentencePiece
    tokenizer, test doubles) gets the `Example`."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None):
        self.tokenizer, self.chat_template = tokenizer, chat_template or None
        self.messages_api = hasattr(tokenizer, "apply_chat_template")
        self._refusals = _refusal_types() if self.messages_api else ()

    def __call__(self, example: Example) -> Tokenized | Skip:
        try:
            if self.messages_api:
                ids, mask = self.tokenizer.encode_chat(to_messages(example),
                                                       chat_template=self.chat_template)
            else:
                ids, mask = self.tokenizer.encode_chat(example)
        except self._refusals as e:
            return Skip(_reason(e))
        if len(ids) != len(mask) or len(ids) < 2:
            raise UserError(f"the tokenizer's encode_chat returned {len(ids)} ids and {len(mask)} mask "
                            "values; expected equal lengths of at least 2")
        return list(ids), [int(m) for m in mask]


def _reason(e: Exception) -> str:
    """A short, countable reason: the message's first line, without per-conversation detail."""
    text = str(e).split("\n")[0]
    return text[:200] or type(e).__name__
