"""The compression commands end to end on run directories: a trained dense run, upcycled to 8
identical experts by `convert upcycle`, then merged to 2 or pruned to 4 by `moejax.compress`, keeps
its eval loss as `moejax.evaluate` measures it; a teacher with another vocabulary is one clear line."""
import json
import os

import pytest

from moejax import convert, distill
from moejax.compress.__main__ import main as compress
from moejax.errors import UserError
from moejax.evaluate import evaluate_run
from moejax.train import train
from tests.test_train import run_cfg, tfds_dir  # noqa: F401 (fixture)

DENSE = ["model.moe.num_experts=0", "train.steps=4", "train.eval_every=4", "train.save_every=4"]


@pytest.fixture(scope="module")
def runs(tfds_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compress_cli")
    dense = str(root / "dense")
    train(run_cfg(tfds_dir, dense, *DENSE))
    up = str(root / "up8")
    assert convert.main(["upcycle", dense, up, "--experts", "8", "--top-k", "2"]) == 0
    return root, dense, up


@pytest.mark.parametrize("command", [["merge", "--experts", "2", "--method", "mcsmoe"],
                                     ["merge", "--experts", "2", "--method", "average"],
                                     ["prune", "--keep", "4", "--method", "usage"],
                                     ["prune", "--keep", "4", "--method", "reconstruction"],
                                     ["prune", "--keep", "4", "--method", "random"]])
def test_upcycled_then_merged_or_pruned_keeps_the_eval_loss(runs, command):
    root, dense, up = runs
    want = evaluate_run(dense)["eval_loss"]
    assert evaluate_run(up)["eval_loss"] == pytest.approx(want, abs=1e-4)
    out = str(root / "-".join(command[::2]).replace("--", ""))
    assert compress([command[0], up, out, *command[1:], "--tokens", "512"]) == 0
    info = json.load(open(os.path.join(out, "compress.json")))
    if command[0] == "prune":
        assert [len(k) for k in info["kept_experts"]] == [4, 4]
    else:
        assert all(len(set(g)) == 2 for g in info["expert_groups"])
    assert evaluate_run(out)["eval_loss"] == pytest.approx(want, abs=1e-4)


def test_teacher_with_another_vocabulary_is_one_clear_line(runs, tfds_dir):
    root, dense, _ = runs
    cfg = run_cfg(tfds_dir, str(root / "student"), "model.vocab_size=384", f"train.distill.teacher={dense}",
                  "train.distill.alpha=0.5")
    with pytest.raises(UserError, match="vocab_size = 320, the student 384"):
        distill.load_teacher(cfg)
    with pytest.raises(UserError, match="vocab_size = 320, the student 384"):
        train(cfg)
    assert not os.path.exists(root / "student" / "checkpoints")


def test_moe_teacher_distils_into_a_dense_student(runs, tfds_dir):
    """MoE -> dense: the upcycled 8-expert run teaches a dense student (staged: KD for step 0 only)."""
    root, dense, up = runs
    wd = str(root / "dense_student")
    final = train(run_cfg(tfds_dir, wd, *DENSE[:1], "train.steps=2", "train.eval_every=2", "train.save_every=2",
                          f"data.tokenizer={os.path.join(dense, 'tokenizer.model')}",
                          f"train.distill.teacher={up}", "train.distill.alpha=0.5", "train.distill.stop_step=1"))
    assert final["eval_loss"] > 0 and os.path.isdir(os.path.join(wd, "checkpoints"))


def test_domain_the_data_does_not_have_is_one_clear_line(runs):
    root, _, up = runs
    with pytest.raises(UserError, match="--domain 'poetry' is not in the calibration data; its domains are"):
        compress(["extract", up, str(root / "poetry"), "--domain", "poetry", "--keep", "4", "--tokens", "256"])
    assert not os.path.exists(root / "poetry")
