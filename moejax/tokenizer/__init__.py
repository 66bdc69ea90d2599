"""Tokenizers: `load(path)` opens any of
  - a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json, chat_template.jinja),
    or one with only a SentencePiece tokenizer.model (Llama-2 / Mistral), converted as transformers does;
  - a bare SentencePiece tokenizer.model file (with tokenizer_config.json next to it when present);
  - moejax's own trained SentencePiece model (`python -m moejax.tokenizer train`).
Every tokenizer has encode / decode / apply_chat_template / encode_chat / encode_prompt, bos_id,
eos_id, pad_id, vocab_size and stop_ids, with transformers' names and results.

Imports flow one way: this package needs only moejax.errors / registry (never moejax.data); data
packing and the commands import it.
"""
from __future__ import annotations

import os
from typing import Sequence

from moejax.errors import UserError
from moejax.tokenizer.base import ChatTokenizer
from moejax.tokenizer.chat_template import BUILTIN_TEMPLATES, ChatTemplateError
from moejax.tokenizer.moejax_spm import (END, MIN_VOCAB_SIZE, ROLE_TOKENS, SPECIAL_TOKENS, Tokenizer,
                                         _keep_frequent_chars, render, train_tokenizer)


def load(path: str | os.PathLike, chat_template: str | None = None) -> ChatTokenizer:
    """The tokenizer at `path`; `chat_template` (Jinja text, a file, or a built-in name) replaces the
    tokenizer's own template."""
    import moejax.tokenizer.chat_template as ct
    from moejax.tokenizer.hf import HFTokenizer, TOKENIZER_FILES

    path = os.fspath(path)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
            present = sorted(os.listdir(path))[:8]
            raise UserError(f"tokenizer directory {path!r} has no tokenizer.json or tokenizer.model "
                            f"(it holds: {', '.join(present) or 'nothing'})")
        tok: ChatTokenizer = HFTokenizer.from_directory(path)
    elif os.path.isfile(path):
        tok = _load_model_file(path)
    else:
        raise UserError(f"tokenizer file {path!r} does not exist (expected a Hugging Face tokenizer directory "
                        "or a SentencePiece .model file)")
    if chat_template:
        tok.chat_template = tok.template(chat_template)
    return tok


def _load_model_file(path: str) -> ChatTokenizer:
    """A .model file: moejax's own when it has the moejax chat symbols, else a SentencePiece model
    read as transformers' LlamaTokenizer reads it (tokenizer_config.json next to it when present)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.load(path)
    except (OSError, RuntimeError) as e:
        raise UserError(f"tokenizer file {path!r} is not a SentencePiece model ({e})") from None
    if all(sp.piece_to_id(t) != sp.unk_id() for t in SPECIAL_TOKENS):
        return Tokenizer(sp, path)
    from moejax.tokenizer.hf import HFTokenizer, _read_json, read_chat_template
    from moejax.tokenizer.sentencepiece_convert import convert

    directory = os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    config = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    tok = HFTokenizer(convert(path, config), path, config, read_chat_template(directory, config))
    return tok


__all__ = ["load", "ChatTokenizer", "ChatTemplateError", "Tokenizer", "train_tokenizer", "render",
           "BUILTIN_TEMPLATES", ]
