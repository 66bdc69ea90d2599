"""Chat templates rendered the way transformers renders them, and the trained-token spans they give.

The Jinja environment mirrors `transformers.utils.chat_template_utils`: an immutable sandbox with
`trim_blocks`, `lstrip_blocks` and the loopcontrols extension, `tojson` without ASCII escaping,
`raise_exception`, `strftime_now`, and the `{% generation %}` tag, which records the character
span of what it renders (transformers' `return_assistant_tokens_mask`).

Trained spans (`assistant_spans`):
  - a template with `{% generation %}` blocks: exactly the spans the blocks rendered;
  - a stock template without them: each assistant turn is found by rendering prefixes. The text that
    rendering messages[:i] with the generation prompt leaves off, up to the rendering of
    messages[:i+1], is the turn: its content and the end-of-turn marker after it are trained, the
    role header (in the generation prompt) and what follows the marker (a newline) are not. When a
    prefix rendering is not a prefix of the whole conversation (the template rewrites earlier turns,
    e.g. drops earlier reasoning), the conversation is refused with ChatTemplateError.
"""
from __future__ import annotations

import functools
import json
import os
import re
import threading
from datetime import datetime
from typing import Any, Sequence

from moejax.errors import UserError
from moejax.registry import Registry


_TRACK = threading.local()  # (blocks, spans) while a render records its generation spans


def clock() -> datetime:
    """The time `strftime_now` formats (templates such as Llama-3.1's print today's date); one
    place, so a test can render on the day a reference rendering was made."""
    return datetime.now()


class ChatTemplateError(UserError):
    """A conversation the chat template cannot render or mask: `reason` is a short key to count
    skipped conversations by (template_error, prefix_rewrite, no_assistant_turn, ...)."""

    def __init__(self, message: str, reason: str = "template_error"):
        super().__init__(message)
        self.reason = reason


# moejax's own template, as SentencePiece-trained moejax tokenizers render it (bos/eos are added
# by the tokenizer as ids, see MoejaxTokenizer.encode_chat). The role markers are user symbols.
MOEJAX_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% else %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}")
# ChatML (OpenHermes-2.5, many fine-tunes): a built-in for tokenizers that ship no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

BUILTIN_TEMPLATES: Registry[str] = Registry("built-in chat template")
BUILTIN_TEMPLATES.register("moejax")(MOEJAX_TEMPLATE)
BUILTIN_TEMPLATES.register("chatml")(CHATML_TEMPLATE)

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_blocks(template: str) -> bool:
    return bool(_GENERATION_RE.search(template))


def resolve_template(spec: str) -> str:
    """`data.chat_template`: a built-in name, or a file holding the Jinja text."""
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES.get(spec)
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return f.read()
    raise UserError(f"data.chat_template = {spec!r} is neither a file nor a built-in template; "
                    f"built-ins: {', '.join(BUILTIN_TEMPLATES.names())}")


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: records (start, end) of what the block renders."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

        def _track(self, caller):
            out = caller()
            tracker = getattr(_TRACK, "value", None)
            if tracker is not None:
                start = sum(len(b) for b in tracker[0])
                tracker[1].append((start, start + len(out)))
            return out

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: clock().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"chat template does not parse: {e.message} (template line {e.lineno})") from None


def _messages(messages: Any) -> list[dict]:
    if hasattr(messages, "messages") and callable(messages.messages):  # moejax.data.example.Example
        messages = messages.messages()
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"message {i} must be a dict with role and content, got "
                                    f"{type(m).__name__}", "bad_message")
        out.append({k: v for k, v in m.items() if v is not None})  # transformers drops None values
    return out


def render(template: str, messages: Any, add_generation_prompt: bool = False,
           variables: dict | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of its `{% generation %}` blocks."""
    import jinja2

    compiled = _compile(template)
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    _TRACK.value = (blocks, spans)
    try:
        for block in compiled.generate(messages=_messages(messages), tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt, **(variables or {})):
            blocks.append(block)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template refused the conversation: {e}", "template_error") from None
    finally:
        _TRACK.value = None
    return "".join(blocks), spans


def assistant_spans(template: str, messages: Any, variables: dict, eot_markers: Sequence[str]
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation's rendering and the character spans to train on (see module doc)."""
    msgs = _messages(messages)
    if not any(m.get("role") == "assistant" for m in msgs):
        raise ChatTemplateError("the conversation has no assistant turn to train on", "no_assistant_turn")
    text, spans = render(template, msgs, False, variables)
    if has_generation_blocks(template):
        if not spans or all(a == b for a, b in spans):
            raise ChatTemplateError("the template's {% generation %} blocks rendered nothing for this "
                                    "conversation", "empty_mask")
        return text, spans
    markers = sorted({m for m in eot_markers if m}, key=len, reverse=True)
    spans = []
    for i, m in enumerate(msgs):
        if m.get("role") != "assistant":
            continue
        prompt, _ = render(template, msgs[:i], True, variables)
        upto, _ = render(template, msgs[:i + 1], False, variables)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ChatTemplateError(
                f"the chat template rewrites earlier turns (rendering messages[:{i}] is not a prefix of "
                "the whole conversation), so trained tokens cannot be found by prefixes; add "
                "{% generation %} blocks to the template or set data.chat_template", "prefix_rewrite")
        start, turn = len(prompt), upto[len(prompt):]
        end = _marker_end(turn, markers)
        if end is None:  # no end-of-turn marker: train the turn's text without trailing whitespace
            end = len(turn.rstrip())
        if end == 0:
            raise ChatTemplateError(f"assistant message {i} renders to nothing to train on", "empty_mask")
        spans.append((start, start + end))
    return text, spans


def _marker_end(turn: str, markers: Sequence[str]) -> int | None:
    """End of the last end-of-turn marker in `turn` (the rendered assistant turn), or None."""
    best = None
    for marker in markers:
        pos = turn.rfind(marker)
        if pos >= 0 and (best is None or pos + len(marker) > best):
            best = pos + len(marker)
    return best


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character offsets overlap a span (transformers' assistant mask rule:
    a token holding any character of a span is trained). Both lists are in order."""
    mask = [0] * len(offsets)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[t] = 1
    return mask
