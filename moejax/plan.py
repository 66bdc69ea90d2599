"""`python -m moejax.plan --config CFG [--set ...] [--devices N] [--device-memory 80GB] [--json]`.

What a training run needs before it is started: parameter counts (total and active, by part and per
layer) and the memory per device under the config's mesh and dtype, whether that fits, and if not,
the smallest device count and settings that would. Nothing is allocated and nothing is compiled:

- Parameters are counted from the real model structure (`nnx.eval_shape` of `runs.build_model`),
  each leaf classified by its path (embed, blocks/<i>/attn/..., blocks/<i>/ffn/w_gate [E, D, F], ...).
- Parameters, gradients and optimizer state per device: every leaf's shard under the config's mesh,
  from its logical axes and `parallel.RULES`; the optimizer state's shapes come from `optax`'s own
  `init` under `jax.eval_shape`, so they are exact for the optimizer the trainer builds.
- Activations: the residuals that autodiff saves for the backward pass of the real loss
  (`saved_residuals` of the model's loss, with the batch size a symbolic dimension, so one trace
  serves every batch size and device count), for one device's share of the batch, plus the largest
  backward transient (the logits' gradient). See docs/planning.md for the terms and the validation
  against XLA's compiled memory analysis.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import sys
from types import SimpleNamespace
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import config as config_lib
from moejax import parallel
from moejax.config import Config
from moejax.errors import UserError, run_cli

GROUPS = ("embedding", "attention", "dense_ffn", "experts", "shared_experts", "router", "norms", "head",
          "other")


# ----------------------------------------------------------------------------------------------
# Parameter counts.


def model_key(cfg: Config) -> Config:
    """`cfg` with everything that does not change the model, the optimizer state or one device's
    trace (mesh, batch size, accumulation, run bookkeeping) set to defaults: the cache key."""
    d = config_lib.TrainConfig()
    train = dataclasses.replace(cfg.train, batch_size=d.batch_size, grad_accum=1, steps=d.steps,
                                workdir=d.workdir, lr=d.lr, warmup_steps=d.warmup_steps)
    return dataclasses.replace(cfg, mesh=config_lib.MeshConfig(), data=config_lib.DataConfig(
        seq_len=cfg.data.seq_len), train=train)


@functools.lru_cache(maxsize=8)
def _abstract(cfg: Config) -> tuple[Any, nnx.State]:
    from moejax.runs import build_model

    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    return graphdef, state


def _leaves(cfg: Config) -> list[tuple[str, Any]]:
    """(path 'a/b/c', nnx.Variable with an abstract value) of every model variable."""
    _, state = _abstract(model_key(cfg))
    return [("/".join(str(k) for k in path), var) for path, var in nnx.to_flat_state(state)]


def leaf_group(path: str, ndim: int) -> str:
    """The part of the model a parameter belongs to, from its path (see module docstring)."""
    parts = path.split("/")
    name = parts[-1]
    if any("norm" in p for p in parts):
        return "norms"
    if parts[0] == "embed":
        return "embedding"
    if parts[0] == "head":
        return "head"
    if "ffn" in parts:
        sub = parts[parts.index("ffn") + 1:]
        if sub[0] == "shared" or sub[0] == "shared_gate":
            return "shared_experts"
        if sub[0].startswith("router"):
            return "router"
        if name in ("w_gate", "w_up", "w_down", "w_gate_up"):
            return "experts" if ndim == 3 else "dense_ffn"
        return "other"
    if "attn" in parts:
        return "router" if name.startswith("router") else "attention"
    return "other"


def _layer_of(path: str) -> int | None:
    m = re.match(r"blocks/(\d+)/", path)
    return int(m.group(1)) if m else None


def count_params(cfg: Config) -> dict[str, Any]:
    """Total and active trainable parameters by group and per layer.

    Active = what one token multiplies by or looks up: everything except routed experts, plus
    top_k / E of each MoE layer's routed experts (E read from the leaf's leading dimension); with
    attention experts, top attn_top_k / E_a of that layer's attention projections."""
    m = cfg.model
    by_group = {g: 0 for g in GROUPS}
    active_by_group = {g: 0.0 for g in GROUPS}
    layers: dict[int, dict[str, int]] = {}
    attn_experts: dict[int, int] = {}
    non_trainable = 0
    leaves = _leaves(cfg)
    for path, var in leaves:
        if path.endswith("attn/router") and var.get_value().ndim == 2:
            attn_experts[_layer_of(path)] = var.get_value().shape[1]
    for path, var in leaves:
        shape = var.get_value().shape
        n = int(np.prod(shape)) if shape else 1
        if not isinstance(var, nnx.Param):
            non_trainable += n
            continue
        g = leaf_group(path, len(shape))
        by_group[g] += n
        layer = _layer_of(path)
        if layer is not None:
            layers.setdefault(layer, {}).setdefault(g, 0)
            layers[layer][g] += n
        frac = 1.0
        if g == "experts":
            frac = min(m.moe.top_k, shape[0]) / shape[0]
        elif g == "attention" and layer in attn_experts:
            frac = min(m.attn_top_k, attn_experts[layer]) / attn_experts[layer]
        active_by_group[g] += n * frac
    total = sum(by_group.values())
    per_layer = []
    for i in sorted(layers):
        row = {"layer": i, "moe": cfg.model.is_moe_layer(i), "params": sum(layers[i].values())}
        row.update(layers[i])
        per_layer.append(row)
    return {"total_params": total, "active_params": int(round(sum(active_by_group.values()))),
            "params_by_group": by_group,
            "active_by_group": {k: int(round(v)) for k, v in active_by_group.items()},
            "non_trainable": non_trainable, "per_layer": per_layer}


