"""SFT packing against hand-built rows and an independent whole-stream reference packer."""
import json

import numpy as np
import pytest

from moejax.data.example import Example
from moejax.data.packing import Packer, epoch_order, pack_row
from moejax.errors import UserError

PAD, BOS, EOS = 0, 1, 2
MARKER = {"system": 3, "user": 4, "assistant": 5}
CHAR0 = 16  # character c is token ord(c) + CHAR0


class FakeTokenizer:
    """One token per character; role markers; the mask is True on assistant text and the final EOS."""

    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def encode_chat(self, example):
        ids, mask = [BOS], [False]
        for role, text in example.turns:
            ids += [MARKER[role]] + [ord(c) + CHAR0 for c in text]
            mask += [False] + [role == "assistant"] * len(text)
        return ids + [EOS], mask + [example.turns[-1][0] == "assistant"]


def decode(ids):
    return "".join(chr(i - CHAR0) if i >= CHAR0 else f"<{i}>" for i in ids)


def make_source(n, seed=0, long_every=0):
    """n Q/A examples of varied lengths (some longer than a row when long_every > 0)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = f"q{i}" + "x" * int(rng.integers(0, 6))
        a = f"a{i}" + "y" * int(rng.integers(0, 5))
        if long_every and i % long_every == 0:
            a += "z" * 40
        out.append(Example((("user", q), ("assistant", a)), "d"))
    return out


def take(packer, n):
    return [next(packer) for _ in range(n)]


def reference_rows(source, tok, seq_len, seed, n_rows):
    """Independent greedy packer over the whole stream: a list of rows, each a list of id lists."""
    rows, row, used, epoch = [], [], 0, 0
    while len(rows) < n_rows:
        for i in epoch_order(len(source), seed, epoch):
            ids = tok.encode_chat(source[i])[0][:seq_len + 1]
            if used + len(ids) - 1 > seq_len:
                rows.append(row)
                row, used = [], 0
            row.append(ids)
            used += len(ids) - 1
        epoch += 1
    return rows[:n_rows]


def segments_of(row_tokens, row_targets, row_segments):
    """Each segment's full id list: its inputs plus its last target."""
    out = []
    for s in range(1, row_segments.max() + 1):
        where = np.flatnonzero(row_segments == s)
        out.append(list(row_tokens[where]) + [int(row_targets[where[-1]])])
    return out


# ------------------------------------------------------------------------------------------------


def test_pack_row_hand_built():
    a = ([BOS, 10, 11, EOS], [False, False, True, True])
    b = ([BOS, 20, EOS], [False, True, True])
    row = pack_row([a, b], seq_len=7, pad_id=PAD)
    np.testing.assert_array_equal(row["tokens"], [BOS, 10, 11, BOS, 20, PAD, PAD])
    np.testing.assert_array_equal(row["targets"], [10, 11, EOS, 20, EOS, PAD, PAD])
    np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 0])


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    o = epoch_order(50, seed=3, epoch=0)
    assert sorted(o) == list(range(50))
    np.testing.assert_array_equal(o, epoch_order(50, seed=3, epoch=0))
    assert not np.array_equal(o, epoch_order(50, seed=3, epoch=1))
    assert not np.array_equal(o, epoch_order(50, seed=4, epoch=0))
    assert sorted(epoch_order(50, seed=-1, epoch=0)) == list(range(50))


def test_shapes_and_dtypes():
    batch = next(Packer(make_source(20), FakeTokenizer(), seq_len=32, batch_size=4, seed=0))
    assert set(batch) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
    for key, array in batch.items():
        assert array.shape == (4, 32), key
        assert array.dtype == (np.float32 if key == "loss_mask" else np.int32), key


def test_matches_reference_stream_over_epochs():
    source, tok, seq_len = make_source(13), FakeTokenizer(), 24
    packer = Packer(source, tok, seq_len, batch_size=3, seed=5)
    batches = take(packer, 8)  # 24 rows: several epochs of 13 examples
    want = reference_rows(source, tok, seq_len, seed=5, n_rows=24)
    got = [segments_of(b["tokens"][r], b["targets"][r], b["segment_ids"][r])
           for b in batches for r in range(3)]
    assert got == want
    assert packer.examples_seen == sum(len(row) for row in want)


