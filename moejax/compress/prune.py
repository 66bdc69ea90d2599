"""Expert pruning: keep K of each MoE layer's E experts, slicing the router's columns alike.

Which experts stay is a registered `SELECTORS` method:
- `usage`: the K most-used experts on calibration data, usage being the routed weight (the sum of
  the expert's combine weights over the calibration tokens; least-used dropped);
- `reconstruction`: NAEE (Lu et al. 2024, "Not All Experts are Equal", arXiv:2402.14800): per
  layer, given the block's input X and routed output Z on calibration tokens, the K-subset whose
  output with the other experts masked out (the router renormalised over the kept ones) is
  closest to Z in Frobenius norm; exhaustive when C(E, K) <= `EXHAUSTIVE_LIMIT`, else greedy
  (drop, one at a time, the expert whose removal costs least);
- `random`: a seeded random K-subset (the baseline the others must beat).
Shared experts are never pruned. The router over the kept experts is the old router restricted to
them, so with renormalised top-k a pruned layer of identical experts computes what it did before.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.compress.common import Params, block, moe_layers, slice_layer, with_experts
from moejax.config import Config, MoEConfig
from moejax.registry import Registry

EXHAUSTIVE_LIMIT = 200

Selector = Callable[..., list[list[int]]]
SELECTORS: Registry[Selector] = Registry("prune method")


def prune(cfg: Config, params: Params, keep: Sequence[Sequence[int]]) -> tuple[Config, Params]:
    """The model with only experts `keep[j]` (sorted, in their old order) in MoE layer j."""
    layers = moe_layers(cfg)
    assert len(keep) == len(layers), (len(keep), len(layers))
    new_cfg = with_experts(cfg, [len(k) for k in keep])
    out = {**params, "blocks": dict(params["blocks"])}
    key_of = {int(k): k for k in params["blocks"]}
    for i, kept in zip(layers, keep):
        b = dict(block(params, i))
        b["ffn"] = slice_layer(b["ffn"], sorted(int(e) for e in kept))
        out["blocks"][key_of[i]] = b
    return new_cfg, out


@SELECTORS.register("usage")
def by_usage(usage: Sequence[np.ndarray], ks: Sequence[int], **_) -> list[list[int]]:
    """Per layer the K experts of the largest usage (`common.routed_weight`; ties: the lower index)."""
    return [sorted(np.argsort(-np.asarray(u), kind="stable")[:k].tolist()) for u, k in zip(usage, ks)]


@SELECTORS.register("random")
def by_random(num_experts: Sequence[int], ks: Sequence[int], seed: int = 0, **_) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(e, k, replace=False).tolist()) for e, k in zip(num_experts, ks)]


def masked_output_fn(moe_cfg: MoEConfig) -> Callable:
    """jitted (x [N, D], ffn params, keep int[K]) -> the routed output [N, D] of the layer with only
    experts `keep`: what the pruned layer computes."""
    from moejax.model import dispatch as dispatch_lib
    from moejax.model.moe import RouterInputs, routed_experts

    @jax.jit
    def out(x, w, bias, noise_w, wg, wu, wd, keep):
        n = x.shape[0]
        y, *_ = routed_experts(
            x, RouterInputs(w[:, keep], bias[keep], None if noise_w is None else noise_w[:, keep]),
            dispatch_lib.ExpertWeights(wg[keep], wu[keep], wd[keep]), jnp.ones((n,), bool),
            jnp.zeros((n,), jnp.int32), moe_cfg)
        return y
    return out


def reconstruction_error(fn, x, z, ffn: Params, keep: Sequence[int]) -> float:
    y = fn(x, ffn["router"], ffn["router_bias"], ffn.get("router_noise"), ffn["w_gate"], ffn["w_up"],
           ffn["w_down"], jnp.asarray(keep, jnp.int32))
    return float(jnp.sum(jnp.square(y - z)))


def reconstruct_layer(fn, x, z, ffn: Params, e: int, k: int) -> list[int]:
    """NAEE's subset for one layer: argmin over K-subsets of ||Z - Z_S||_F."""
    ffn = {key: (None if v is None else jnp.asarray(v)) for key, v in ffn.items()
           if key in ("router", "router_bias", "router_noise", "w_gate", "w_up", "w_down")}
    x, z = jnp.asarray(x), jnp.asarray(z)
    if math.comb(e, k) <= EXHAUSTIVE_LIMIT:
        best = min(itertools.combinations(range(e), k),
                   key=lambda s: reconstruction_error(fn, x, z, ffn, s))
        return list(best)
    kept = list(range(e))
    while len(kept) > k:  # greedy: drop the expert whose removal hurts least
        kept = min(([c for c in kept if c != d] for d in kept),
                   key=lambda s: reconstruction_error(fn, x, z, ffn, s))
    return kept


@SELECTORS.register("reconstruction")
def by_reconstruction(cfg: Config, params: Params, io: Sequence[tuple[np.ndarray, np.ndarray]],
                      ks: Sequence[int], **_) -> list[list[int]]:
    """NAEE per layer, on each layer's cached (X, Z) of the unpruned model."""
    import dataclasses

    out = []
    for j, (i, (x, z), k) in enumerate(zip(moe_layers(cfg), io, ks)):
        moe = dataclasses.replace(cfg.model.moe, num_experts=k, layer_experts=())
        fn = masked_output_fn(moe)
        out.append(reconstruct_layer(fn, x, z, block(params, i)["ffn"], cfg.model.moe.experts_of(j), k))
    return out
