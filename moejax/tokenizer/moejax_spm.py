"""SentencePiece tokenizer with moejax's chat template, and a CLI that trains one from the data.

Chat template (what `render` writes and `encode_chat` tokenizes):

    <s><|user|>\\n{text}<|end|>\\n<|assistant|>\\n{text}<|end|>\\n</s>

The role markers and `<|end|>` are SentencePiece user-defined symbols, so each is one id that is
never split. Literal marker text inside the data ("<|end|>") also maps to that id.

    python -m moejax.tokenizer train --config configs/quickstart.yaml [--set k=v ...] [--out PATH]
"""
from __future__ import annotations

import io
import itertools
import os
import re
import tempfile
from collections import Counter
from typing import Iterable, Sequence

import sentencepiece as spm

from moejax.errors import UserError
import moejax.tokenizer.chat_template as ct
from moejax.tokenizer.base import ChatTokenizer

ROLES = ("system", "user", "assistant")

ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END = "<|end|>"
SPECIAL_TOKENS = (*ROLE_TOKENS.values(), END)
# pad, unk, bos, eos + the chat markers + one piece per byte (byte_fallback): the smallest vocabulary.
MIN_VOCAB_SIZE = 4 + len(SPECIAL_TOKENS) + 256
MAX_SENTENCES = 100_000  # lines fed to the trainer: a few seconds on 2 CPU cores
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def _turns(messages) -> list[tuple[str, str]]:
    """(role, text) pairs of an Example (its `turns`) or of transformers-style messages."""
    if hasattr(messages, "turns"):
        return list(messages.turns)
    return [(m["role"], m["content"]) for m in messages]


def render(example) -> str:
    """The conversation as plain text in the chat template, without BOS/EOS (tokenizer training)."""
    return "".join(f"{ROLE_TOKENS[role]}\n{text}{END}\n" for role, text in _turns(example))


def _sentences(texts: Iterable[str], limit: int) -> list[str]:
    # One trainer sentence per line: newlines are never merged into word pieces but spelt by the
    # byte piece <0x0A> (as in Llama), so a template's "\n" tokenizes the same alone or in context.
    lines = (line for text in texts for line in text.split("\n") if line)
    return list(itertools.islice(lines, limit))


