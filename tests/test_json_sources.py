"""json: (one JSON array), parquet: and hf: sources: records as the file holds them, byte offsets in
errors, the cached index, format detection shared with jsonl."""
import json
import os

import pytest

from moejax import config
from moejax.data import json_array, open_source
from moejax.data.example import Example
from moejax.data.formats import FORMATS
from moejax.data.json_array import JsonArraySource
from moejax.data.parquet import ParquetSource
from moejax.errors import UserError


def openhermes_record(i):
    """The shape of an OpenHermes-2.5 record: null keys, `weight`, a system turn on some."""
    turns = [{"from": "human", "value": f"Question {i}: naïve «ü» 日本\n\"quoted\" \\ [x] {{y}}",
              "weight": None},
             {"from": "gpt", "value": f"Answer {i}", "weight": None}]
    if i % 3 == 0:
        turns.insert(0, {"from": "system", "value": "You are helpful.", "weight": None})
    return {"custom_instruction": None, "topic": None, "model_name": None, "model": None,
            "skip_prompt_formatting": False, "category": "orca", "conversations": turns,
            "views": None, "source": "airoboros2.2", "title": None, "avatarUrl": None, "idx": None,
            "hash": None, "id": None, "language": None, "system_prompt": None, "domain": None}


RECORDS = [openhermes_record(i) for i in range(40)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write(tmp_path, text, name="d.json"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


@pytest.mark.parametrize("indent", [None, 4])
@pytest.mark.parametrize("chunk", [7, 1 << 24])  # records straddling every read boundary, or none
def test_json_array_random_access(tmp_path, cache, monkeypatch, indent, chunk):
    monkeypatch.setattr(json_array, "CHUNK", chunk)
    path = write(tmp_path, "\ufeff" + json.dumps(RECORDS, indent=indent, ensure_ascii=False))
    src = JsonArraySource(path)
    assert (len(src), src.format, src.records, src.cached) == (40, "sharegpt", 40, False)
    for i in [39, 0, 17, 3]:
        assert src.raw(i) == RECORDS[i]
        assert src[i] == FORMATS.get("sharegpt")(RECORDS[i])
    assert src[3].turns[0] == ("system", "You are helpful.")
    again = JsonArraySource(path)  # the index comes from the cache this time
    assert again.cached and again[21] == src[21]


def test_index_cache_follows_the_file(tmp_path, cache):
    path = write(tmp_path, json.dumps(RECORDS[:5]))
    assert len(JsonArraySource(path)) == 5
    write(tmp_path, json.dumps(RECORDS[:7]))  # same path, new size and mtime: a new index
    src = JsonArraySource(path)
    assert not src.cached and len(src) == 7


def test_splits_hold_out_the_tail(tmp_path, cache):
    path = write(tmp_path, json.dumps(RECORDS))
    cfg = config.load(None, [f"data.source=json:{path}"]).data
    train, val = open_source(cfg.source, "train", cfg), open_source(cfg.source, "validation", cfg)
    assert (len(train), len(val)) == (38, 2)
    assert val[1].turns[-1] == ("assistant", "Answer 39")


@pytest.mark.parametrize("text, needle", [
    ('{"conversations": []}\n', "byte 0: expected a JSON array ('['), found '{' (one JSON object per line is a jsonl: source)"),
    ("   ", "the file is empty"),
    ('[{"text": "a"}, {"text": "b"', "truncated at byte 28: record 1 (from byte 16) never ends"),
    ('[{"text": "a"},\n {"text": "b"}', "truncated at byte 30: the array is not closed after 2 records"),
    ('[{"text": "a"}, {"text": "b"},]', "byte 30: a ',' after the last record"),
    ('[{"text": "a"} {"text": "b"}]', "byte 15: expected ',' or ']' after record 0"),
    ('[{"text": "a"}, {"text": tru}]', "record 1 (from byte 16): invalid JSON: Expecting value (byte 25)"),
    ('[{"text": "a"}] x', "byte 16: data after the end of the array"),
    ('[{"text": "a"}, {"text": "line\nbreak"}]', "record 1 (from byte 16): invalid JSON: Invalid control character (byte 30)"),
])
def test_malformed_json_names_the_byte(tmp_path, cache, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        JsonArraySource(path)
    assert str(e.value).startswith(f"{path}: ") and needle in str(e.value), str(e.value)


def test_not_utf8(tmp_path, cache):
    path = write(tmp_path, b'[{"text": "a"}, {"text": "\xff"}]')
    src = JsonArraySource(path)
    with pytest.raises(UserError, match=r"record at byte 16: byte 26 is not UTF-8"):
        src[1]


def test_record_without_assistant_turn(tmp_path, cache):
    bad = {"conversations": [{"from": "human", "value": "hi"}]}
    text = json.dumps([RECORDS[0], RECORDS[1], bad, RECORDS[2]], ensure_ascii=False)
    path = write(tmp_path, text)
    start = len(text[:text.index('{"conversations": [{"from": "human", "value": "hi"}]}')].encode())
    with pytest.raises(UserError) as e:
        JsonArraySource(path)
    assert str(e.value).startswith(f"{path}: record 2 (byte {start}): 'conversations' has no "
                                   "assistant turn to train on")
    src = JsonArraySource(path, skip_bad_lines=True)  # skipped, and counted with the reason
    assert (len(src), src.records, src.skipped) == (3, 4, 1)
    assert "1 x 'conversations' has no assistant turn" in src.skip_summary
    assert src[2] == FORMATS.get("sharegpt")(RECORDS[2])


def test_missing_file(tmp_path, cache):
    with pytest.raises(UserError, match="does not exist"):
        JsonArraySource(str(tmp_path / "nope.json"))


# ------------------------------------------------------------------------------------- parquet


def write_parquet(path, rows, row_group_size):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def test_parquet_glob_over_row_groups(tmp_path, cache):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "domain": f"d{i % 2}", "extra": i} for i in range(25)]
    write_parquet(tmp_path / "train-0.parquet", rows[:10], 3)
    write_parquet(tmp_path / "train-1.parquet", rows[10:], 4)
    src = ParquetSource(str(tmp_path / "train-*.parquet"))
    assert (len(src), src.format) == (25, "messages")
    for i in [24, 0, 11, 9, 10, 3]:
        assert src[i] == Example((("user", f"q{i}"), ("assistant", f"a{i}")), f"d{i % 2}")
    assert "extra" not in src.raw(5)  # only the columns the format needs are read
    import pickle
    assert pickle.loads(pickle.dumps(src))[13] == src[13]


def test_parquet_without_expected_columns(tmp_path, cache):
    write_parquet(tmp_path / "x.parquet", [{"prompt": "p", "answer": "a"}], 10)
    with pytest.raises(UserError) as e:
        ParquetSource(str(tmp_path / "x.parquet"))
    assert str(e.value).startswith(f"{tmp_path / 'x.parquet'}: the parquet columns ['prompt', 'answer'] "
                                   "have none of the expected ones: conversations (sharegpt)")
    write_parquet(tmp_path / "y.parquet", [{"instruction": "p"}], 10)
    with pytest.raises(UserError, match="no column 'output', which data.format 'alpaca' needs"):
        ParquetSource(str(tmp_path / "y.parquet"), format="alpaca")


def test_parquet_bad_record_names_the_row(tmp_path, cache):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]
    write_parquet(tmp_path / "z.parquet", rows, 10)
    with pytest.raises(UserError, match=r"row 1 of row group 0 \(record 1\): 'output' must be a string"):
        ParquetSource(str(tmp_path / "z.parquet"))


