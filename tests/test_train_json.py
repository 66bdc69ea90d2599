"""End to end: a tiny model trained from a `json:` array (OpenHermes-shaped, pretty-printed), with
read-ahead workers, stopped and resumed: the same losses as never stopping; then `preview`."""
import json
import os

import pytest

from moejax import config
from moejax.train import train

TINY_RUN = [
    "model.vocab_size=320", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.d_ff=64", "model.moe.num_experts=4", "model.moe.top_k=2",
    "model.moe.d_expert=32", "model.moe.tile_size=32", "data.seq_len=64", "data.eval_questions=0",
    "data.workers=2", "data.prefetch=8", "train.batch_size=4", "train.lr=3e-3",
    "train.warmup_steps=2", "train.log_every=1", "train.eval_every=100", "train.save_every=3",
]


def conversation(i):
    turns = [{"from": "human", "value": f"What is {i} + {i % 7}?", "weight": None},
             {"from": "gpt", "value": str(i + i % 7), "weight": None}]
    if i % 4 == 0:
        turns.insert(0, {"from": "system", "value": "Answer with a number.", "weight": None})
    return {"conversations": turns, "source": "sums", "title": None, "id": None}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("json") / "chat.json"
    path.write_text(json.dumps([conversation(i) for i in range(120)], indent=2))
    return str(path)


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run(data_file, workdir, steps, cache):
    return train(config.load(None, TINY_RUN + [f"data.source=json:{data_file}", f"data.cache_dir={cache}",
                                               f"train.workdir={workdir}", f"train.steps={steps}"]))


def test_json_array_training_resumes_exactly(data_file, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    straight = str(tmp_path / "straight")
    run(data_file, straight, 6, cache)
    assert os.listdir(os.path.join(cache, "index"))  # the index was cached

    stopped = str(tmp_path / "stopped")
    run(data_file, stopped, 3, cache)
    assert sorted(losses(stopped)) == [1, 2, 3]
    run(data_file, stopped, 6, cache)  # the same run, longer: resumes from the step-3 checkpoint
    want, got = losses(straight), losses(stopped)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert got[6] < got[1]

    # preview reads the same config and the run's tokenizer.
    from moejax.data.preview import main
    capsys.readouterr()
    main(["preview", "--set", f"data.source=json:{data_file}", "--set", f"data.cache_dir={cache}",
          "--set", f"train.workdir={stopped}", "--set", "data.seq_len=16", "-n", "1"])
    out = capsys.readouterr().out
    assert "--- example 0 of 114" in out and "\u27e60<|end|>" in out.replace("\n", "")
    assert "totals over 114 of 114 training conversations" in out
    assert "conversations 114 |" in out and "skipped 0" in out
    assert "truncated at seq_len 16: " in out
