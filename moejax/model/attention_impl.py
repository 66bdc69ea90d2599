"""How attention's softmax(q k^T) v is computed (registry `ATTENTION_IMPLS`, key `model.attention_impl`).

Every entry computes the same function, `fn(q[B, T, n, hd], k[B, T, kv, hd], v[B, T, kv, vd],
segment_ids int[B, T], positions int[B, T], spec) -> [B, T, n, vd]`: causal, a query sees only keys
of its own packed segment, and with `spec.window` only keys less than `window` positions back; query
head i reads KV head i // (n / kv) (GQA). Each entry also declares where it runs (`refuse(...)`:
backend, dtype, shape -> None or the reason it cannot), so `auto`, the self-check and the error for
a bad choice all read the same table. Model code never asks for the platform itself.

- `xla`: the dense form (`attention.grouped_attention`): the [B, n, T, T] f32 scores are stored.
- `chunked`: blockwise, online softmax, recomputing backward (`attention_chunked`); every backend.
- `splash`: Pallas TPU splash attention (the kernel MaxText uses); native GQA and segment ids.
- `pallas_gpu`: Pallas GPU (Triton) flash attention `pallas.ops.gpu.attention.mha`; KV heads repeated.
- `cudnn`: cuDNN flash attention through `jax.nn.dot_product_attention`; bf16 / fp16 on GPU.
On CPU the Pallas kernels run in interpret mode (slow, exact), which is how CI tests them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moejax.errors import UserError
from moejax.model.attention_chunked import chunked_attention
from moejax.registry import Registry

# CPU: from this sequence length on, `auto` picks `chunked`, with query and key blocks of at most
# `cpu_block(T)` rows (docs/benchmarks.md, "Where `auto` switches on CPU": the attention's forward +
# backward measured on the 2-core VM; small blocks keep each block's scores in cache, and from 128
# tokens they beat the dense form at every length measured, 1.8-3.1x).
CPU_CHUNKED_FROM = 128


def cpu_block(t: int) -> int:
    """The largest query / key block `auto` uses for `chunked` on CPU at sequence length `t`."""
    return 64 if t <= 256 else 128


class AttnSpec(NamedTuple):
    """Static settings of one attention call (hashable)."""
    impl: str
    scale: float
    window: int | None
    block_q: int
    block_kv: int


@dataclasses.dataclass(frozen=True)
class AttnImpl:
    """One implementation: the function, and `refuse(backend, dtype, seq_len, spec, head dims)`
    returning None where it runs, else the reason it cannot (one clause, no trailing period)."""
    fn: Callable[..., jax.Array]
    refuse: Callable[[str, jnp.dtype, int, AttnSpec, int, int], str | None]
    backends: tuple[str, ...]           # where it runs natively
    interpret_on: tuple[str, ...] = ()  # where its Pallas kernel runs in interpret mode (tests)

    @property
    def doc(self) -> str:
        return self.fn.__doc__ or ""


ATTENTION_IMPLS: Registry[AttnImpl] = Registry("attention implementation")


def backend() -> str:
    return jax.default_backend()


def _divides(t: int, spec: AttnSpec) -> str | None:
    for key, blk in (("attention_block_q", spec.block_q), ("attention_block_kv", spec.block_kv)):
        if t > blk and t % blk:
            return (f"model.{key} = {blk} does not divide the sequence length {t} (use a divisor of "
                    f"{t}, or a block >= {t})")
    return None


# ----------------------------------------------------------------------------------------------
# Shared pieces.


def dense_mask(segment_ids_bt: jax.Array, positions_bt: jax.Array, window: int | None) -> jax.Array:
    """[B, 1, 1, T, S] boolean: causal, same packed segment, inside the window (by position)."""
    t = segment_ids_bt.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    mask = causal & same
    if window is not None:
        mask = mask & (positions_bt[:, :, None] - positions_bt[:, None, :] < window)
    return mask[:, None, None, :, :]


def _pad_heads(q, k, v):
    """Zero-pad q/k and v to one head width (MLA's qk and v widths differ; kernels want one): the
    extra q/k columns add 0 to every score, the extra v columns are sliced off the output."""
    d = max(q.shape[-1], v.shape[-1])
    pad = lambda x: x if x.shape[-1] == d else jnp.pad(x, [(0, 0)] * 3 + [(0, d - x.shape[-1])])
    return pad(q), pad(k), pad(v), v.shape[-1]


# ----------------------------------------------------------------------------------------------
# The implementations.


def grouped_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskv: jax.Array, mask: jax.Array,
                      scale: float) -> jax.Array:
    """softmax(q k^T * scale) v with the n query heads grouped under the k key/value heads (no KV
    repetition): query head i reads KV head i // (n / k), as transformers' repeat_kv. -> [B, T, n, v]

    Laid out KV-head-major, with a KV head's n / k query heads stacked as extra query rows, so both
    products are plain batched matmuls over (batch, KV head) with no transposes inside them, and the
    mask is added as a bias. Same result as the 5-d einsums it replaced, to float32 rounding; the
    step-time effect is in docs/benchmarks.md (benchmarks/speed_changes.py keeps the old form)."""
    b, t, n, hd = q_btnh.shape
    s, kv, vd = k_bskh.shape[1], k_bskh.shape[2], v_bskv.shape[-1]
    g = n // kv
    q_bkqh = q_btnh.reshape(b, t, kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, hd)
    scores = jnp.einsum("bkqh,bskh->bkqs", q_bkqh, k_bskh, preferred_element_type=jnp.float32) * scale
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)  # [B, 1, 1, T, S]
    scores = scores.reshape(b, kv, g, t, s) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskv.dtype).reshape(b, kv, g * t, s)
    out = jnp.einsum("bkqs,bskv->bkqv", probs, v_bskv)
    return out.reshape(b, kv, g, t, vd).transpose(0, 3, 1, 2, 4).reshape(b, t, n, vd)



def _xla(q, k, v, seg, pos, spec: AttnSpec):
    """Dense XLA attention: the [B, n, T, T] float32 scores and probabilities are materialised
    (memory O(T^2) per layer); the reference every other implementation is tested against."""
    return grouped_attention(q, k, v, dense_mask(seg, pos, spec.window), spec.scale)


def _chunked(q, k, v, seg, pos, spec: AttnSpec):
    """Blockwise attention in pure JAX with an online softmax and a recomputing custom VJP (flash
    attention's algorithm): memory O(T x block) per layer on every backend; key blocks above the
    diagonal are skipped. Blocks: model.attention_block_q / attention_block_kv (padded if needed)."""
    return chunked_attention(q, k, v, seg, pos, spec.scale, spec.window, spec.block_q, spec.block_kv)


def _splash(q, k, v, seg, pos, spec: AttnSpec):
    """Pallas TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention), as MaxText:
    native GQA, packing by SegmentIds, causal or local (sliding window) masks that skip empty blocks.
    The blocks must divide the sequence. Interpret mode off TPU (exact, slow)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, _ = q.shape
    q, k, v, vd = _pad_heads(q, k, v)
    bq, bk = min(spec.block_q, t), min(spec.block_kv, t)
    head = (sm.CausalMask((t, t)) if spec.window is None
            else sm.LocalMask((t, t), window_size=(spec.window - 1, 0), offset=0))
    blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                           block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kern = sk.make_splash_mha(sm.MultiHeadMask([head] * n), block_sizes=blocks, head_shards=1,
                              q_seq_shards=1, interpret=backend() != "tpu")
    # splash wants [heads, T, D] per example and queries already scaled.
    qh = (q * jnp.asarray(spec.scale, q.dtype)).transpose(0, 2, 1, 3)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    seg = seg.astype(jnp.int32)
    out = jax.vmap(lambda a, b_, c, s: kern(a, b_, c, segment_ids=sk.SegmentIds(q=s, kv=s)))(qh, kh, vh, seg)
    return out.transpose(0, 2, 1, 3)[..., :vd].astype(v.dtype)


def _pallas_gpu(q, k, v, seg, pos, spec: AttnSpec):
    """Pallas GPU (Triton) flash attention (jax.experimental.pallas.ops.gpu.attention.mha): causal,
    packing by segment ids; it has no GQA (the KV heads are repeated) and no sliding window.
    Interpret mode off GPU (exact, slow)."""
    from jax.experimental.pallas.ops.gpu import attention as ga

    b, t, n, _ = q.shape
    g = n // k.shape[2]
    q, k, v, vd = _pad_heads(q, k, v)
    if g > 1:
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    bq, bk = min(spec.block_q, t), min(spec.block_kv, t)
    blocks = ga.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bq, block_kv_dkv=bk, block_q_dq=bq,
                           block_kv_dq=bk)
    out = ga.mha(q, k, v, seg.astype(jnp.int32), sm_scale=spec.scale, causal=True, block_sizes=blocks,
                 interpret=backend() != "gpu")
    return out[..., :vd].astype(v.dtype)


