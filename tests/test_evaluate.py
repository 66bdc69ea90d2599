"""`python -m moejax.evaluate`: the command measures what training's own eval measured."""
import json

import pytest

from moejax.metrics import read_metrics
from moejax.train import train
from tests.test_train import cli, run_cfg, tfds_dir  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def tiny_run(tfds_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("evalrun") / "run")
    final = train(run_cfg(tfds_dir, workdir, "train.steps=3", "train.eval_every=3", "train.save_every=3"))
    return workdir, final


def test_evaluate_json_equals_training_eval(tiny_run):
    workdir, final = tiny_run
    proc = cli("moejax.evaluate", "--workdir", workdir, "--json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    got = json.loads(out.strip().splitlines()[-1])
    logged = [r for r in read_metrics(workdir) if "eval_loss" in r][-1]
    assert got["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-5)
    assert got["eval_exact_match"] == pytest.approx(final["eval_exact_match"])


def test_evaluate_without_checkpoint_is_one_line(tiny_run, tmp_path):
    workdir, _ = tiny_run
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text(open(f"{workdir}/config.yaml").read())
    proc = cli("moejax.evaluate", "--workdir", str(empty))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.strip().splitlines() == [err.strip().splitlines()[-1]] and "no checkpoint" in err
