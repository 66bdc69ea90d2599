"""Dense models -> one model: linear merging and mixing as experts.

- `merge_dense` (Model-GLUE, Zhao et al. 2024, arXiv:2410.05357, its linear/"model soup" merge):
  every parameter the weighted mean of the models' (same architecture, same vocabulary).
- `mix` (Branch-Train-MiX, Sukhbaatar et al. 2024, arXiv:2403.07816; Model-GLUE's mixture): an MoE
  whose experts in every MoE layer are the N models' FFNs, while attention, norms and embeddings
  are the weighted mean. The router starts from each model's mean hidden state at that layer on
  calibration data (unit-normalised: the logit of expert i is <h, mean_i> / |mean_i|), or zero.
  With renormalised top-k a mixture of one model is that model.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from moejax import config as config_lib
from moejax.config import Config, validate
from moejax.errors import UserError

Params = dict


def check_same(cfgs: Sequence[Config], params: Sequence[Params], names: Sequence[str]) -> None:
    """One clear line when the models cannot be combined: an MoE, another architecture, or a
    parameter of another shape."""
    for c, n in zip(cfgs, names):
        if c.model.moe.num_experts:
            raise UserError(f"{n!r} is an MoE (model.moe.num_experts = {c.model.moe.num_experts}); "
                            "mix and merge-dense take dense models")
    ref = config_lib.to_dict(cfgs[0])["model"]
    for c, n in zip(cfgs[1:], names[1:]):
        other = config_lib.to_dict(c)["model"]
        diff = [k for k in ref if ref[k] != other.get(k)]
        if diff:
            raise UserError(f"{n!r} has another architecture than {names[0]!r}: model.{diff[0]} is "
                            f"{other.get(diff[0])!r}, not {ref[diff[0]]!r}")
    flat0 = dict(jax.tree_util.tree_flatten_with_path(params[0])[0])
    for p, n in zip(params[1:], names[1:]):
        for path, x in jax.tree_util.tree_flatten_with_path(p)[0]:
            if path not in flat0 or np.shape(flat0[path]) != np.shape(x):
                raise UserError(f"{n!r}: parameter {jax.tree_util.keystr(path)} has shape {np.shape(x)}, "
                                f"{names[0]!r} {np.shape(flat0.get(path))}")


def normalise_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    w = np.full(n, 1.0 / n) if not weights else np.asarray(weights, np.float64)
    if len(w) != n:
        raise UserError(f"--weights has {len(w)} values for {n} models")
    if (w < 0).any() or w.sum() <= 0:
        raise UserError(f"--weights {list(w)} must be >= 0 with a positive sum")
    return w / w.sum()


def _mean(trees, w):
    return jax.tree.map(lambda *xs: sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, xs)
                                        ).astype(np.asarray(xs[0]).dtype), *trees)


def merge_dense(cfgs, params, weights=None, names=None) -> tuple[Config, Params]:
    names = names or [f"model {i}" for i in range(len(params))]
    check_same(cfgs, params, names)
    return cfgs[0], _mean(params, normalise_weights(weights, len(params)))


def mix(cfgs, params, weights=None, *, top_k: int = 2, router_means: Sequence[Sequence[np.ndarray]] | None = None,
        names=None) -> tuple[Config, Params]:
    """An N-expert MoE from N dense models. `router_means[i][l]`: model i's mean hidden state
    (FFN input) at block l, or None for a zero router."""
    names = names or [f"model {i}" for i in range(len(params))]
    check_same(cfgs, params, names)
    n = len(params)
    w = normalise_weights(weights, n)
    dense = cfgs[0]
    moe = dataclasses.replace(dense.model.moe, num_experts=n, top_k=min(top_k, n),
                              d_expert=dense.model.d_ff, renormalize=True, layer_experts=(),
                              num_shared_experts=0)
    cfg = dataclasses.replace(dense, model=dataclasses.replace(dense.model, moe=moe))
    validate(cfg)
    out = _mean(params, w)
    out["blocks"] = dict(out["blocks"])
    for key in list(out["blocks"]):
        i = int(key)
        if not cfg.model.is_moe_layer(i):
            continue
        ffns = [p["blocks"][key]["ffn"] for p in params]
        if router_means is None:
            router = np.zeros((dense.model.d_model, n), np.float32)
        else:
            cols = [np.asarray(router_means[m][i], np.float64) for m in range(n)]
            router = np.stack([c / max(np.linalg.norm(c), 1e-12) for c in cols], 1).astype(np.float32)
        out["blocks"][key] = {**out["blocks"][key], "ffn": {
            **{k: np.stack([np.asarray(f[k], np.float32) for f in ffns]) for k in ("w_gate", "w_up", "w_down")},
            "router": router, "router_bias": np.zeros((n,), np.float32)}}
    return cfg, out


def ffn_input_means(model, tokens, seg, pos) -> list[np.ndarray]:
    """Per block: the mean over valid tokens of the FFN's input (the normed residual)."""
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tok, sg, ps):
        m = nnx.merge(graphdef, state)
        x = jnp.take(m.embed[...], tok, axis=0).astype(m.dtype)
        valid = (sg != 0)[..., None].astype(jnp.float32)
        means = []
        for blk in m.blocks:
            x = x + blk.attn(blk.attn_norm(x), ps, sg)  # as Block.__call__
            h = blk.ffn_norm(x)
            means.append(jnp.sum(h * valid, (0, 1)) / jnp.maximum(jnp.sum(valid), 1.0))
            x = x + blk.ffn(h)
        return means

    return [np.asarray(m) for m in jax.device_get(run(state, jnp.asarray(tokens), jnp.asarray(seg),
                                                       jnp.asarray(pos)))]
