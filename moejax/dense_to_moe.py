"""Build an MoE from a dense (Llama-style) moejax model: sparse upcycling and LLaMA-MoE splitting.

Pure functions from (dense config, dense parameters) to (MoE config, MoE parameters); the parameters
are nested dicts of arrays as `nnx.split(model)[1].to_pure_dict()` gives them.

- `upcycle` (Komatsuzaki et al. 2023, "Sparse Upcycling", arXiv:2212.05055): every expert of a layer is
  a copy of that layer's dense FFN (optionally with a little noise), the router starts small and
  random. With renormalised top-k weights the MoE computes exactly the dense function for any k
  (the k weights sum to 1 and the experts agree) until training moves the experts apart.
- `split` (LLaMA-MoE, Zhu et al. 2024, arXiv:2406.16554): the FFN's d_ff intermediate neurons are
  partitioned into E experts of d_ff / E neurons (a random partition, or balanced k-means clusters
  of the neurons' gate vectors). The dense output is the *sum* of all experts' outputs, while the
  renormalised combine weights sum to 1, so the routed output is multiplied by E
  (`routed_scaling_factor`): with k = E and a zero router (every weight 1/E) the MoE reproduces
  the dense model exactly.
- `split_attention` (LLaMA-MoE-v2, Qu et al. 2024, arXiv:2411.15708): the attention's KV head
  groups become attention experts chosen by a router, with the same output scale E.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from moejax.config import Config, validate
from moejax.errors import UserError

Params = dict[str, Any]


def _moe_cfg(dense: Config, **moe_kw) -> Config:
    if dense.model.moe.num_experts:
        raise UserError("the source model is already an MoE (model.moe.num_experts = "
                        f"{dense.model.moe.num_experts}); dense-to-MoE needs a dense model")
    moe = dataclasses.replace(dense.model.moe, **moe_kw)
    cfg = dataclasses.replace(dense, model=dataclasses.replace(dense.model, moe=moe))
    validate(cfg)
    return cfg


def _layers(params: Params) -> dict[int, Params]:
    return params["blocks"]


def _router(rng: np.random.Generator, d: int, e: int, std: float) -> np.ndarray:
    return (std * rng.standard_normal((d, e))).astype(np.float32)


def upcycle(dense_cfg: Config, params: Params, num_experts: int, top_k: int, *, noise_std: float = 0.0,
            router_std: float = 0.02, seed: int = 0, **moe_kw) -> tuple[Config, Params]:
    """Sparse upcycling: every expert starts as a copy of the dense FFN (+ N(0, noise_std * std(W))
    noise per expert), router ~ N(0, router_std). Renormalised top-k keeps the dense function."""
    d_ff = dense_cfg.model.d_ff
    cfg = _moe_cfg(dense_cfg, num_experts=num_experts, top_k=top_k, d_expert=d_ff,
                   **{"renormalize": True, **moe_kw})
    rng = np.random.default_rng(seed)
    out = {**params, "blocks": {}}
    moe_index = 0
    for i, block in _layers(params).items():
        block = dict(block)
        if cfg.model.is_moe_layer(int(i)):
            e = cfg.model.moe.experts_of(moe_index)
            moe_index += 1
            ffn = block["ffn"]
            new = {}
            for name in ("w_gate", "w_up", "w_down"):
                w = np.asarray(ffn[name], np.float32)
                stack = np.broadcast_to(w, (e, *w.shape)).copy()
                if noise_std:
                    stack += noise_std * float(w.std()) * rng.standard_normal(stack.shape).astype(np.float32)
                new[name] = stack
            new["router"] = _router(rng, cfg.model.d_model, e, router_std)
            new["router_bias"] = np.zeros((e,), np.float32)
            block["ffn"] = new
        out["blocks"][i] = block
    return cfg, out


def neuron_partition(w_gate_df: np.ndarray, num_experts: int, method: str, seed: int = 0) -> np.ndarray:
    """[E, d_ff / E] neuron indices of each expert. `random`: a random equal split; `cluster`:
    balanced k-means of the neurons' gate vectors (LLaMA-MoE's clustering construction), so that
    neurons that respond to similar inputs land in the same expert."""
    d_ff = w_gate_df.shape[1]
    if d_ff % num_experts:
        raise UserError(f"model.d_ff = {d_ff} is not divisible by {num_experts} experts")
    size = d_ff // num_experts
    rng = np.random.default_rng(seed)
    if method == "random":
        return rng.permutation(d_ff).reshape(num_experts, size)
    if method != "cluster":
        raise UserError(f"split method {method!r} is not allowed; allowed: random, cluster")
    x = w_gate_df.T / np.maximum(np.linalg.norm(w_gate_df.T, axis=1, keepdims=True), 1e-12)
    centers = x[rng.choice(d_ff, num_experts, replace=False)]
    for _ in range(20):
        assign = _balanced_assign(x @ centers.T, size)
        centers = np.stack([x[assign == c].mean(0) for c in range(num_experts)])
    assign = _balanced_assign(x @ centers.T, size)
    return np.stack([np.sort(np.flatnonzero(assign == c)) for c in range(num_experts)])


def _balanced_assign(similarity_nc: np.ndarray, size: int) -> np.ndarray:
    """Greedy balanced assignment: most confident (neuron, cluster) pairs first, each cluster
    takes at most `size` neurons."""
    n, c = similarity_nc.shape
    assign = np.full(n, -1)
    fill = np.zeros(c, int)
    for flat in np.argsort(-similarity_nc, axis=None):
        i, k = divmod(int(flat), c)
        if assign[i] < 0 and fill[k] < size:
            assign[i], fill[k] = k, fill[k] + 1
    return assign


def split(dense_cfg: Config, params: Params, num_experts: int, top_k: int, *, method: str = "random",
          router_std: float = 0.0, seed: int = 0, scale: float | None = None, **moe_kw
          ) -> tuple[Config, Params]:
    """LLaMA-MoE: each MoE layer's FFN neurons split into `num_experts` experts; the routed output
    is scaled by E (or `scale`). With k = E and router_std = 0 the dense function is kept."""
    d_ff = dense_cfg.model.d_ff
    if d_ff % num_experts:
        raise UserError(f"model.d_ff = {d_ff} is not divisible by --experts {num_experts}")
    cfg = _moe_cfg(dense_cfg, num_experts=num_experts, top_k=top_k, d_expert=d_ff // num_experts,
                   **{"renormalize": True,
                      "routed_scaling_factor": scale if scale is not None else float(num_experts),
                      **moe_kw})
    if cfg.model.moe.layer_experts:
        raise UserError("split makes the same number of experts in every layer; drop "
                        "model.moe.layer_experts")
    rng = np.random.default_rng(seed)
    out = {**params, "blocks": {}}
    for i, block in _layers(params).items():
        block = dict(block)
        if cfg.model.is_moe_layer(int(i)):
            ffn = {k: np.asarray(v, np.float32) for k, v in block["ffn"].items()}
            idx = neuron_partition(ffn["w_gate"], num_experts, method, seed + int(i))
            block["ffn"] = {
                "w_gate": np.stack([ffn["w_gate"][:, j] for j in idx]),
                "w_up": np.stack([ffn["w_up"][:, j] for j in idx]),
                "w_down": np.stack([ffn["w_down"][j, :] for j in idx]),
                "router": _router(rng, ffn["w_gate"].shape[0], num_experts, router_std),
                "router_bias": np.zeros((num_experts,), np.float32),
            }
        out["blocks"][i] = block
    return cfg, out


def split_attention(cfg: Config, params: Params, num_experts: int, top_k: int, *,
                    router_std: float = 0.0, seed: int = 0) -> tuple[Config, Params]:
    """LLaMA-MoE-v2 attention experts: the n_kv_heads KV head groups (with their query heads and
    output rows) become `num_experts` experts; a router (zero or N(0, router_std)) picks top_k per
    token; the output is scaled by E, so k = E with a zero router keeps the dense attention.
    The projection weights are unchanged: only the router is new."""
    m = cfg.model
    if m.n_kv_heads % num_experts:
        raise UserError(f"model.n_kv_heads = {m.n_kv_heads} is not divisible by --attention-experts "
                        f"{num_experts}")
    model = dataclasses.replace(m, attn_experts=num_experts, attn_top_k=top_k,
                                attn_expert_scale=float(num_experts))
    new_cfg = dataclasses.replace(cfg, model=model)
    validate(new_cfg)
    rng = np.random.default_rng(seed)
    out = {**params, "blocks": {}}
    for i, block in _layers(params).items():
        attn = dict(block["attn"])
        attn["router"] = _router(rng, m.d_model, num_experts, router_std)
        out["blocks"][i] = {**block, "attn": attn}
    return new_cfg, out


# ----------------------------------------------------------------------------------------------
# `python -m moejax.convert upcycle|split`: run directory in, run directory out.


def _convert_args(p, split_cmd: bool) -> None:
    p.add_argument("source", help="moejax run directory of the dense model (e.g. from import-hf)")
    p.add_argument("workdir", help="the moejax run directory to create")
    p.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=int, required=True, help="experts chosen per token")
    p.add_argument("--router-std", type=float, default=0.0 if split_cmd else 0.02,
                   help="std of the new router's normal init (0 = zero router)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the new config (repeatable), e.g. model.moe.every=2")
    if split_cmd:
        p.add_argument("--method", default="random", choices=["random", "cluster"],
                       help="how neurons are grouped into experts")
        p.add_argument("--scale", type=float, help="routed output scale (default: the expert count)")
        p.add_argument("--attention-experts", type=int, default=0,
                       help="also split attention into this many experts (LLaMA-MoE-v2)")
        p.add_argument("--attention-top-k", type=int, default=2)
    else:
        p.add_argument("--noise", type=float, default=0.0,
                       help="per-expert noise, as a fraction of each weight matrix's std")


def _run_conversion(args, convert) -> int:
    import shutil

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moejax import config as config_lib
    from moejax.convert import load_run, save_run
    from moejax.runs import build_model

    model, dense_cfg = load_run(args.source)
    if args.set:
        data = config_lib.to_dict(dense_cfg)
        for o in args.set:
            config_lib.apply_override(data, o)
        over = config_lib.from_dict(data)
        dense_cfg = dataclasses.replace(over, model=dataclasses.replace(
            over.model, moe=dataclasses.replace(over.model.moe, num_experts=0)))
    params = jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())
    cfg, new_params = convert(dense_cfg, params)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, new_params))
    cfg = save_run(nnx.merge(graphdef, state), cfg, args.workdir)
    tok = dense_cfg.data.tokenizer or os.path.join(args.source, "tokenizer.model")
    if not cfg.data.tokenizer and os.path.isfile(tok):
        shutil.copyfile(tok, os.path.join(args.workdir, "tokenizer.model"))
    m = cfg.model.moe
    print(f"{args.source} -> {args.workdir}: {m.num_experts} experts of width {m.d_expert}, top-{m.top_k}"
          f"; fine-tune with: python -m moejax.train --config {os.path.join(args.workdir, 'config.yaml')}")
    return 0


def _register_commands() -> None:
    from moejax.convert import command

    @command("upcycle", "dense run directory -> MoE run directory, experts copied from the FFN",
             lambda p: _convert_args(p, split_cmd=False))
    def _upcycle(args) -> int:
        return _run_conversion(args, lambda c, p: upcycle(
            c, p, args.experts, args.top_k, noise_std=args.noise, router_std=args.router_std,
            seed=args.seed))

    @command("split", "dense run directory -> MoE run directory, FFN neurons split into experts",
             lambda p: _convert_args(p, split_cmd=True))
    def _split(args) -> int:
        def both(c, p):
            c, p = split(c, p, args.experts, args.top_k, method=args.method, router_std=args.router_std,
                         seed=args.seed, scale=args.scale)
            if args.attention_experts:
                c, p = split_attention(c, p, args.attention_experts, args.attention_top_k,
                                       router_std=args.router_std, seed=args.seed)
            return c, p
        return _run_conversion(args, both)


_register_commands()