# ----------------------------------------------------------------------------------------------
# Bytes per device of sharded state.


def _shard_elems(shape: tuple[int, ...], axes, sizes: dict[str, int]) -> int:
    """Elements of one device's shard of an array with logical `axes` under mesh `sizes`."""
    if not shape:
        return 1
    if not axes:
        return int(np.prod(shape))
    spec = parallel.logical_to_spec(axes, shape, SimpleNamespace(shape=sizes))
    n = 1
    for dim, s in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if s is None else ((s,) if isinstance(s, str) else tuple(s))
        n *= dim // int(np.prod([sizes[a] for a in names])) if names else dim
    return n


@functools.lru_cache(maxsize=8)
def _state_leaves(cfg: Config) -> tuple[list, list]:
    """(shape, itemsize, logical axes) of every parameter and of every optimizer-state leaf (each
    moment takes its parameter's axes, as `train.create_sharded_state` places it; counters none)."""
    import optax

    from moejax.optim import make_optimizer

    _, params = _abstract(cfg)
    is_var = lambda x: isinstance(x, nnx.Variable)
    leaf = lambda x, axes: (tuple(x.shape), jnp.dtype(x.dtype).itemsize, axes)
    p = [leaf(v.get_value(), v.get_metadata().get("logical_axes")) for v in jax.tree.leaves(params, is_leaf=is_var)]
    opt = make_optimizer(cfg.train)
    opt_shapes = jax.eval_shape(opt.init, params)
    axes = jax.tree.map(lambda v: v.replace(_AxesBox(v.get_metadata().get("logical_axes"))), params,
                        is_leaf=is_var)
    boxed = optax.tree_map_params(opt, lambda x, box: _AxesBox(leaf(x, box.axes)), opt_shapes, axes,
                                  transform_non_params=lambda x: _AxesBox(leaf(x, None)))
    o = [b.axes for b in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, _AxesBox))]
    return p, o


def state_bytes(cfg: Config, sizes: dict[str, int]) -> dict[str, int]:
    """Per-device bytes of the parameters (float32, every variable the step carries), their
    gradients (float32, same sharding) and the optimizer state."""
    p, o = _state_leaves(model_key(cfg))
    total = lambda leaves: sum(_shard_elems(s, a, sizes) * i for s, i, a in leaves)
    pb = total(p)
    return {"params": pb, "grads": pb, "optimizer": total(o)}


class _AxesBox:
    """Logical axes carried through a tree map as one leaf."""

    def __init__(self, axes):
        self.axes = axes


# ----------------------------------------------------------------------------------------------
# Activations: what autodiff saves for the backward pass, as a function of the batch size.