def test_row_invariants():
    source, tok, seq_len = make_source(40, seed=1), FakeTokenizer(), 30
    encoded = {tuple(tok.encode_chat(ex)[0]): ex for ex in source}
    for batch in take(Packer(source, tok, seq_len, batch_size=4, seed=2), 6):
        for r in range(4):
            seg, pos = batch["segment_ids"][r], batch["positions"][r]
            tokens, targets, mask = batch["tokens"][r], batch["targets"][r], batch["loss_mask"][r]
            n_used = int((seg > 0).sum())
            # Segments are 1, 2, ... in order, then padding only at the end of the row.
            assert np.all(seg[:n_used] > 0) and np.all(seg[n_used:] == 0)
            assert np.all(np.diff(seg[:n_used]) >= 0) and np.all(np.diff(seg[:n_used]) <= 1)
            assert seg[0] == 1
            # Padding: pad tokens, no loss.
            assert np.all(tokens[n_used:] == PAD) and np.all(targets[n_used:] == PAD)
            assert np.all(mask[n_used:] == 0) and np.all(pos[n_used:] == 0)
            for s in range(1, seg.max() + 1):
                where = np.flatnonzero(seg == s)
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                # Targets are the next input within the segment; the last one is the example's EOS.
                np.testing.assert_array_equal(targets[where[:-1]], tokens[where[1:]])
                assert tokens[where[0]] == BOS and targets[where[-1]] == EOS
                # Whole examples only: the segment is exactly one encoded example of the source.
                full = tuple(tokens[where]) + (int(targets[where[-1]]),)
                example = encoded[full]
                # The loss covers exactly the assistant's answer and the EOS after it.
                trained = targets[where][mask[where] == 1]
                assert decode(trained[:-1]) == example.turns[-1][1] and trained[-1] == EOS


def test_greedy_next_example_did_not_fit():
    source, tok, seq_len = make_source(30, seed=2), FakeTokenizer(), 28
    batches = take(Packer(source, tok, seq_len, batch_size=5, seed=0), 4)
    segs = np.concatenate([b["segment_ids"] for b in batches])
    for r in range(len(segs) - 1):
        used = int((segs[r] > 0).sum())
        first_next = int((segs[r + 1] == 1).sum())
        assert used + first_next > seq_len, f"row {r} had room for the next row's first example"


def test_truncation_counted_and_row_full():
    source, tok, seq_len = make_source(12, long_every=4), FakeTokenizer(), 24  # examples 0, 4, 8 long
    long_ids = {tuple(tok.encode_chat(source[i])[0][:seq_len + 1]) for i in (0, 4, 8)}
    packer = Packer(source, tok, seq_len, batch_size=2, seed=0)
    seen_long = 0
    while packer.examples_seen < len(source):  # at least the whole first epoch
        batch = next(packer)
        for r in range(2):
            for ids in segments_of(batch["tokens"][r], batch["targets"][r], batch["segment_ids"][r]):
                if len(ids) == seq_len + 1:
                    assert tuple(ids) in long_ids
                    assert batch["segment_ids"][r].max() == 1  # a truncated example fills its row
                    seen_long += 1
    assert seen_long == packer.truncated
    assert packer.truncated >= 3


def test_tokens_per_batch_counts_non_padding():
    packer = Packer(make_source(20), FakeTokenizer(), seq_len=32, batch_size=4, seed=0)
    batch = next(packer)
    assert packer.tokens_per_batch == int((batch["segment_ids"] > 0).sum())


def test_resume_gives_the_same_batches():
    source, tok = make_source(7), FakeTokenizer()
    packer = Packer(source, tok, seq_len=20, batch_size=3, seed=7)
    take(packer, 3)
    state = json.loads(json.dumps(packer.get_state()))  # must survive a JSON checkpoint
    assert state["epoch"] == 1  # resuming in a later epoch needs that epoch's order, not epoch 0's
    want = take(packer, 2)
    resumed = Packer(source, tok, seq_len=20, batch_size=3, seed=7)
    resumed.set_state(state)
    got = take(resumed, 2)
    for w, g in zip(want, got):
        for key in w:
            np.testing.assert_array_equal(w[key], g[key], err_msg=key)
    assert resumed.get_state() == packer.get_state()
    assert resumed.examples_seen == packer.examples_seen and resumed.truncated == packer.truncated


def test_resume_rejects_other_seed():
    source, tok = make_source(11), FakeTokenizer()
    state = Packer(source, tok, seq_len=20, batch_size=3, seed=7).get_state()
    with pytest.raises(UserError, match="seed"):
        Packer(source, tok, seq_len=20, batch_size=3, seed=8).set_state(state)


