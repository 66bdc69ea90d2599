"""`python -m moejax.convert import-hf | export-hf`: run directories from and to Hugging Face checkpoints."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from moejax import config, convert
from moejax.data import open_source
from moejax.data.pipeline import iter_texts
from moejax.data.packing import Packer
from moejax.errors import UserError
from moejax.interop import hf, safetensors_io
from moejax.metrics import read_metrics
from moejax.tokenizer import train_tokenizer
from moejax.runs import restore_model
from moejax.train import lm_loss_sum, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = os.path.join(REPO, "tests", "fixtures", "hf", "llama")  # vocab 320, tied embeddings


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The llama fixture imported into a run directory with a small JSONL dataset and tokenizer."""
    root = tmp_path_factory.mktemp("convert")
    data = root / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            f.write(json.dumps({"instruction": f"add {i} and {i + 1}", "output": str(2 * i + 1)}) + "\n")
    sets = [f"data.source=jsonl:{data}", "data.seq_len=32", "data.eval_questions=0", "train.batch_size=2",
            "train.steps=1", "train.log_every=1", "train.warmup_steps=0"]
    cfg = config.load(None, sets)
    tok = root / "spm.model"
    train_tokenizer(iter_texts(open_source(cfg.data.source, "train", cfg.data)), 320, tok)
    workdir = root / "run"
    args = ["import-hf", LLAMA, str(workdir), "--tokenizer", str(tok)]
    args += [a for s in sets for a in ("--set", s)]
    assert convert.main(args) == 0
    return workdir


def fixture_logits():
    return np.load(os.path.join(LLAMA, "input_ids.npy")), np.load(os.path.join(LLAMA, "logits.npy"))


def test_import_hf_then_restore_model_gives_the_same_logits(imported):
    cfg, model, tok = restore_model(str(imported))
    assert cfg.train.workdir == str(imported) and cfg.model.tie_embeddings
    assert os.path.isfile(imported / "tokenizer.model") and tok.vocab_size <= 320
    ids, ref = fixture_logits()
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, t: m(t)[0])(model, ids)), ref, atol=1e-4, rtol=0)


def test_export_hf_writes_the_original_tensors(imported, tmp_path):
    out = tmp_path / "hf"
    args = ["export-hf", str(imported), str(out), "--step", "0", "--max-shard-size", "200KB"]
    assert convert.main(args) == 0
    assert (out / safetensors_io.INDEX).exists() and (out / "tokenizer.model").exists()
    hf_cfg = json.load(open(out / "config.json"))
    assert hf_cfg["model_type"] == "llama" and (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"]) == (2, 3)
    ours, theirs = safetensors_io.Reader(str(out)), safetensors_io.Reader(LLAMA)
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for name in ours.keys():
        np.testing.assert_array_equal(ours.get(name), theirs.get(name), err_msg=name)
    back, _ = hf.from_pretrained(out)  # and it loads again


def test_training_resumes_from_the_imported_weights(imported):
    """The first step's loss is the imported model's loss on the first batch (not a fresh init's)."""
    cfg, model, tok = restore_model(str(imported))
    batch = next(Packer(open_source(cfg.data.source, "train", cfg.data), tok, cfg.data.seq_len,
                        cfg.train.batch_size, cfg.train.seed))
    logits, _ = model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    expected = float(lm_loss_sum(logits, batch["targets"], batch["loss_mask"]) / batch["loss_mask"].sum())
    train(config.load(str(imported / "config.yaml")))
    first = read_metrics(str(imported))[0]
    assert first["step"] == 1
    np.testing.assert_allclose(first["loss"], expected, rtol=1e-4)


def test_bad_inputs(imported, tmp_path):
    with pytest.raises(UserError, match="already holds a run"):
        convert.main(["import-hf", LLAMA, str(imported)])
    with pytest.raises(UserError, match="tokenizer file .*nope.model' does not exist"):
        convert.main(["import-hf", LLAMA, str(tmp_path / "run"), "--tokenizer", str(tmp_path / "nope.model")])
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="is not a moejax run directory"):
        convert.main(["export-hf", str(tmp_path), str(tmp_path / "out")])
    with pytest.raises(UserError, match="model_type 'mixtral' cannot represent this model"):
        convert.main(["export-hf", str(imported), str(tmp_path / "out"), "--model-type", "mixtral"])
    with pytest.raises(UserError, match="no checkpoint at step 7"):
        convert.main(["export-hf", str(imported), str(tmp_path / "out"), "--step", "7"])
    # From the command line: exit code 2 and one line that names the bad path.
    proc = subprocess.run([sys.executable, "-m", "moejax.convert", "import-hf", str(tmp_path / "nope"),
                           str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {str(tmp_path / 'nope')!r} is not a directory "
                                                "(a Hugging Face checkpoint directory is needed)"]
    assert not (tmp_path / "run").exists()