@dataclasses.dataclass(frozen=True)
class Residual:
    shape: tuple[int, ...]
    nbytes: int
    what: str           # jax's description: "output of dot_general from .../attention.py:..."


def _eval_dim(d: Any, b: int) -> int:
    return int(d) if isinstance(d, (int, np.integer)) else int(d._evaluate({"b": b}))


def _trace_residuals(cfg: Config, b: Any) -> list[tuple[tuple, int, str]]:
    """(shape, itemsize, description) of every residual of one device's training loss (model +
    cross-entropy + router losses) for `b` sequences; arguments (parameters, batch) left out."""
    from jax._src.ad_checkpoint import saved_residuals  # the function behind print_saved_residuals

    from moejax import train

    graphdef, params = _abstract(cfg)
    t = cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32) for k in ("tokens", "targets", "segment_ids",
                                                                   "positions")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((b, t), jnp.float32)

    def loss(p, bt):
        logits, aux = train._forward(graphdef, p, bt)
        return train.lm_loss_sum(logits, bt["targets"], bt["loss_mask"]) + aux["aux_loss"] + aux["z_loss"]

    return [(tuple(a.shape), jnp.dtype(a.dtype).itemsize, what) for a, what in saved_residuals(loss, params, batch)
            if not what.startswith("from the argument") and a.shape]


@functools.lru_cache(maxsize=8)
def _symbolic_residuals(cfg: Config):
    """One trace with the batch a symbolic dimension `b` (one trace serves every batch size), or
    None where the model needs a concrete batch size (e.g. capacity dispatch's ceil)."""
    try:
        b, = jax.export.symbolic_shape("b")
        return _trace_residuals(cfg, b)
    except Exception:  # noqa: BLE001
        return None


def residuals(cfg: Config, b: int) -> tuple[Residual, ...]:
    """The residuals autodiff keeps for the backward pass of one device's `b` sequences."""
    return _residuals(model_key(cfg), b)


@functools.lru_cache(maxsize=64)
def _residuals(cfg: Config, b: int) -> tuple[Residual, ...]:
    sym = _symbolic_residuals(cfg)
    if sym is None:
        traced = _trace_residuals(cfg, b)
        return tuple(Residual(s, int(np.prod(s)) * i, w) for s, i, w in traced)
    out = []
    for shape, itemsize, what in sym:
        concrete = tuple(_eval_dim(d, b) for d in shape)
        out.append(Residual(concrete, int(np.prod(concrete)) * itemsize, what))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Memory per device.


def _batch_devices(sizes: dict[str, int]) -> int:
    return int(np.prod([sizes[a] for a in parallel.BATCH_AXES]))


def _tensor_split(shape: tuple[int, ...], cfg: Config, tensor: int) -> int:
    """1, or `tensor` when the residual has a dimension that the tensor axis splits (heads, KV
    heads, FFN/expert hidden units, vocabulary) and that it divides."""
    if tensor == 1:
        return 1
    m = cfg.model
    split = {m.n_heads, m.n_kv_heads, m.d_ff, m.moe.d_expert, m.vocab_size}
    if m.moe.num_shared_experts:
        split.add(m.moe.num_shared_experts * (m.moe.d_shared or m.moe.d_expert))
    return tensor if any(isinstance(d, int) and d in split and d % tensor == 0 for d in shape) else 1


def _kept(rs: tuple[Residual, ...]) -> list[Residual]:
    """Residuals XLA materialises: of the several outputs one jitted elementwise function saves
    (silu's input and sigmoid, softmax's exp and quotient), fusion keeps one per call site and
    recomputes the rest, so only the largest of each (function, source location) is counted.
    Outputs of loops (`scan`) are always materialised."""
    best: dict[str, Residual] = {}
    out = []
    for r in rs:
        if r.what.startswith("output of jitted function"):
            if r.what not in best or r.nbytes > best[r.what].nbytes:
                best[r.what] = r
        else:
            out.append(r)
    return out + list(best.values())


