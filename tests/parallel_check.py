"""Run by tests/test_parallel.py in a subprocess with simulated CPU devices (XLA_FLAGS set first).

For each mesh and dispatch path: a few real train steps (the jitted step the trainer uses, with the
same sharded state creation and batch placement) against the same steps on one device. Prints one
JSON object per case: max relative loss difference, max parameter difference, and the shardings of
a few parameters.
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np

from moejax import config, parallel
from moejax.optim import make_optimizer
from moejax.train import create_sharded_state, make_train_step

BASE = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.d_ff=64", "model.moe.num_experts=8", "model.moe.top_k=2",
        "model.moe.d_expert=16", "model.moe.tile_size=8", "model.moe.capacity_factor=8",
        "model.moe.num_shared_experts=1", "train.batch_size=16", "train.lr=1e-2",
        "train.warmup_steps=0", "data.seq_len=16"]


def batches(n, b, t, vocab=64):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        toks = rng.integers(1, vocab, (b, t)).astype(np.int32)
        seg = np.ones((b, t), np.int32)
        seg[:, t // 2:] = 2  # two packed examples per row
        pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
        out.append({"tokens": toks, "targets": np.roll(toks, -1, 1), "segment_ids": seg,
                    "positions": pos.astype(np.int32),
                    "loss_mask": rng.integers(0, 2, (b, t)).astype(np.float32)})
    return out


def spec(x) -> str:
    """The array's PartitionSpec as a tuple string, trailing unsplit dimensions dropped."""
    s = list(x.sharding.spec)
    while s and s[-1] is None:
        s.pop()
    return str(tuple(s))


def run(cfg, devices, steps=3):
    mesh = parallel.make_mesh(cfg, devices)
    opt = make_optimizer(cfg.train)
    graphdef, state = create_sharded_state(cfg, mesh, opt)
    sh = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(make_train_step(graphdef, opt, cfg), in_shardings=(sh, parallel.batch_sharding(mesh)),
                   out_shardings=(sh, None))
    losses, dropped = [], []
    with parallel.use_mesh(mesh):
        for b in batches(steps, cfg.train.batch_size, cfg.data.seq_len):
            state, m = step(state, parallel.put_batch(b, mesh))
            losses.append(float(m["loss"]))
            dropped.append(float(m["dropped_fraction"]))
    run.dropped = dropped
    return losses, state, step._cache_size()


# Keys that only change how the expert-parallel exchange moves data: not set in the 1-device reference.
EP_ONLY = ("model.moe.a2a_local_size", "model.moe.drop_duplicate_tokens", "model.moe.ep_exchange",
           "model.moe.ep_buffer_factor")


def cases(spec: list[dict]) -> None:
    """Each case {"mesh": {...}, "sets": [...]} against 1 device with the same non-exchange sets."""
    refs: dict = {}
    for case in spec:
        sets = case["sets"]
        ref_sets = tuple(x for x in sets if not x.startswith(EP_ONLY))
        if ref_sets not in refs:
            cfg1 = config.load(None, BASE + list(ref_sets) + ["mesh.data=1"])
            refs[ref_sets] = run(cfg1, jax.devices()[:1])[:2] + (run.dropped,)
        ref_losses, ref_state, ref_dropped = refs[ref_sets]
        m = case["mesh"]
        cfg = config.load(None, BASE + sets + [f"mesh.{k}={v}" for k, v in m.items()])
        losses, state, compiles = run(cfg, jax.devices()[:int(np.prod(list(m.values())))])
        dparam = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                     zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])))
        print(json.dumps({"mesh": m, "sets": sets, "losses": losses, "ref_losses": ref_losses,
                          "dropped": run.dropped, "ref_dropped": ref_dropped,
                          "max_param_diff": dparam, "compiles": compiles}), flush=True)


def main() -> None:
    if sys.argv[1] == "--cases":
        return cases(json.loads(sys.argv[2]))
    meshes = json.loads(sys.argv[1])
    for dispatch in sys.argv[2].split(","):
        cfg1 = config.load(None, BASE + [f"model.moe.dispatch={dispatch}", "mesh.data=1"])
        ref_losses, ref_state, _ = run(cfg1, jax.devices()[:1])
        for m in meshes:
            sets = [f"mesh.{k}={v}" for k, v in m.items()]
            cfg = config.load(None, BASE + [f"model.moe.dispatch={dispatch}"] + sets)
            n = int(np.prod(list(m.values())))
            losses, state, compiles = run(cfg, jax.devices()[:n])
            dparam = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                         zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])))
            blk = state["params"]["blocks"][0]
            print(json.dumps({
                "mesh": m, "dispatch": dispatch, "losses": losses, "ref_losses": ref_losses,
                "max_param_diff": dparam, "compiles": compiles,
                "w_gate": spec(blk["ffn"]["w_gate"][...]),
                "wq": spec(blk["attn"]["wq"][...]),
                "embed": spec(state["params"]["embed"][...]),
                # Adam's moments of w_gate (same shape) must follow its sharding.
                "moments_w_gate": sorted({spec(x) for x in jax.tree.leaves(state["opt_state"])
                                          if x.shape == blk["ffn"]["w_gate"][...].shape}),
            }), flush=True)


if __name__ == "__main__":
    main()
