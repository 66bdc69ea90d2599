"""`moejax.data.open_source`: schemes, JSONL hold-out splits, clear errors."""
import json

import pytest

from moejax import config
from moejax.data import holdout_size, open_source
from moejax.errors import UserError


def data_cfg(source):
    return config.load(None, [f"data.source={source}"]).data


def test_jsonl_holds_out_its_tail_for_validation(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"instruction": f"q{i}", "output": f"a{i}", "domain": "d" + str(i % 2)} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    cfg = data_cfg(f"jsonl:{path}")
    train, val = open_source(cfg.source, "train", cfg), open_source(cfg.source, "validation", cfg)
    assert holdout_size(60) == 3
    assert (len(train), len(val)) == (57, 3)
    assert val[0].turns == (("user", "q57"), ("assistant", "a57")) and val[0].domain == "d1"
    assert train[56].turns[0] == ("user", "q56")
    with pytest.raises(IndexError):
        val[3]


@pytest.mark.parametrize("source,needle", [
    ("moejax_tasks", "SCHEME:REST"),
    ("hf:some/dataset", "not in the local Hugging Face cache"),
    ("parquet:/nonexistent/*.parquet", "/nonexistent/"),
    ("json:/nonexistent/file.json", "/nonexistent/file.json"),
    ("s3:bucket/x", "unknown scheme .s3."),
    ("jsonl:/nonexistent/file.jsonl", "/nonexistent/file.jsonl"),
])
def test_bad_sources_name_themselves(source, needle):
    cfg = data_cfg(source)
    with pytest.raises(UserError, match=needle.replace("/", ".")):
        open_source(cfg.source, "train", cfg)


def test_unknown_split_is_refused(tmp_path):
    cfg = data_cfg("tfds:moejax_tasks")
    with pytest.raises(UserError, match="validation"):
        open_source(cfg.source, "dev", cfg)
