"""What every compression method shares: MoE layers of a param dict, the new config, calibration
routing statistics and hidden states, and writing the result as a run directory.

Parameters are nested dicts of arrays as `nnx.split(model)[1].to_pure_dict()` gives them (the style
of `moejax.dense_to_moe`); the methods are pure functions on them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.config import Config, validate
from moejax.errors import UserError

Params = dict[str, Any]
EXPERT_KEYS = ("w_gate", "w_up", "w_down")   # [E, D, F], [E, D, F], [E, F, D]
ROUTER_KEYS = ("router", "router_noise")     # [D, E]: one column per expert
BIAS_KEYS = ("router_bias",)                 # [E]
DEFAULT_TOKENS = 16384                       # calibration tokens


def moe_layers(cfg: Config) -> list[int]:
    """Block indices of the MoE layers, in order."""
    return [i for i in range(cfg.model.n_layers) if cfg.model.is_moe_layer(i)]


def experts_per_layer(cfg: Config) -> list[int]:
    return [cfg.model.moe.experts_of(j) for j in range(len(moe_layers(cfg)))]


def block(params: Params, i: int) -> Params:
    blocks = params["blocks"]
    return blocks[i] if i in blocks else blocks[str(i)]


def numpy_params(model: nnx.Module) -> Params:
    return jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())


def keep_counts(spec: str | int | Sequence[int], cfg: Config, flag: str = "--keep") -> list[int]:
    """`K` or `K1,K2,...` (one per MoE layer) -> experts to keep per MoE layer, checked:
    top_k <= K < E (K = E compresses nothing; K < top_k cannot route)."""
    e = experts_per_layer(cfg)
    if not e:
        raise UserError("the model has no MoE layer (model.moe.num_experts = 0); nothing to compress")
    if isinstance(spec, str):
        try:
            ks = [int(x) for x in spec.split(",")]
        except ValueError:
            raise UserError(f"{flag} {spec!r} is not an integer or a comma-separated list of them") from None
    else:
        ks = [int(spec)] if isinstance(spec, int) else [int(x) for x in spec]
    if len(ks) == 1:
        ks = ks * len(e)
    if len(ks) != len(e):
        raise UserError(f"{flag} lists {len(ks)} values but the model has {len(e)} MoE layers")
    k = cfg.model.moe.top_k
    for j, (kj, ej) in enumerate(zip(ks, e)):
        if not k <= kj < ej:
            raise UserError(f"{flag} {kj} for MoE layer {j} is out of range: must be >= "
                            f"model.moe.top_k = {k} and < the layer's {ej} experts")
    return ks


def with_experts(cfg: Config, counts: Sequence[int]) -> Config:
    """`cfg` with `counts[j]` routed experts in MoE layer j (`layer_experts` when they differ)."""
    counts = [int(c) for c in counts]
    uniform = len(set(counts)) == 1
    moe = dataclasses.replace(cfg.model.moe, num_experts=max(counts),
                              layer_experts=() if uniform else tuple(counts))
    if moe.n_group > 1 and max(counts) % moe.n_group:
        moe = dataclasses.replace(moe, n_group=1, topk_group=1)  # group-limited routing needs E % groups
    new = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))
    validate(new)
    return new


def slice_layer(ffn: Params, keep: Sequence[int]) -> Params:
    """One MoE block's parameters with only experts `keep` (router columns sliced alike; shared
    experts and anything not per-expert stay)."""
    idx = np.asarray(keep, np.int64)
    out = dict(ffn)
    for k in EXPERT_KEYS:
        out[k] = np.asarray(ffn[k])[idx]
    for k in ROUTER_KEYS:
        if k in ffn and ffn[k] is not None:
            out[k] = np.asarray(ffn[k])[:, idx]
    for k in BIAS_KEYS:
        if k in ffn:
            out[k] = np.asarray(ffn[k])[idx]
    return out


def to_model(cfg: Config, params: Params) -> nnx.Module:
    from moejax.runs import build_model

    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Calibration data.


def calibration_sequences(cfg: Config, tokenizer, data: Sequence[str] | None, tokens: int):
    """(token-id sequences, domain index per sequence, domain names) of the calibration data:
    `data` specs as `python -m moejax.analyze --data` reads them (default: the run's own
    validation split, per domain), about `tokens` tokens in all."""
    from moejax.analyze import collect

    specs = list(data or [collect.RUN_DATA])
    count = lambda ex: min(len(tokenizer.encode_chat(ex)[0]) - 1, cfg.data.seq_len)  # noqa: E731
    # read_domains fills each domain to its budget; spread the total over the domains it finds.
    probe = collect.read_domains(specs, cfg.data, 1, count)
    per = max(1, tokens // max(len(probe), 1))
    domains = collect.read_domains(specs, cfg.data, per, count)
    return collect.encode(tokenizer, domains)


def routing_tally(model: nnx.Module, seqs, dom, names, seq_len: int):
    """`moejax.analyze`'s routing tally of `model` on the sequences."""
    from moejax.analyze import collect

    return collect.collect(model, seqs, dom, names, seq_len, samples_per_domain=0).tally


