"""Two processes x 4 CPU devices joined by jax.distributed reproduce one process with 8 devices, and
their checkpoint restores in a single-device process."""
import os
import socket
import subprocess
import sys

import pytest

from moejax.metrics import read_metrics
from tests.test_train import REPO, TINY_RUN
from tests.xla import FAST_COMPILE  # the 1- and 2-process runs compile under the same flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(workdir, tfds_dir, *extra):
    sets = TINY_RUN + [f"data.tfds_dir={tfds_dir}", f"train.workdir={workdir}", "mesh.data=2",
                       "mesh.expert=4", "model.moe.num_experts=8", "train.batch_size=8",
                       "train.steps=4", "train.save_every=4", "train.eval_every=100", *extra]
    return [sys.executable, "-m", "moejax.train", "--config", "configs/quickstart.yaml"] + \
        [a for s in sets for a in ("--set", s)]


def env(devices, **extra):
    base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    return {**base, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}", **extra}


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_two_processes_match_one_process_and_restore_on_one_device(tmp_path):
    tfds_dir = str(tmp_path / "tfds")
    one = str(tmp_path / "one")
    proc = subprocess.run(train_cmd(one, tfds_dir), cwd=REPO, env=env(8), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    two = str(tmp_path / "two")
    tokenizer = os.path.join(one, "tokenizer.model")
    port = free_port()
    procs = [subprocess.Popen(train_cmd(two, tfds_dir, f"data.tokenizer={tokenizer}"), cwd=REPO,
                              env=env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                      JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "8 cpu device(s)" in outs[0][0]
    assert "step 4/4" in outs[0][0]
    assert not any(line.startswith(("step ", "model:")) for line in outs[1][0].splitlines()), \
        "only process 0 reports progress"

    want, got = losses(one), losses(two)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    assert os.listdir(os.path.join(two, "checkpoints")) == ["4"]

    # The 2-process checkpoint restores in one process on one device.
    gen = subprocess.run([sys.executable, "-m", "moejax.generate", "--workdir", two, "--prompt",
                          "What is 2 + 3?", "--max-new-tokens", "3"], cwd=REPO, env=env(1),
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("> What is 2 + 3?")