# ------------------------------------------------------------------------------------- hf cache


def test_hf_finds_the_snapshot_offline(tmp_path, cache, monkeypatch):
    repo = tmp_path / "hub" / "datasets--teknium--OpenHermes-2.5"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snap / "openhermes2_5.json").write_text(json.dumps(RECORDS, indent=2))
    (snap / "README.md").write_text("# card")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = config.load(None, ["data.source=hf:teknium/OpenHermes-2.5"]).data
    train = open_source(cfg.source, "train", cfg)
    assert len(train) == 38 and train[5] == FORMATS.get("sharegpt")(RECORDS[5])
    # Parquet shards of another dataset: only the train files.
    other = tmp_path / "hub" / "datasets--org--chat" / "snapshots" / "r1" / "data"
    other.mkdir(parents=True)
    rows = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(30)]
    write_parquet(other / "train-00000-of-00002.parquet", rows[:15], 5)
    write_parquet(other / "train-00001-of-00002.parquet", rows[15:], 5)
    write_parquet(other / "test-00000-of-00001.parquet", [{"instruction": "t", "output": "t"}], 5)
    cfg = config.load(None, ["data.source=hf:org/chat"]).data
    train = open_source(cfg.source, "train", cfg)
    assert len(train) == 29 and train[20].turns[0] == ("user", "i20")
    with pytest.raises(UserError, match="hf:ORG/NAME"):
        open_source("hf:nonsense", "train", cfg)