def _cudnn(q, k, v, seg, pos, spec: AttnSpec):
    """cuDNN flash attention (jax.nn.dot_product_attention, implementation="cudnn"), bf16 or fp16 on
    an NVIDIA GPU: native GQA, causal with a left window; packing through a same-segment mask."""
    q, k, v, vd = _pad_heads(q, k, v)
    same = (seg[:, :, None] == seg[:, None, :])[:, None]
    window = None if spec.window is None else (spec.window - 1, 0)
    out = jax.nn.dot_product_attention(q, k, v, mask=same, scale=spec.scale, is_causal=True,
                                       local_window_size=window, implementation="cudnn")
    return out[..., :vd].astype(v.dtype)


def _refuse_splash(b, dtype, t, spec, qk_dim, v_dim):
    if b not in ("tpu", "cpu"):
        return f"it is a TPU kernel (interpret mode on cpu for tests), not for {b}"
    bk = min(spec.block_kv, t)
    if bk % 128:
        return (f"its key block (min(model.attention_block_kv, seq) = {bk}) must be a multiple of 128, "
                "the TPU lane width (use a sequence length and block that are multiples of 128)")
    return _divides(t, spec)


def _refuse_pallas_gpu(b, dtype, t, spec, qk_dim, v_dim):
    if b not in ("gpu", "cpu"):
        return f"it is a GPU (Triton) kernel (interpret mode on cpu for tests), not for {b}"
    if spec.window is not None:
        return "it has no sliding window (use chunked, cudnn or xla with model.sliding_window)"
    return _divides(t, spec)


