"""How the MoE block's time splits between the all-to-all and the rest under expert parallelism.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/expert_parallel.py \
        [--expert 8] [--tokens 4096] [--dispatch capacity] [--repeats 10] \
        [--ep-exchange padded|ragged] [--a2a-local-size G] [--ratio]

Times a jitted forward+backward of one MoEBlock inside the trainer's mesh context (the shard_map
path), twice: as it is, and with `jax.lax.all_to_all` replaced by an identity of the same shape
(every device then runs its experts on its own buffers: the same FLOPs, no exchange). The
difference is the time of the all-to-alls; the rest is routing, buffers and expert compute.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import config, parallel
from moejax.model.moe import MoEBlock


def time_block(cfg, mesh, repeats: int) -> float:
    block = MoEBlock(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(block)

    def loss(params, x):
        out = nnx.merge(graphdef, params)(x)
        return jnp.sum(out.y * out.y)

    with parallel.use_mesh(mesh):
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        b = cfg.train.batch_size
        x = jax.random.normal(jax.random.key(0), (b, cfg.data.seq_len, cfg.model.d_model))
        x = jax.device_put(x, parallel.batch_sharding(mesh))
        jax.block_until_ready(step(params, x))
        jax.block_until_ready(step(params, x))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, x))
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--expert", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096, help="tokens in the global batch")
    p.add_argument("--dispatch", default="capacity", choices=("capacity", "dropless"))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ep-exchange", default="padded", choices=("padded", "ragged"))
    p.add_argument("--a2a-local-size", type=int, default=0)
    p.add_argument("--ratio", action="store_true",
                   help="time capacity (1.25), dropless padded and dropless ragged side by side "
                        "(alternating rounds) and print each dropless/capacity ratio")
    args = p.parse_args()
    if args.ratio:
        return ratio(args)
    n = jax.device_count()
    cfg = config.load(None, [
        "model.d_model=256", "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.d_expert=512",
        f"model.moe.dispatch={args.dispatch}", "model.moe.capacity_factor=1.25",
        f"mesh.expert={args.expert}", "mesh.data=-1", f"train.batch_size={n}",
        f"data.seq_len={args.tokens // n}", f"model.moe.ep_exchange={args.ep_exchange}",
        f"model.moe.a2a_local_size={args.a2a_local_size}"])
    mesh = parallel.make_mesh(cfg)
    with_exchange = time_block(cfg, mesh, args.repeats)
    real = jax.lax.all_to_all
    jax.lax.all_to_all = lambda x, *a, **k: x  # same shapes (split_axis == concat_axis), no exchange
    try:
        without = time_block(cfg, mesh, args.repeats)
    finally:
        jax.lax.all_to_all = real
    share = (with_exchange - without) / with_exchange
    print(f"devices={n} mesh={dict(mesh.shape)} dispatch={args.dispatch} tokens={args.tokens} "
          f"E=8 k=2 d_model=256 d_expert=512")
    print(f"MoE block fwd+bwd: {1e3 * with_exchange:.1f} ms; without the all-to-alls: "
          f"{1e3 * without:.1f} ms; all-to-all share: {100 * share:.1f}%")


def ratio(args) -> None:
    """Step time of dropless EP (padded and ragged exchange) against capacity-1.25 EP, measured in
    alternating rounds so a shared machine's load hits all variants alike."""
    n = jax.device_count()
    base = ["model.d_model=256", "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.d_expert=512",
            "model.moe.capacity_factor=1.25", f"mesh.expert={args.expert}", "mesh.data=-1",
            f"train.batch_size={n}", f"data.seq_len={args.tokens // n}"]
    variants = {"capacity": ["model.moe.dispatch=capacity"],
                "dropless_padded": ["model.moe.dispatch=dropless", "model.moe.ep_exchange=padded"],
                "dropless_ragged": ["model.moe.dispatch=dropless", "model.moe.ep_exchange=ragged"]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):
        for name, sets in variants.items():
            cfg = config.load(None, base + sets)
            times[name].append(time_block(cfg, parallel.make_mesh(cfg), args.repeats))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"devices={n} expert={args.expert} tokens={args.tokens} E=8 k=2 d_model=256 d_expert=512, "
          "MoE block fwd+bwd, median of 3 alternating rounds:")
    for k, v in med.items():
        print(f"  {k}: {1e3 * v:.1f} ms  (x{v / med['capacity']:.2f} of capacity)")


if __name__ == "__main__":
    main()
