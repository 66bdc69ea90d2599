"""Run by tests/test_plan.py in a subprocess with simulated CPU devices (XLA_FLAGS set first).

For each case (config overrides and a mesh): XLA's compiled memory analysis of the real jitted train
step (the trainer's sharded state, shardings and donation), per device, against `moejax.plan`'s
estimate for the same config and mesh, and the real per-device bytes of the sharded parameters.
Prints one JSON object per case. With a second argument (config overrides), also runs
`moejax.bench` on them (2 steps) in the same process and prints its result as {"bench": ...}.
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np

from moejax import bench, config, parallel, plan
from moejax.optim import make_optimizer
from moejax.train import create_sharded_state, jit_train_step

BASE = ["model.vocab_size=1024", "model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=256", "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.d_expert=256",
        "model.moe.tile_size=64", "train.batch_size=16", "data.seq_len=128"]


def shard_bytes(tree) -> int:
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def xla_bytes(cfg, devices) -> tuple[dict, int]:
    mesh = parallel.make_mesh(cfg, devices)
    opt = make_optimizer(cfg.train)
    graphdef, state = create_sharded_state(cfg, mesh, opt)
    batch = parallel.put_batch(bench.synthetic_batch(cfg, 0), mesh)
    with parallel.use_mesh(mesh):
        compiled = jit_train_step(graphdef, opt, cfg, state, mesh).lower(state, batch).compile()
    return bench.compiled_memory_bytes(compiled), shard_bytes(state["params"])


def main() -> None:
    for case in json.loads(sys.argv[1]):
        mesh = case.get("mesh", {"data": 1})
        cfg = config.load(None, BASE + case.get("sets", []) + [f"mesh.{k}={v}" for k, v in mesh.items()])
        n = int(np.prod(list(mesh.values())))
        xla, params = xla_bytes(cfg, jax.devices()[:n])
        est = plan.memory(plan.for_platform(cfg, "cpu"), parallel.mesh_shape(cfg.mesh, n))["per_device_bytes"]
        print(json.dumps({"case": case, "xla": xla["total"], "estimate": est["total"], "parts": est,
                          "params_exact": params}), flush=True)
    if len(sys.argv) > 2:
        cfg = config.load(None, json.loads(sys.argv[2]))
        print(json.dumps({"bench": bench.run(cfg, steps=2, warmup=1, say=lambda m: None)}), flush=True)


if __name__ == "__main__":
    main()