def _keep_frequent_chars(sentences: list[str], max_chars: int) -> list[str]:
    """Drop all but the `max_chars` most frequent characters from the training sentences (not from
    the special tokens). With character_coverage 1.0 every character seen in training becomes a piece;
    the dropped rare ones are spelt with byte pieces instead (byte_fallback), so nothing is <unk>."""
    seen: set[str] = set()
    for s in sentences:
        seen.update(s)
    if len(seen) <= max_chars:  # the common case: no counting needed
        return sentences
    counts: Counter[str] = Counter()
    for s in sentences:
        for part in _SPECIAL_RE.split(s)[::2]:  # even parts are the text between special tokens
            counts.update(part)
    keep = {c for c, _ in counts.most_common(max_chars)}
    drop = {ord(c): None for c in counts if c not in keep}
    out = ["".join(p if i % 2 else p.translate(drop) for i, p in enumerate(_SPECIAL_RE.split(s)))
           for s in sentences]
    return [s for s in out if s]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike,
                    max_sentences: int = MAX_SENTENCES) -> "Tokenizer":
    """Train a BPE SentencePiece model on (the first `max_sentences` lines of) `texts` and write it
    to `out_path` atomically.

    Its vocabulary has at most `vocab_size` pieces: BPE adds merges one by one and stops at
    vocab_size (or earlier, when a small corpus has no pair left), and we check it. The pieces beyond
    the fixed MIN_VOCAB_SIZE go at most half to single characters, the rest to merges.
    """
    if vocab_size < MIN_VOCAB_SIZE + 2:
        raise UserError(f"model.vocab_size = {vocab_size} is too small for the tokenizer: it must be >= "
                        f"{MIN_VOCAB_SIZE + 2} (4 special + {len(SPECIAL_TOKENS)} chat markers + 256 "
                        "byte pieces, plus room for characters and merges)")
    sentences = _keep_frequent_chars(_sentences(texts, max_sentences), (vocab_size - MIN_VOCAB_SIZE) // 2)
    if not sentences:
        raise UserError("cannot train a tokenizer: the training texts are empty")
    proto = _train(sentences, vocab_size)
    tok = Tokenizer(spm.SentencePieceProcessor(model_proto=proto), os.fspath(out_path))
    assert tok.vocab_size <= vocab_size, (tok.vocab_size, vocab_size)
    _write_atomic(os.fspath(out_path), proto)
    return tok


def _train(sentences: list[str], vocab_size: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model,
        # BPE: merges grow the vocabulary bottom-up until vocab_size or until the corpus has no pair
        # left, so a small corpus just ends smaller (unigram prunes down from a seed vocabulary and
        # needs hard_vocab_limit=False for that); greedy merges are deterministic, as in Llama.
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=list(SPECIAL_TOKENS),
        split_digits=True,  # one token per digit: arithmetic is learnable digit by digit
        byte_fallback=True, character_coverage=1.0,  # characters are capped by _keep_frequent_chars
        # Keep text byte-exact: no NFKC, no whitespace collapsing, no leading "▁" added per call, so
        # encode(a) + encode(b) decodes to a + b and template parts can be tokenized separately.
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become pieces
        max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)
    return model.getvalue()


def _write_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokenizer-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class Tokenizer(ChatTokenizer):
    """A trained SentencePiece model plus the chat template (built-in `moejax`).

    `decode` drops pad/BOS/EOS, spells byte pieces as their bytes, and keeps role markers and
    `<|end|>` as their text (they are user-defined symbols), so decode(encode_chat(ex)[0]) == render(ex).
    """

    def __init__(self, sp: spm.SentencePieceProcessor, path: str = "<memory>"):
        self.sp = sp
        self.path = path
        ids = {tok: sp.piece_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok, i in ids.items() if i == sp.unk_id()]
        if missing or (sp.pad_id(), sp.bos_id(), sp.eos_id()) != (0, 2, 3):
            raise UserError(f"tokenizer {path!r} was not trained by moejax.tokenizer (missing "
                            f"{', '.join(missing) or 'pad/bos/eos ids 0/2/3'}); train one with "
                            "`python -m moejax.tokenizer train`")
        self.role_ids = {role: ids[tok] for role, tok in ROLE_TOKENS.items()}
        self.end_id = ids[END]
        self._newline = sp.encode("\n")
        self.chat_template = ct.MOEJAX_TEMPLATE
        self.special_tokens = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                               "unk_token": "<unk>"}
        self.stop_ids = (self.end_id, self.eos_id)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"tokenizer file {path!r} does not exist")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(path)
        except (OSError, RuntimeError) as e:
            raise UserError(f"tokenizer file {path!r} is not a SentencePiece model ({e})") from None
        return cls(sp, path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Plain text to ids; BOS/EOS around it with add_special_tokens."""
        ids = self.sp.encode(text)
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.decode(ids)
        # Control pieces (pad/bos/eos) spelt out, as transformers does with skip_special_tokens=False.
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # Special strings (<s>, </s>) written by a custom template become their ids, as in transformers.
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        specials = {"<s>": self.bos_id, "</s>": self.eos_id}
        pos = 0
        for part in re.split("(<s>|</s>)", text):
            if part in specials:
                ids.append(specials[part])
                offsets.append((pos, pos + len(part)))
            elif part:
                proto = self.sp.encode_as_immutable_proto(part)
                raw = part.encode("utf-8")
                for piece in proto.pieces:  # begin/end are byte offsets into `part`
                    ids.append(piece.id)
                    offsets.append((pos + len(raw[:piece.begin].decode("utf-8", "ignore")),
                                    pos + len(raw[:piece.end].decode("utf-8", "ignore"))))
            pos += len(part)
        return ids, offsets

    def render(self, example) -> str:
        return render(example)

    def _turn(self, role: str, text: str) -> tuple[list[int], list[int], list[int]]:
        """A turn as (header ids, body ids, trailer ids): `<|role|>\\n`, `text<|end|>`, `\\n`."""
        return [self.role_ids[role], *self._newline], [*self.encode(text), self.end_id], self._newline

    def encode_chat(self, example, chat_template: str | None = None) -> tuple[list[int], list[int]]:
        """Ids of the rendered conversation and its loss mask: 1 on each assistant turn's text and
        its `<|end|>` (so the model learns to stop) and on the final EOS; 0 elsewhere. Another
        `chat_template` goes through the generic (transformers-style) path."""
        if chat_template not in (None, "moejax"):
            return super().encode_chat(example, chat_template)
        if not any(role == "assistant" for role, _ in _turns(example)):
            raise ct.ChatTemplateError("the conversation has no assistant turn to train on",
                                       "no_assistant_turn")
        ids, mask = [self.bos_id], [0]
        for role, text in _turns(example):
            header, body, trailer = self._turn(role, text)
            trained = int(role == "assistant")
            ids += header + body + trailer
            mask += [0] * len(header) + [trained] * len(body) + [0] * len(trailer)
        ids.append(self.eos_id)
        mask.append(1)
        return ids, mask

    def encode_prompt(self, example, chat_template: str | None = None) -> list[int]:
        """The rendered turns followed by `<|assistant|>\\n`: what generation continues."""
        if chat_template not in (None, "moejax"):
            return super().encode_prompt(example, chat_template)
        ids = [self.bos_id]
        for role, text in _turns(example):
            header, body, trailer = self._turn(role, text)
            ids += header + body + trailer
        return ids + [self.role_ids["assistant"], *self._newline]