def _with(cfg: Config, **train) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def _activation_parts(cfg: Config, b: int, tensor: int) -> tuple[int, int, int]:
    """(activations, logits, grouped-FFN rows part) of the residuals of `b` sequences."""
    act = logits = grouped = 0
    v = cfg.model.vocab_size
    for r in _kept(residuals(cfg, b)):
        n = r.nbytes // _tensor_split(r.shape, cfg, tensor)
        if r.shape[-1] == v:
            logits += n
        else:
            act += n
            if "model/dispatch.py" in r.what or "model/gmm.py" in r.what:  # the grouped expert FFN
                grouped += n
    return act, logits, grouped


def _attention_blocks(cfg: Config, b: int, tensor: int) -> int:
    """Bytes live while one layer's `chunked` attention backward runs (the flash kernels are planned
    as chunked, see with_planned_attention): float32 copies of the output, its gradient and the
    query gradient in the block layout, the key and value gradients, and one query block's
    [b, heads, block_q, block_kv] scores, probabilities and their gradients. 0 for `xla`, whose
    probabilities are residuals."""
    m = cfg.model
    if m.attention_impl != "chunked":
        return 0
    t = cfg.data.seq_len
    if m.attention == "mla":
        qk, vd = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim, m.mla.v_head_dim
        heads = kv_heads = m.n_heads
    else:
        qk = vd = m.resolved_head_dim
        heads, kv_heads = m.n_heads, m.n_kv_heads
    split = tensor if heads % tensor == 0 and kv_heads % tensor == 0 else 1
    heads, kv_heads = heads // split, kv_heads // split
    bq, bk = min(m.attention_block_q, t), min(m.attention_block_kv, t)
    rows = b * t * 4
    return (rows * heads * (2 * vd + qk) + rows * kv_heads * (qk + vd)
            + 4 * b * heads * bq * bk * 4)


