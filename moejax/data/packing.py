"""SFT packing: tokenized conversations packed greedily into fixed-size rows, deterministic and resumable.

The stream of rows is a pure function of (source, tokenizer, seq_len, seed): each epoch walks a
permutation of the source drawn from (seed, epoch); examples fill a row in that order until the next
one does not fit, which then starts the next row (examples are never split; longer ones are truncated).
Every consecutive `batch_size` rows form one global batch. Each data shard walks the same stream and
keeps its own rows, so the iterator state (epoch, cursor) is the same on every shard.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from moejax.data.example import Example
from moejax.errors import UserError

Tokenized = tuple[list[int], list[bool]]  # (ids, assistant mask), from BOS to EOS


class ChatTokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int

    def encode_chat(self, example: Example) -> Tokenized: ...


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the source: a permutation of range(num_examples)."""
    # SeedSequence takes non-negative entropy; the modulo keeps negative seeds usable and distinct.
    return np.random.default_rng((seed % 2**64, epoch)).permutation(num_examples)


def pack_row(segments: Sequence[Tokenized], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row of `seq_len` positions from whole examples (each at most seq_len + 1 tokens).

    Example k (segment id k + 1) contributes inputs ids[:-1], targets ids[1:] and loss mask mask[1:]:
    the mask of a target token, so the loss trains exactly the assistant tokens it predicts."""
    tokens_t = np.full(seq_len, pad_id, np.int32)
    targets_t = np.full(seq_len, pad_id, np.int32)
    loss_mask_t = np.zeros(seq_len, np.float32)
    segment_ids_t = np.zeros(seq_len, np.int32)
    positions_t = np.zeros(seq_len, np.int32)
    start = 0
    for k, (ids, mask) in enumerate(segments):
        n = len(ids) - 1
        end = start + n
        assert end <= seq_len, "segments overflow the row"
        tokens_t[start:end] = ids[:-1]
        targets_t[start:end] = ids[1:]
        loss_mask_t[start:end] = mask[1:]
        segment_ids_t[start:end] = k + 1
        positions_t[start:end] = np.arange(n)
        start = end
    return {"tokens": tokens_t, "targets": targets_t, "loss_mask": loss_mask_t,
            "segment_ids": segment_ids_t, "positions": positions_t}


class Packer:
    """An endless iterator of packed batches: dicts of `tokens`, `targets`, `segment_ids`, `positions`
    int32[B, T] and `loss_mask` float32[B, T], B = batch_size // shard_count rows of the global batch
    (rows shard_index * B ... (shard_index + 1) * B - 1), T = seq_len.

    `source` needs only `len()` and `source[i] -> Example`; examples are read and tokenized only as
    rows need them (one example of lookahead). Every shard reads the whole global batch's examples,
    since row boundaries depend on all of them. `get_state()` / `set_state()` save and restore the
    position: a small JSON-serialisable dict, the same on every shard."""

    def __init__(self, source: Any, tokenizer: ChatTokenizer, seq_len: int, batch_size: int, seed: int,
                 *, shard_index: int = 0, shard_count: int = 1):
        if len(source) == 0:
            raise UserError("the training data has no examples")
        if batch_size % shard_count:
            raise UserError(f"train.batch_size = {batch_size} must be a multiple of the number of data "
                            f"shards ({shard_count})")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.source, self.tokenizer, self.seed = source, tokenizer, seed
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rows_per_shard = batch_size // shard_count
        self.shard_index = shard_index
        self.examples_seen = 0  # examples packed into batches so far (global, all shards)
        self.truncated = 0  # of those, how many lost tokens past seq_len + 1
        self.tokens_per_batch = 0  # non-padding positions of the last global batch (all shards)
        self._epoch, self._cursor = 0, 0  # the next example not yet in an emitted row
        self._order = epoch_order(len(source), seed, 0)
        self._peeked: Tokenized | None = None  # the example at the cursor, already tokenized

    # -- state ---------------------------------------------------------------------------------

    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "cursor": self._cursor, "examples_seen": self.examples_seen,
                "truncated": self.truncated, "seed": self.seed, "num_examples": len(self.source)}

    def set_state(self, state: dict[str, int]) -> None:
        saved = (state["seed"], state["num_examples"])
        if saved != (self.seed, len(self.source)):
            raise UserError(f"the saved data position is for seed {saved[0]} over {saved[1]} examples, "
                            f"but this run has seed {self.seed} over {len(self.source)} examples: "
                            "resume with the same data and train.seed, or start a new workdir")
        self._epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
        self.examples_seen, self.truncated = int(state["examples_seen"]), int(state["truncated"])
        self._order = epoch_order(len(self.source), self.seed, self._epoch)
        self._peeked = None

    # -- the stream ----------------------------------------------------------------------------

    def _peek(self) -> Tokenized:
        if self._peeked is None:
            ids, mask = self.tokenizer.encode_chat(self.source[int(self._order[self._cursor])])
            if len(ids) != len(mask) or len(ids) < 2:
                raise ValueError(f"encode_chat returned {len(ids)} ids and {len(mask)} mask values; "
                                 "expected equal lengths of at least 2 (BOS ... EOS)")
            self._peeked = (list(ids), list(mask))
        return self._peeked

    def _advance(self) -> None:
        self._peeked = None
        self._cursor += 1
        if self._cursor == len(self.source):
            self._epoch, self._cursor = self._epoch + 1, 0
            self._order = epoch_order(len(self.source), self.seed, self._epoch)

    def _next_row(self) -> list[Tokenized]:
        """Take examples for one row; the first one that does not fit stays at the cursor."""
        segments: list[Tokenized] = []
        used = 0
        while True:
            ids, mask = self._peek()
            truncated = len(ids) > self.seq_len + 1
            if truncated:  # exactly one full row now, so it never needs a second one
                ids, mask = ids[:self.seq_len + 1], mask[:self.seq_len + 1]
            if segments and used + len(ids) - 1 > self.seq_len:
                return segments
            segments.append((ids, mask))
            used += len(ids) - 1
            self.examples_seen += 1
            self.truncated += truncated
            self._advance()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._next_row() for _ in range(self.batch_size)]
        self.tokens_per_batch = sum(len(ids) - 1 for row in rows for ids, _ in row)
        first = self.shard_index * self.rows_per_shard
        packed = [pack_row(row, self.seq_len, self.tokenizer.pad_id)
                  for row in rows[first:first + self.rows_per_shard]]
        return {key: np.stack([row[key] for row in packed]) for key in packed[0]}
