"""moejax.bench: the figures it reports agree with each other and with independent ones (the FLOP
count, XLA's memory analysis, the planner), the JSON contract holds, all-to-all is measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moejax import bench, config, flops, plan
from moejax.errors import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.vocab_size=1024", "model.d_model=128", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2",
        "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_expert=256", "model.moe.tile_size=64",
        "train.batch_size=8", "data.seq_len=128", "mesh.data=1"]
KEYS = ("tokens_per_sec", "step_time_s", "tflops_per_device", "mfu", "peak_memory_bytes", "backend",
        "device_kind", "num_devices")


def args(sets):
    return [a for s in sets for a in ("--set", s)]


def test_bench_json_figures_are_consistent(capsys):
    assert bench.main(args(TINY) + ["--steps", "2", "--warmup", "1", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) > 3 and out[0].startswith("bench:")  # progress lines first ...
    r = json.loads(out[-1])                                 # ... the JSON object last
    assert all(k in r for k in KEYS)
    assert (r["backend"], r["num_devices"], r["all_to_all_share"]) == ("cpu", 1, None)
    tokens = 8 * 128
    assert r["step_time_min_s"] <= r["step_time_s"] <= r["step_time_max_s"]
    assert abs(r["tokens_per_sec"] * r["step_time_s"] - tokens) < 1e-6 * tokens
    cfg = config.load(None, TINY)
    model_flops = flops.train_flops_per_token(cfg.model, 128) * tokens  # 6 N_active + attention
    assert abs(r["tflops_per_device"] * 1e12 * r["step_time_s"] / model_flops - 1) < 1e-9
    assert abs(r["mfu"] - r["tflops_per_device"] / r["peak_tflops"]) < 1e-12 and 0 < r["mfu"] < 1
    # CPU keeps no device memory statistics: the figure is XLA's analysis of the compiled step ...
    mem = r["compiled_memory"]
    assert r["peak_memory_bytes"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    # ... at least the donated state (parameters + Adam moments), and within 10% of the planner's (1.06, 2026-12-07).
    one = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    state = plan.state_bytes(cfg, one)
    assert r["peak_memory_bytes"] > state["params"] + state["optimizer"]
    estimate = plan.memory(plan.for_platform(cfg, "cpu"), one)["per_device_bytes"]["total"]
    assert abs(estimate / r["peak_memory_bytes"] - 1) <= 0.10, (estimate, mem)


def test_all_to_all_share_is_measured_with_an_expert_axis():
    from tests.test_plan import simulated_mesh_run  # one subprocess with 8 simulated devices for both

    r = next(row["bench"] for row in simulated_mesh_run() if "bench" in row)
    assert r["num_devices"] == 8 and r["mesh"]["expert"] == 4
    assert isinstance(r["all_to_all_share"], float) and -1 < r["all_to_all_share"] < 1
    assert "all_to_all" in r["all_to_all_method"]


def test_bad_input_is_one_line(capsys):
    for bad, name in ((["--steps", "0"], "--steps"), (args(["model.moe.topk=2"]), "model.moe.top_k")):
        with pytest.raises(SystemExit) as exit_:
            run_cli(lambda: bench.main(bad))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.strip().count("\n") == 0 and name in err