def test_shards_together_are_the_global_batch():
    source, tok = make_source(17), FakeTokenizer()
    whole = Packer(source, tok, seq_len=24, batch_size=4, seed=1)
    shards = [Packer(source, tok, seq_len=24, batch_size=4, seed=1, shard_index=i, shard_count=2)
              for i in range(2)]
    for _ in range(4):
        want = next(whole)
        parts = [next(s) for s in shards]
        for key in want:
            assert parts[0][key].shape == (2, 24)
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key], err_msg=key)
        assert shards[0].get_state() == shards[1].get_state() == whole.get_state()


def test_batch_size_must_divide_over_shards():
    with pytest.raises(UserError, match="batch_size = 5"):
        Packer(make_source(4), FakeTokenizer(), 16, batch_size=5, seed=0, shard_index=0, shard_count=2)


def test_reads_lazily():
    class CountingSource:
        def __init__(self, n):
            self.examples, self.reads = make_source(n), 0

        def __len__(self):
            return len(self.examples)

        def __getitem__(self, i):
            self.reads += 1
            return self.examples[i]

    source = CountingSource(10_000)
    packer = Packer(source, FakeTokenizer(), seq_len=32, batch_size=2, seed=0)
    next(packer)
    assert source.reads == packer.examples_seen + 1  # what the batch holds, plus the one peeked at


def test_background_workers_give_the_same_stream_and_resume():
    """Read-ahead threads (grain) change nothing: same batches, same state, exact resume mid-epoch."""
    source, tok = make_source(23, seed=3), FakeTokenizer()
    plain = Packer(source, tok, seq_len=20, batch_size=3, seed=4)
    ahead = Packer(source, tok, seq_len=20, batch_size=3, seed=4, workers=2, prefetch=5)
    for _ in range(9):  # several epochs
        want, got = next(plain), next(ahead)
        for key in want:
            np.testing.assert_array_equal(want[key], got[key], err_msg=key)
        assert plain.get_state() == ahead.get_state()
    state = ahead.get_state()
    resumed = Packer(source, tok, seq_len=20, batch_size=3, seed=4, workers=2, prefetch=3)
    resumed.set_state(state)
    for _ in range(3):
        want, got = next(plain), next(resumed)
        np.testing.assert_array_equal(want["tokens"], got["tokens"])


class RefusingTokenizer(FakeTokenizer):
    """Refuses (like a template's raise_exception) conversations whose question contains 'x'."""

    def apply_chat_template(self, messages, add_generation_prompt=False, chat_template=None):
        raise AssertionError("the packer must tokenize with encode_chat, never render on its own")

    def encode_chat(self, messages, chat_template=None):
        from moejax.errors import UserError as Refusal
        if "x" in messages[0]["content"]:
            raise Refusal("Conversation roles must alternate user/assistant/user/assistant/...")
        return FakeTokenizer.encode_chat(self, Example(tuple((m["role"], m["content"]) for m in messages)))


def test_refused_conversations_are_counted_and_never_packed(monkeypatch):
    from moejax.data import chat
    from moejax.errors import UserError as Refusal
    monkeypatch.setattr(chat, "_refusal_types", lambda: (Refusal,))
    source, tok = make_source(15, seed=0), RefusingTokenizer()
    refused = sum("x" in ex.turns[0][1] for ex in source)
    assert 0 < refused < 15
    packer = Packer(source, tok, seq_len=24, batch_size=2, seed=0, workers=2)
    packed = []
    while packer.get_state()["epoch"] == 0:
        b = next(packer)
        for r in range(2):
            packed += segments_of(b["tokens"][r], b["targets"][r], b["segment_ids"][r])
    assert all(MARKER["user"] in ids and "x" not in decode(ids) for ids in packed)
    state = packer.get_state()
    assert state["skipped"] >= refused  # a whole epoch went by: each refused example counted once
    assert state["skipped"] == sum(state["skip_reasons"].values())
    assert list(state["skip_reasons"]) == ["Conversation roles must alternate user/assistant/user/assistant/..."]


def test_all_refused_is_an_error(monkeypatch):
    from moejax.data import chat
    from moejax.errors import UserError as Refusal
    monkeypatch.setattr(chat, "_refusal_types", lambda: (Refusal,))
    source = [Example((("user", "x"), ("assistant", "y")))] * 3
    with pytest.raises(UserError, match="refuses every example"):
        next(Packer(source, RefusingTokenizer(), seq_len=24, batch_size=2, seed=0))