def _refuse_cudnn(b, dtype, t, spec, qk_dim, v_dim):
    if b != "gpu":
        return f"it runs on gpu only, not on {b}"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"it needs train.dtype = bfloat16 (got {jnp.dtype(dtype).name})"
    d = max(qk_dim, v_dim)
    if d > 256 or d % 8:
        return f"its head width must be a multiple of 8 and at most 256 (got {d})"
    return None


ATTENTION_IMPLS.register("xla")(AttnImpl(_xla, lambda *a: None, ("cpu", "gpu", "tpu")))
ATTENTION_IMPLS.register("chunked")(AttnImpl(_chunked, lambda *a: None, ("cpu", "gpu", "tpu")))
ATTENTION_IMPLS.register("splash")(AttnImpl(_splash, _refuse_splash, ("tpu",), ("cpu",)))
ATTENTION_IMPLS.register("pallas_gpu")(AttnImpl(_pallas_gpu, _refuse_pallas_gpu, ("gpu",), ("cpu",)))
ATTENTION_IMPLS.register("cudnn")(AttnImpl(_cudnn, _refuse_cudnn, ("gpu",)))


def pick_auto(b: str, dtype, t: int, spec: AttnSpec, qk_dim: int, v_dim: int) -> str:
    """What `auto` runs: TPU splash; GPU cudnn where it can, else pallas_gpu, else chunked; CPU
    xla below CPU_CHUNKED_FROM tokens, chunked from there (blocks: `auto_spec`); xla wherever a
    kernel refuses."""
    if b == "tpu":
        order = ("splash", "chunked")
    elif b == "gpu":
        order = ("cudnn", "pallas_gpu", "chunked")
    else:
        order = ("chunked",) if t >= CPU_CHUNKED_FROM else ("xla",)
    s = spec._replace(impl="auto")
    for name in order:
        if ATTENTION_IMPLS.get(name).refuse(b, dtype, t, s, qk_dim, v_dim) is None:
            return name
    return "xla"


def auto_spec(b: str, name: str, t: int, spec: AttnSpec) -> AttnSpec:
    """The spec `auto` runs `name` with: on CPU, `chunked` blocks clipped to `cpu_block(t)` (the
    configured blocks are the accelerators' kernel tiles); elsewhere the spec as configured."""
    if b != "cpu" or name != "chunked":
        return spec
    blk = cpu_block(t)
    return spec._replace(block_q=min(spec.block_q, blk), block_kv=min(spec.block_kv, blk))


def resolve(spec: AttnSpec, dtype, t: int, qk_dim: int, v_dim: int, b: str | None = None) -> str:
    """The implementation to run for `spec.impl` here; a UserError of one line when it cannot run."""
    b = b or backend()
    if spec.impl == "auto":
        return pick_auto(b, dtype, t, spec, qk_dim, v_dim)
    impl = ATTENTION_IMPLS.get(spec.impl)
    why = impl.refuse(b, dtype, t, spec, qk_dim, v_dim)
    if why is not None:
        ok = [n for n in ATTENTION_IMPLS.names()
              if ATTENTION_IMPLS.get(n).refuse(b, dtype, t, spec, qk_dim, v_dim) is None]
        raise UserError(f"model.attention_impl = {spec.impl!r} cannot run here: {why}; allowed here "
                        f"({b}, {jnp.dtype(dtype).name}, seq {t}): auto, {', '.join(ok)}")
    return spec.impl


def attend(q, k, v, segment_ids, positions, spec: AttnSpec) -> jax.Array:
    """softmax(q k^T * scale) v under the causal / segment / window mask, by `spec.impl`."""
    b = backend()
    name = resolve(spec, q.dtype, q.shape[1], q.shape[-1], v.shape[-1], b)
    if spec.impl == "auto":
        spec = auto_spec(b, name, q.shape[1], spec)
    return ATTENTION_IMPLS.get(name).fn(q, k, v, segment_ids, positions, spec)


def supported(b: str, dtype, t: int, spec: AttnSpec, qk_dim: int, v_dim: int) -> dict[str, str | None]:
    """Every implementation -> None where it runs on `b`, else why not (for the self-check)."""
    return {n: ATTENTION_IMPLS.get(n).refuse(b, dtype, t, spec._replace(impl=n), qk_dim, v_dim)
            for n in ATTENTION_IMPLS.names()}


__all__ = ["ATTENTION_IMPLS", "AttnImpl", "AttnSpec", "CPU_CHUNKED_FROM", "attend", "auto_spec",
           "cpu_block", "dense_mask", "pick_auto", "resolve", "supported"]
