"""A json: array through a Hugging Face tokenizer directory and its own chat template into packed rows:
every packed conversation's ids and loss mask are transformers' (tests/fixtures/tokenizers/expected.json,
written by transformers), and a conversation the template refuses is skipped and counted."""
import json
import os

import numpy as np
import pytest

from moejax import config
from moejax.data import open_source
from moejax.data.pipeline import make_packer
from moejax.tokenizer import load

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers")
EXPECTED = json.load(open(os.path.join(FIXTURES, "expected.json"), encoding="utf-8"))
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(messages):
    return {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"], "weight": None}
                              for m in messages], "title": None}


def rows_of(batch):
    """Each packed segment as (ids, mask): inputs plus the last target; mask of the targets."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            ids = list(batch["tokens"][r][where]) + [int(batch["targets"][r][where[-1]])]
            out.append((ids, [int(m) for m in batch["loss_mask"][r][where]]))
    return out


@pytest.mark.parametrize("name, refused", [("llama3", False), ("mistral", True)])
def test_packed_rows_are_transformers_ids_and_masks(tmp_path, name, refused):
    chats = ["single", "system", "multi", "bad_roles"]
    records = [sharegpt(EXPECTED["chats"][c]) for c in chats] * 5  # 20: the last one is held out
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    cfg = config.load(None, [f"data.source=json:{path}", f"data.cache_dir={tmp_path / 'cache'}",
                             "data.seq_len=256", "train.batch_size=2", "data.workers=2"])
    tok = load(os.path.join(FIXTURES, name))
    source = open_source(cfg.data.source, "train", cfg.data)
    packer = make_packer(cfg, source, tok)
    want = {}
    for c in chats:
        exp = EXPECTED["dirs"][name]["chats"][c]
        if "ids" in exp:
            want[tuple(exp["ids"])] = exp["mask"][1:]
    seen = set()
    while packer.get_state()["epoch"] == 0:
        for ids, mask in rows_of(next(packer)):
            assert tuple(ids) in want, f"{name}: a packed conversation that transformers does not produce"
            assert mask == want[tuple(ids)]
            seen.add(tuple(ids))
    assert seen == set(want)
    state = packer.get_state()
    if refused:  # 'bad_roles' (user, user, assistant): the template's raise_exception, counted
        assert state["skipped"] >= 4 and len(state["skip_reasons"]) == 1
        assert "alternate" in next(iter(state["skip_reasons"]))
    else:
        assert state["skipped"] == 0
