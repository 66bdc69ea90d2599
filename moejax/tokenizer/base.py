"""What every moejax tokenizer offers on top of encode/decode: transformers-style chat templating,
trained-token masks and generation prompts (one implementation for all tokenizer kinds)."""
from __future__ import annotations

import abc
from typing import Any, Sequence

from moejax.errors import UserError
import moejax.tokenizer.chat_template as ct


class ChatTokenizer(abc.ABC):
    """Subclasses set `chat_template` (Jinja text or None), `special_tokens` (name -> text, the template
    variables bos_token, eos_token, ...), `stop_ids`, `bos_id`, `eos_id`, `pad_id`, `vocab_size`,
    `path`, and implement `encode`, `decode` and `encode_offsets`."""

    chat_template: str | None = None
    special_tokens: dict[str, str] = {}
    stop_ids: tuple[int, ...] = ()
    path: str = "<memory>"

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """(the subclass's tokenizer library)"""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """(the subclass's tokenizer library)"""

    @abc.abstractmethod
    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` (no added BOS/EOS) and each token's character span in `text`."""

    # -- chat -------------------------------------------------------------------------------------

    def template(self, chat_template: str | None = None) -> str:
        """The Jinja text in use: `chat_template` (Jinja text, a built-in name or a file), else the
        tokenizer's own."""
        if chat_template is not None:
            if "{" in chat_template:
                return chat_template
            return ct.resolve_template(chat_template)
        if self.chat_template is None:
            raise UserError(f"tokenizer {self.path!r} has no chat template (no chat_template in "
                            "tokenizer_config.json, no chat_template.jinja): set data.chat_template to a "
                            f"file or one of {', '.join(ct.BUILTIN_TEMPLATES.names())}")
        return self.chat_template

    @property
    def end_of_turn_tokens(self) -> list[str]:
        """The text of the stop ids (eos and end-of-turn markers): what a trained turn ends with."""
        return [self.id_to_token(i) for i in self.stop_ids if self.id_to_token(i) is not None]

    @abc.abstractmethod
    def id_to_token(self, i: int) -> str | None:
        """(the subclass's tokenizer library)"""

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = False,
                            chat_template: str | None = None) -> str:
        text, _ = ct.render(self.template(chat_template), messages, add_generation_prompt,
                            self.special_tokens)
        return text

    def encode_chat(self, messages: Any, chat_template: str | None = None) -> tuple[list[int], list[int]]:
        """Ids of the rendered conversation (tokenized as transformers' apply_chat_template does: the
        text with add_special_tokens=False) and the mask (1 = trained token)."""
        text, spans = ct.assistant_spans(self.template(chat_template), messages, self.special_tokens,
                                         self.end_of_turn_tokens)
        ids, offsets = self.encode_offsets(text)
        mask = ct.token_mask(offsets, spans)
        if not any(mask):
            raise ChatTemplateError("no token of this conversation is trained (its assistant text "
                                    "tokenizes to nothing)", "empty_mask")
        return ids, mask

    def encode_prompt(self, messages: Any, chat_template: str | None = None) -> list[int]:
        """The conversation with the generation prompt (the assistant header): what generate continues."""
        return self.encode(self.apply_chat_template(messages, True, chat_template))


ChatTemplateError = ct.ChatTemplateError
