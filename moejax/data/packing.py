"""SFT packing: tokenized conversations packed greedily into fixed-size rows, deterministic and resumable.

The stream of rows is a pure function of (source, tokenizer, seq_len, seed): each epoch walks a
permutation of the source drawn from (seed, epoch); examples fill a row in that order until the next
one does not fit, which then starts the next row (examples are never split; longer ones are truncated).
Every consecutive `batch_size` rows form one global batch. Each data shard walks the same stream and
keeps its own rows, so the iterator state (epoch, cursor) is the same on every shard.

Reading and tokenizing (the costly part: JSON, chat template, tokenizer) run ahead of the packer in
`workers` background threads (grain's `MapDataset.to_iter_dataset` over the epoch's order, at most
`prefetch` examples ahead, so memory stays bounded and the first batch waits only for its own
examples). Packing itself stays here, in order: its whole state is (epoch, cursor), a few integers,
so resuming is exact however far the workers had read ahead. A conversation the chat template
refuses is skipped and counted by reason (`skipped`, `skip_reasons`, saved with the position).
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from moejax.data.chat import ChatEncoder, Skip, Tokenized
from moejax.errors import UserError


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

    def __init__(self, source: Any, tokenizer: Any, seq_len: int, batch_size: int, seed: int,
                 *, shard_index: int = 0, shard_count: int = 1, workers: int = 0, prefetch: int = 256,
                 chat_template: str | None = None):
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
        self.encode = ChatEncoder(tokenizer, chat_template) if tokenizer is not None else None
        self.workers, self.prefetch = workers, prefetch
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rows_per_shard = batch_size // shard_count
        self.shard_index = shard_index
        self.examples_seen = 0  # examples packed into batches so far (global, all shards)
        self.truncated = 0  # of those, how many lost tokens past seq_len + 1
        self.tokens_per_batch = 0  # non-padding positions of the last global batch (all shards)
        self.skipped = 0  # examples the chat template refused (counted, never trained on)
        self.skip_reasons: dict[str, int] = {}
        self._epoch, self._cursor = 0, 0  # the next example not yet in an emitted row
        self._order = epoch_order(len(source), seed, 0)
        self._peeked: Tokenized | None = None  # the example at the cursor, already tokenized
        self._ahead: Iterator[Tokenized | Skip] | None = None  # the workers' stream from the cursor

    # -- state ---------------------------------------------------------------------------------

    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "cursor": self._cursor, "examples_seen": self.examples_seen,
                "truncated": self.truncated, "seed": self.seed, "num_examples": len(self.source),
                "skipped": self.skipped, "skip_reasons": dict(self.skip_reasons)}

    def set_state(self, state: dict[str, int]) -> None:
        saved = (state["seed"], state["num_examples"])
        if saved != (self.seed, len(self.source)):
            raise UserError(f"the saved data position is for seed {saved[0]} over {saved[1]} examples, "
                            f"but this run has seed {self.seed} over {len(self.source)} examples: "
                            "resume with the same data and train.seed, or start a new workdir")
        self._epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
        self.examples_seen, self.truncated = int(state["examples_seen"]), int(state["truncated"])
        self.skipped = int(state.get("skipped", 0))  # absent in checkpoints of older runs
        self.skip_reasons = {str(k): int(v) for k, v in state.get("skip_reasons", {}).items()}
        self._order = epoch_order(len(self.source), self.seed, self._epoch)
        self._peeked, self._ahead = None, None

    # -- the stream ----------------------------------------------------------------------------

    def _stream(self) -> Iterator[Tokenized | Skip]:
        """The tokenized examples of this epoch from the cursor on, read ahead by the workers."""
        order, source, encode = self._order, self.source, self.encode  # this epoch's, for the workers

        def encoded(position: int) -> Tokenized | Skip:
            return encode(source[int(order[position])])

        if not self.workers:
            return (encoded(p) for p in range(self._cursor, len(self.source)))
        import grain

        ds = grain.MapDataset.range(self._cursor, len(self.source)).map(encoded)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=self.workers,
                                                         prefetch_buffer_size=self.prefetch)))

    def _peek(self) -> Tokenized:
        """The next example to pack; refused ones are counted and stepped over."""
        refused_in_a_row = 0
        while self._peeked is None:
            if self._ahead is None:
                self._ahead = self._stream()
            item = next(self._ahead)
            if isinstance(item, Skip):
                self.skipped += 1
                self.skip_reasons[item.reason] = self.skip_reasons.get(item.reason, 0) + 1
                self._advance()
                refused_in_a_row += 1
                # 2n - 1 positions in a row hold one whole epoch: none of its examples is usable.
                if refused_in_a_row >= 2 * len(self.source) - 1:
                    raise UserError(f"the chat template refuses every example: {self.skip_reasons}")
                continue
            self._peeked = item
        return self._peeked

    def _advance(self) -> None:
        self._peeked = None
        self._cursor += 1
        if self._cursor == len(self.source):
            self._epoch, self._cursor = self._epoch + 1, 0
            self._order = epoch_order(len(self.source), self.seed, self._epoch)
            self._ahead = None

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