def usage(tally) -> list[np.ndarray]:
    """Per MoE layer: routed slots per expert over all calibration tokens (activation frequency,
    what MC-SMoE ranks and weights by)."""
    return [s.sum(0).astype(np.float64) for s in tally.slots]


def routed_weight(tally) -> list[np.ndarray]:
    """Per MoE layer: the sum over calibration tokens of each expert's combine weight (its gate
    when routed, else 0): the share of the layer's output the expert carries. Usage pruning ranks
    by this: a slot count weighs a 0.9 first choice and a 0.1 second choice alike."""
    return [g.sum((0, 1)) for g in tally.gate_pos]


def batch_sequences(seqs, seq_len: int):
    """Sequences padded into one [B, T] batch: tokens, segment ids (0 = padding), positions."""
    t = min(seq_len, max(len(s) for s in seqs))
    tokens = np.zeros((len(seqs), t), np.int32)
    seg = np.zeros_like(tokens)
    pos = np.zeros_like(tokens)
    for r, s in enumerate(seqs):
        s = list(s)[:t]
        tokens[r, :len(s)], seg[r, :len(s)], pos[r, :len(s)] = s, 1, np.arange(len(s))
    return tokens, seg, pos


def moe_io(model: nnx.Module, tokens, seg, pos, batch: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per MoE layer (X, Z): the block's input (the normed residual) and the routed experts' output
    (shared experts excluded: pruning never changes them) for every valid token, [N, D] each.
    The blocks run exactly as `Transformer.__call__` runs them."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tok, sg, ps):
        m = nnx.merge(graphdef, state)
        x = jnp.take(m.embed[...], tok, axis=0).astype(m.dtype)
        out = []
        for blk in m.blocks:
            x = x + blk.attn(blk.attn_norm(x), ps, sg)  # as Block.__call__
            h = blk.ffn_norm(x)
            if blk.is_moe:
                o = blk.ffn(h, valid_bt=sg != 0, token_ids_bt=tok)
                y = o.y
                if blk.ffn.shared is not None:
                    b, t, d = h.shape
                    sh = blk.ffn.shared(h.reshape(b * t, d))
                    if blk.ffn.shared_gate is not None:
                        sh = sh * jax.nn.sigmoid(h.reshape(b * t, d) @ blk.ffn.shared_gate[...])
                    y = y - sh.reshape(b, t, d)
                out.append((h, y))
                x = x + o.y
            else:
                x = x + blk.ffn(h)
        return out

    acc: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for s in range(0, tokens.shape[0], batch):
        got = jax.device_get(run(state, *(jnp.asarray(a[s:s + batch]) for a in (tokens, seg, pos))))
        valid = seg[s:s + batch] != 0
        acc.append([(np.asarray(h)[valid], np.asarray(y)[valid]) for h, y in got])
    return [(np.concatenate([a[l][0] for a in acc]), np.concatenate([a[l][1] for a in acc]))
            for l in range(len(acc[0]))]


# ----------------------------------------------------------------------------------------------
# Writing the result.


def write_run(cfg: Config, params: Params, out: str, source: str, info: dict[str, Any]) -> Config:
    """Save `params` as a new run directory (`moejax.convert.save_run`), copy the source run's
    tokenizer, and record what was done in OUT/compress.json."""
    from moejax.convert import save_run
    from moejax.runs import tokenizer_path

    src_cfg_tok = tokenizer_path(cfg, source)
    cfg = save_run(to_model(cfg, params), cfg, out)
    if not cfg.data.tokenizer and os.path.isfile(src_cfg_tok):
        shutil.copyfile(src_cfg_tok, os.path.join(out, "tokenizer.model"))
    with open(os.path.join(out, "compress.json"), "w", encoding="utf-8") as f:
        json.dump({"source": os.path.abspath(source), **info}, f, indent=1, default=_jsonable)
    return cfg


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(type(x))


def param_count(params: Params) -> int:
    return int(sum(np.asarray(x).size for x in jax.tree.leaves(params)))
