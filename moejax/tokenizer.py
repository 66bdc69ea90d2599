"""SentencePiece tokenizer with moejax's chat template, and a CLI that trains one from the data.

Chat template (what `render` writes and `encode_chat` tokenizes):

    <s><|user|>\\n{text}<|end|>\\n<|assistant|>\\n{text}<|end|>\\n</s>

The role markers and `<|end|>` are SentencePiece user-defined symbols, so each is one id that is
never split. Literal marker text inside the data ("<|end|>") also maps to that id.

    python -m moejax.tokenizer train --config configs/quickstart.yaml [--set k=v ...] [--out PATH]
"""
from __future__ import annotations

import argparse
import io
import itertools
import os
import re
import tempfile
from collections import Counter
from typing import Iterable, Sequence

import sentencepiece as spm

from moejax.data.example import ROLES, Example
from moejax.errors import UserError, run_cli

ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END = "<|end|>"
SPECIAL_TOKENS = (*ROLE_TOKENS.values(), END)
# pad, unk, bos, eos + the chat markers + one piece per byte (byte_fallback): the smallest vocabulary.
MIN_VOCAB_SIZE = 4 + len(SPECIAL_TOKENS) + 256
MAX_SENTENCES = 100_000  # lines fed to the trainer: a few seconds on 2 CPU cores
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def render(example: Example) -> str:
    """The conversation as plain text in the chat template, without BOS/EOS (tokenizer training)."""
    return "".join(f"{ROLE_TOKENS[role]}\n{text}{END}\n" for role, text in example.turns)


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


class Tokenizer:
    """A trained SentencePiece model plus the chat template.

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

    def encode(self, text: str) -> list[int]:
        """Plain text to ids, no BOS/EOS."""
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def render(self, example: Example) -> str:
        return render(example)

    def _turn(self, role: str, text: str) -> tuple[list[int], list[int], list[int]]:
        """A turn as (header ids, body ids, trailer ids): `<|role|>\\n`, `text<|end|>`, `\\n`."""
        return [self.role_ids[role], *self._newline], [*self.encode(text), self.end_id], self._newline

    def encode_chat(self, example: Example) -> tuple[list[int], list[bool]]:
        """Ids of the rendered conversation and its loss mask: True on each assistant turn's text and
        its `<|end|>` (so the model learns to stop) and on the final EOS; False elsewhere."""
        ids, mask = [self.bos_id], [False]
        for role, text in example.turns:
            header, body, trailer = self._turn(role, text)
            trained = role == "assistant"
            ids += header + body + trailer
            mask += [False] * len(header) + [trained] * len(body) + [False] * len(trailer)
        ids.append(self.eos_id)
        mask.append(True)
        return ids, mask

    def encode_prompt(self, example: Example) -> list[int]:
        """The rendered `example.turns` followed by `<|assistant|>\\n`: what generation continues."""
        ids = [self.bos_id]
        for role, text in example.turns:
            header, body, trailer = self._turn(role, text)
            ids += header + body + trailer
        return ids + [self.role_ids["assistant"], *self._newline]


# ----------------------------------------------------------------------------------------------
# Command line.


def train_from_config(cfg, out: str | None = None, limit: int | None = 20_000) -> tuple[Tokenizer, str]:
    """Train on up to `limit` examples of cfg.data.source's train split with cfg.model.vocab_size;
    write to `out`, else cfg.data.tokenizer, else WORKDIR/tokenizer.model."""
    from moejax import data  # late: the data package may import this module
    from moejax.data.pipeline import iter_texts

    path = out or cfg.data.tokenizer or os.path.join(cfg.train.workdir, "tokenizer.model")
    source = data.open_source(cfg.data.source, "train", cfg.data)
    tok = train_tokenizer(iter_texts(source, limit), cfg.model.vocab_size, path)
    return tok, path


def main(argv: Sequence[str] | None = None) -> int:
    from moejax import config

    parser = argparse.ArgumentParser(prog="python -m moejax.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="Train a tokenizer on the config's training data.")
    train.add_argument("--config", default=None, help="YAML config (default: built-in defaults).")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="Override a config value, e.g. --set model.vocab_size=8192 (repeatable).")
    train.add_argument("--out", default=None,
                       help="Model file to write (default: data.tokenizer, else WORKDIR/tokenizer.model).")
    train.add_argument("--limit", type=int, default=20_000,
                       help="Examples to train on, spread over the source (default: 20000).")
    args = parser.parse_args(argv)
    if args.limit < 1:
        raise UserError(f"--limit = {args.limit} is out of range: must be >= 1")
    cfg = config.load(args.config, args.set)
    tok, path = train_from_config(cfg, args.out, args.limit)
    print(f"wrote {path} (vocab_size {tok.vocab_size}, requested {cfg.model.vocab_size})")
    return 0


if __name__ == "__main__":
    run_cli(main)
