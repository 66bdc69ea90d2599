"""Expert merging, MC-SMoE (Li et al., ICLR 2024, "Merge, Then Compress", arXiv:2310.01334).

1. Dominant experts: per layer the K most used on calibration data.
2. Grouping: every other expert joins the dominant expert whose router column (its logit
   direction, [D]) is most cosine-similar to its own.
3. Alignment: before averaging, each expert's hidden units are permuted to match its group's
   dominant expert (weight matching: a linear assignment maximising the summed inner products of
   the units' [gate column; up column; down row] vectors). For SwiGLU, gate and up columns and down
   rows move together, so an expert's function is unchanged by its permutation.
4. Merge: the group's aligned experts averaged with their usage frequencies as weights
   (`average`: plain mean, no alignment, the paper's baseline).

Representation: the router keeps its E outputs and every expert slot of a group holds the group's
merged weights (the E x [D, F] arrays are kept, K distinct values among them). The routing is then
the original router's, each choice mapped to its group's merged expert, and the run needs nothing
new to train, evaluate, generate, analyse or export: every Hugging Face family that represents the
source model represents the merged one (it exports E experts, some identical). The memory saving is
the distinct experts: K of E (`distinct_params`); realising it on the device needs an expert
index map at serving time, which this representation leaves to the server.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from moejax.compress.common import EXPERT_KEYS, Params, block, moe_layers


def groups(router_de: np.ndarray, usage_e: np.ndarray, k: int) -> np.ndarray:
    """int[E]: the dominant expert each expert merges into (a dominant expert maps to itself)."""
    usage_e = np.asarray(usage_e, np.float64)
    dominant = np.sort(np.argsort(-usage_e, kind="stable")[:k])
    cols = np.asarray(router_de, np.float64).T
    unit = cols / np.maximum(np.linalg.norm(cols, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit[dominant].T  # [E, K]
    g = dominant[np.argmax(sim, axis=1)]
    g[dominant] = dominant
    return g


def unit_features(wg_df: np.ndarray, wu_df: np.ndarray, wd_fd: np.ndarray) -> np.ndarray:
    """[F, 3D]: one row per hidden unit, its gate column, up column and down row."""
    return np.concatenate([wg_df.T, wu_df.T, wd_fd], axis=1)


def match_permutation(ref: tuple[np.ndarray, ...], other: tuple[np.ndarray, ...]) -> np.ndarray:
    """int[F] perm such that `other`'s unit perm[f] goes to position f (weight matching: the
    assignment maximising sum_f <ref_f, other_perm[f]>)."""
    from scipy.optimize import linear_sum_assignment

    a, b = unit_features(*ref), unit_features(*other)
    rows, cols = linear_sum_assignment(-(a @ b.T))
    perm = np.empty(a.shape[0], np.int64)
    perm[rows] = cols
    return perm


def permute_expert(wg_df, wu_df, wd_fd, perm):
    """The same SwiGLU expert with its hidden units reordered: gate and up columns, down rows."""
    return wg_df[:, perm], wu_df[:, perm], wd_fd[perm, :]


def merge_layer(ffn: Params, group_e: np.ndarray, usage_e: np.ndarray, align: bool,
                weighted: bool) -> Params:
    """One MoE block with every expert replaced by its group's (aligned, usage-weighted) merge."""
    w = {k: np.asarray(ffn[k], np.float32) for k in EXPERT_KEYS}
    usage_e = np.asarray(usage_e, np.float64)
    out = {k: w[k].copy() for k in EXPERT_KEYS}
    for d in np.unique(group_e):
        members = np.flatnonzero(group_e == d)
        ref = tuple(w[k][d] for k in EXPERT_KEYS)
        parts = []
        for m in members:
            expert = tuple(w[k][m] for k in EXPERT_KEYS)
            if align and m != d:
                expert = permute_expert(*expert, match_permutation(ref, expert))
            parts.append(expert)
        c = usage_e[members] if weighted else np.ones(len(members))
        c = c / c.sum() if c.sum() > 0 else np.full(len(members), 1.0 / len(members))
        merged = [sum(ci * p[n].astype(np.float64) for ci, p in zip(c, parts)).astype(np.float32)
                  for n in range(3)]
        for k, m_w in zip(EXPERT_KEYS, merged):
            out[k][members] = m_w
    return {**ffn, **out}


METHODS = {"mcsmoe": dict(align=True, weighted=True), "average": dict(align=False, weighted=False)}


def merge(cfg, params: Params, usage: Sequence[np.ndarray], ks: Sequence[int], method: str = "mcsmoe"
          ) -> tuple[Params, list[np.ndarray]]:
    """MC-SMoE over every MoE layer: (params, the group map int[E] of each layer). The config is
    unchanged (the router keeps its E outputs)."""
    from moejax.errors import UserError

    if method not in METHODS:
        raise UserError(f"merge method {method!r} is not allowed; allowed: {', '.join(METHODS)}")
    out = {**params, "blocks": dict(params["blocks"])}
    key_of = {int(k): k for k in params["blocks"]}
    maps = []
    for i, u, k in zip(moe_layers(cfg), usage, ks):
        b = dict(block(params, i))
        g = groups(b["ffn"]["router"], u, k)
        b["ffn"] = merge_layer(b["ffn"], g, u, **METHODS[method])
        out["blocks"][key_of[i]] = b
        maps.append(g)
    return out, maps


def distinct_params(cfg, params: Params, maps: Sequence[np.ndarray]) -> int:
    """Parameters with each group's merged expert counted once (what a server that maps router
    outputs to K experts stores)."""
    import jax

    total = int(sum(np.asarray(x).size for x in jax.tree.leaves(params)))
    for i, g in zip(moe_layers(cfg), maps):
        ffn = block(params, i)["ffn"]
        per_expert = sum(np.asarray(ffn[k])[0].size for k in EXPERT_KEYS)
        total -= per_expert * (len(g) - len(np.unique(g)))
    return total