def memory(cfg: Config, sizes: dict[str, int]) -> dict[str, Any]:
    """Estimated peak bytes per device of one training step, by part (see docs/planning.md).

    params, grads, optimizer: exact shard sizes (float32 parameters are the master weights; a
    bfloat16 step casts them at use, and the casts it keeps are residuals, in activations).
    activations: the autodiff residuals of this device's micro-batch (`residuals`), divided by the
    tensor axis where they have a dimension it splits. With train.remat only each block's input is
    kept, plus one block's residuals while it is recomputed in the backward pass.
    logits: the float32 [b, T, V] logits kept for the loss's backward pass, plus their gradient
    (`train.lm_loss_sum` builds no other [b, T, V] buffer). On CPU with a small head the train step
    fuses the head into the loss (`losses.fused_head_applies`) and makes neither: there this part
    is an over-estimate (docs/planning.md has the measured effect).
    all_to_all: with mesh.expert > 1, the send and receive buffers of the token exchange. Dropless
    exchanges run in a `lax.switch` over buffer sizes whose branches are rematerialised
    (`moejax.model.exchange.bucketed`): per MoE layer only the exchange's input and output rows are
    kept, and the grouped FFN's residuals leave the activations; while one layer's backward pass
    recomputes its branch, the largest bucket's receive and result buffers (ep x this device's rows)
    and the grouped FFN's residuals over them are live, once, after the logits' gradient is freed.
    attention_blocks: the chunked attention's backward temporaries of one layer (`_attention_blocks`),
    beyond what the exchange's transient already holds: the attention and the MoE block of a layer
    run their backward passes one after the other, so the larger of the two is counted.
    fsdp_gathered: FSDP-split weights all-gathered for the forward pass and kept for the backward
    pass, and full-size gradients before their reduce-scatter (one block's worth with remat).
    """
    m, tc = cfg.model, cfg.train
    st = state_bytes(cfg, sizes)
    nb = _batch_devices(sizes)
    micro = tc.batch_size // tc.grad_accum
    if tc.batch_size % tc.grad_accum or micro % nb:
        raise UserError(f"train.batch_size = {tc.batch_size} over train.grad_accum = {tc.grad_accum} "
                        f"micro-batches does not split over the {nb} devices of the batch axes "
                        "(mesh.data * mesh.fsdp * mesh.expert)")
    b = micro // nb
    t, tensor, ep = cfg.data.seq_len, sizes["tensor"], sizes["expert"]
    n_layers = m.n_layers
    n_moe = sum(m.is_moe_layer(i) for i in range(n_layers))
    plain, logits, grouped_b = _activation_parts(_with(cfg, remat=False), b, tensor)
    logits_grad = b * t * (m.vocab_size // (tensor if m.vocab_size % tensor == 0 else 1)) * 4
    logits += logits_grad
    saved, _, _ = _activation_parts(_with(cfg, remat=True), b, tensor)
    with_remat = saved + plain // n_layers
    a2a = moe_transient = 0
    if ep > 1 and n_moe:
        itemsize = jnp.dtype(tc.dtype).itemsize
        rows = b * t * m.moe.top_k
        if m.moe.dispatch == "dropless":
            plain -= grouped_b
            with_remat = saved + plain // n_layers
            kept = n_moe * 2 * rows * m.d_model * itemsize
            grouped_ep = _activation_parts(_with(cfg, remat=False), ep * b, tensor)[2]
            transient = grouped_ep // n_moe + 2 * ep * rows * m.d_model * itemsize
            moe_transient = max(0, transient - logits_grad)
            a2a = (kept // n_moe if tc.remat else kept) + moe_transient
        else:
            a2a = n_moe * 2 * rows * m.d_model * itemsize
            if tc.remat:
                a2a //= n_moe
    gathered = 0
    if sizes["fsdp"] > 1:
        # The weights gathered for the forward pass (kept for the backward pass: XLA merges the
        # forward and backward all-gathers of an unrolled layer), and the full-size gradients
        # before their reduce-scatter (XLA combines the reduce-scatters at the end).
        gathered = 2 * (state_bytes(cfg, dict(sizes, fsdp=1))["params"] - st["params"])
        if tc.remat:
            gathered //= n_layers
    parts = {"params": st["params"], "grads": st["grads"], "optimizer": st["optimizer"],
             "master_weights": 0, "grad_accumulator": st["grads"] if tc.grad_accum > 1 else 0,
             "activations": with_remat if tc.remat else plain, "logits": logits, "all_to_all": a2a,
             "attention_blocks": max(0, _attention_blocks(cfg, b, tensor) - moe_transient),
             "fsdp_gathered": gathered, "batch": 5 * 4 * b * t}
    parts["total"] = sum(parts.values())
    return {"per_device_bytes": parts, "activations_no_remat": plain, "activations_remat": with_remat,
            "batch_per_device": b}


# ----------------------------------------------------------------------------------------------
# Fits, and what would.


def _pow2_divisors(n: int) -> list[int]:
    return [d for d in (2 ** i for i in range(n.bit_length())) if n % d == 0]


def suggest(cfg: Config, device_memory: int, start: int, max_devices: int = 4096) -> dict[str, Any] | None:
    """The smallest device count (`start`, then the powers of two above it) and the settings under
    which a step fits, keeping the per-device batch the config has at `start` devices.

    For each count, in order of preference: the config's remat setting before turning remat on,
    the config's per-device batch before halving it (train.grad_accum doubling, so the tokens per
    optimizer step stay the same), and the config's own mesh before the other FSDP degrees, smallest
    first (mesh.expert and mesh.tensor kept where they divide the count)."""
    m, tc = cfg.model, cfg.train
    resolved = {k: v for k, v in dataclasses.asdict(cfg.mesh).items()}
    counts = [start] + [2 ** i for i in range(max_devices.bit_length()) if start < 2 ** i <= max_devices]
    base_b = None
    try:
        base_b = memory(cfg, parallel.mesh_shape(cfg.mesh, start))["batch_per_device"]
    except UserError:
        pass
    for n in counts:
        ep = resolved["expert"] if resolved["expert"] > 0 and n % resolved["expert"] == 0 else 1
        if ep > 1 and m.moe.num_experts % ep:
            ep = 1
        tp = resolved["tensor"] if resolved["tensor"] > 0 and n % (ep * resolved["tensor"]) == 0 else 1
        rest = n // (ep * tp)
        per_dev = base_b or max(tc.batch_size // max(n // tp, 1), 1)
        batches = [per_dev // 2 ** i for i in range(per_dev.bit_length()) if per_dev // 2 ** i >= 1]
        meshes = [{"data": rest // f, "fsdp": f, "expert": ep, "tensor": tp} for f in _pow2_divisors(rest)]
        try:  # the config's own mesh at this device count first
            own = parallel.mesh_shape(cfg.mesh, n)
            if own in meshes:
                meshes.remove(own)
                meshes.insert(0, own)
        except UserError:
            pass
        for remat in ([tc.remat] if tc.remat else [False, True]):
            for b in batches:
                for sizes in meshes:
                    nb = rest * ep
                    accum = max(per_dev // b, 1)
                    trial = dataclasses.replace(cfg, mesh=config_lib.MeshConfig(**sizes), train=dataclasses.replace(
                        tc, remat=remat, batch_size=b * nb * accum, grad_accum=accum))
                    low = state_bytes(trial, sizes)
                    if low["params"] + low["grads"] + low["optimizer"] > device_memory:
                        continue
                    est = memory(trial, sizes)
                    if est["per_device_bytes"]["total"] <= device_memory:
                        return {"devices": n, "mesh": sizes, "remat": remat, "batch_per_device": b,
                                "grad_accum": accum, "batch_size": b * nb * accum,
                                "per_device_total": est["per_device_bytes"]["total"]}
    return None


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30, '123456' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
             "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in units:
        raise UserError(f"--device-memory {text!r} is not a size; use e.g. 80GB, 16GiB or 96e9 bytes as 96000000000")
    return int(float(m.group(1)) * units[m.group(2).lower()])


def default_device_memory() -> tuple[int, str]:
    """This machine's first device's memory limit, or the host RAM for a CPU."""
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"{dev.device_kind} bytes_limit"
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host RAM"


def for_platform(cfg: Config, platform: str) -> Config:
    """`cfg` as it runs on `platform`: `model.moe.gmm: auto` picks its grouped matmul by backend at
    trace time (tiled on CPU, ragged_dot on GPU, megablox on TPU), so a plan for an accelerator traces
    that one; for TPU it traces ragged_dot, whose buffers are megablox's (megablox off a TPU runs in
    Pallas interpret mode, far too slow to trace for a plan)."""
    if cfg.model.moe.gmm == "auto":
        gmm = "tiled" if platform == "cpu" else "ragged_dot"
        moe = dataclasses.replace(cfg.model.moe, gmm=gmm)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))
    return with_planned_attention(cfg, platform)


def with_planned_attention(cfg: Config, platform: str) -> Config:
    """The attention implementation the plan traces. `auto` resolves as it will on `platform`.
    The flash kernels (splash, pallas_gpu, cudnn) keep what `chunked` keeps for the backward pass
    (q, k, v, the output and one log-sum-exp per row) and O(T x block) temporaries, so the plan traces
    `chunked` for them: a kernel cannot be traced off its platform."""
    from moejax.model import attention_impl as ai
    m = cfg.model
    impl = m.attention_impl
    blocks = {}
    if impl == "auto":
        dtype = "bfloat16" if cfg.train.dtype == "bfloat16" else "float32"
        spec = ai.AttnSpec("auto", 1.0, m.sliding_window, m.attention_block_q, m.attention_block_kv)
        hd = m.resolved_head_dim
        impl = ai.pick_auto(platform, dtype, cfg.data.seq_len, spec, hd, hd)
        spec = ai.auto_spec(platform, impl, cfg.data.seq_len, spec)
        blocks = {"attention_block_q": spec.block_q, "attention_block_kv": spec.block_kv}
    if impl in ("splash", "pallas_gpu", "cudnn"):
        impl = "chunked"
    return dataclasses.replace(cfg, model=dataclasses.replace(m, attention_impl=impl, **blocks))


def plan(cfg: Config, devices: int, device_memory: int) -> dict[str, Any]:
    sizes = parallel.mesh_shape(cfg.mesh, devices)
    parallel.check_mesh_fits_model(cfg, sizes)
    out = count_params(cfg)
    out.update(devices=devices, mesh=sizes, dtype=cfg.train.dtype, remat=cfg.train.remat,
               seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size, device_memory_bytes=device_memory)
    out.update(memory(cfg, sizes))
    out["fits"] = bool(out["per_device_bytes"]["total"] <= device_memory)
    out["suggestion"] = None if out["fits"] else suggest(cfg, device_memory, devices)
    return out


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def table(r: dict[str, Any]) -> str:
    lines = [f"parameters: {_count(r['total_params'])} total, {_count(r['active_params'])} active per token"
             + (f" (+{r['non_trainable']:,} non-trainable)" if r["non_trainable"] else ""),
             f"  {'part':<16}{'total':>12}{'active':>12}"]
    for g in GROUPS:
        if r["params_by_group"][g]:
            lines.append(f"  {g:<16}{_count(r['params_by_group'][g]):>12}{_count(r['active_by_group'][g]):>12}")
    kinds: dict[tuple, list[int]] = {}
    for row in r["per_layer"]:
        key = tuple((k, v) for k, v in row.items() if k != "layer")
        kinds.setdefault(key, []).append(row["layer"])
    lines.append("  per layer:")
    for key, idx in kinds.items():
        row = dict(key)
        span = f"{idx[0]}" if len(idx) == 1 else f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) \
            else ",".join(map(str, idx))
        detail = ", ".join(f"{k} {_count(v)}" for k, v in row.items() if k not in ("moe", "params"))
        lines.append(f"    layers {span} ({'MoE' if row['moe'] else 'dense'}): {_count(row['params'])} ({detail})")
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
    lines.append(f"memory per device ({r['devices']} devices: {mesh}; {r['dtype']}, batch {r['batch_per_device']} x "
                 f"{r['seq_len']} per device, remat {'on' if r['remat'] else 'off'}):")
    for k, v in r["per_device_bytes"].items():
        if k != "total" and v:
            lines.append(f"  {k:<18}{_size(v):>14}")
    lines.append(f"  {'total':<18}{_size(r['per_device_bytes']['total']):>14}   (activations without remat "
                 f"{_size(r['activations_no_remat'])}, with remat {_size(r['activations_remat'])})")
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines.append(f"{verdict} in {_size(r['device_memory_bytes'])} ({r['device_memory_bytes'] / 1e9:,.1f} GB) per device")
    s = r.get("suggestion")
    if not r["fits"]:
        if s:
            mesh = ", ".join(f"mesh.{k}={v}" for k, v in s["mesh"].items())
            lines.append(f"would fit: {s['devices']} devices with {mesh}, train.remat={str(s['remat']).lower()}, "
                         f"{s['batch_per_device']} sequence(s) per device (train.batch_size={s['batch_size']}, "
                         f"train.grad_accum={s['grad_accum']}): {_size(s['per_device_total'])} per device")
        else:
            lines.append("no setting with up to 4096 devices fits")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moejax.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config file (default: the built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--devices", type=int, default=None,
                   help="device count (default: the mesh's product if it has no -1, else this machine's)")
    p.add_argument("--device-memory", default=None,
                   help="memory per device, e.g. 80GB, 16GiB (default: this machine's first device)")
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default=None,
                   help="where the run will go (default: this machine's backend); it picks the grouped "
                        "matmul of model.moe.gmm: auto")
    p.add_argument("--json", action="store_true", help="last stdout line: the result as one JSON object")
    args = p.parse_args(argv)
    cfg = config_lib.load(args.config, args.set)
    cfg = for_platform(cfg, args.platform or jax.default_backend())
    sizes = dataclasses.asdict(cfg.mesh).values()
    devices = args.devices or int(np.prod([v for v in sizes if v != -1]))
    if args.devices is None and -1 in sizes:
        # Planning happens on a laptop for a cluster: this machine's device count says nothing.
        axis = next(k for k, v in dataclasses.asdict(cfg.mesh).items() if v == -1)
        print(f"planning for {devices} device(s), the smallest count the fixed mesh axes allow "
              f"(mesh.{axis} = -1 -> 1); pass --devices N for another count", flush=True)
    if devices < 1:
        raise UserError(f"--devices must be >= 1, got {devices}")
    mem = parse_bytes(args.device_memory) if args.device_memory else default_device_memory()[0]
    result = plan(cfg, devices, mem)
    print(table(result), flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
