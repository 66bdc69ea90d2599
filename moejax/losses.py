"""Language-model losses shared by training and evaluation (no training machinery here)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _ce_stats(x_btv, t_bt):
    """Row max, log-sum-exp of the shifted row, shifted target logit (float32 logits)."""
    max_bt1 = jax.lax.stop_gradient(jnp.max(x_btv, axis=-1, keepdims=True))
    shifted = x_btv - max_bt1
    lse_bt1 = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))
    return max_bt1, lse_bt1, jnp.take_along_axis(shifted, t_bt[..., None], axis=-1)[..., 0]


def _ce_grad(x_btv, max_bt1, lse_bt1, t_bt, scale_bt):
    """d(loss sum)/d(logits) = (softmax - onehot) * scale, the softmax remade from the saved stats."""
    onehot = jnp.arange(x_btv.shape[-1], dtype=t_bt.dtype) == t_bt[..., None]
    return jnp.exp((x_btv - max_bt1) - lse_bt1) * scale_bt[..., None] - jnp.where(onehot, scale_bt[..., None], 0.0)


def _stats_by_chunk(chunk_stats, b: int, t: int, c: int):
    """`_ce_stats` of every chunk of c positions (`chunk_stats(i)`), written into [b, t] buffers."""
    def body(i, acc):
        return tuple(jax.lax.dynamic_update_slice_in_dim(a, p, i * c, axis=1) for a, p in zip(acc, chunk_stats(i)))

    init = (jnp.zeros((b, t, 1), jnp.float32), jnp.zeros((b, t, 1), jnp.float32), jnp.zeros((b, t), jnp.float32))
    return jax.lax.fori_loop(0, t // c, body, init)


def lm_loss_sum(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Sum over masked positions of the next-token cross-entropy (float32).

    The same arithmetic as `-take_along_axis(log_softmax(logits), targets)` (the value is bitwise
    the same), with a hand-written backward, `(softmax - onehot) * mask * g`, recomputed from the
    logits and the per-row max and log-sum-exp, both passes in chunks of positions (a loop over
    the sequence axis, which no mesh axis splits, so the batch stays sharded). Autodiff of
    log_softmax + take_along_axis keeps the [B, T, V] log-probabilities for the backward pass and
    builds two more [B, T, V] buffers in it (the scattered target gradient, the softmax); this keeps
    none but the logits' gradient itself, and each pass over a chunk stays in cache
    (docs/benchmarks.md)."""
    b, t, _ = logits_btv.shape
    c = int(np.gcd(t, max(8, 128 // max(b, 1))))  # positions per chunk: b * c ~ 128 rows of V
    c = c if c >= 4 else t
    k = t // c

    def chunk(x, i):
        return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)

    def forward(x_btv, t_bt):
        if k == 1:
            return _ce_stats(x_btv, t_bt)
        return _stats_by_chunk(lambda i: _ce_stats(chunk(x_btv, i), chunk(t_bt, i)), b, t, c)

    @jax.custom_vjp
    def ce_sum(x_btv, t_bt, m_bt):
        _, lse, tgt = forward(x_btv, t_bt)
        return jnp.sum(-(tgt - lse[..., 0]) * m_bt)

    def fwd(x_btv, t_bt, m_bt):
        mx, lse, tgt = forward(x_btv, t_bt)
        nll_bt = -(tgt - lse[..., 0])
        return jnp.sum(nll_bt * m_bt), (x_btv, mx, lse, t_bt, m_bt, nll_bt)

    def bwd(res, g):
        x_btv, mx, lse, t_bt, m_bt, nll_bt = res
        scale_bt = m_bt * g

        if k == 1:
            dx = _ce_grad(x_btv, mx, lse, t_bt, scale_bt)
        else:
            dx = jax.lax.fori_loop(0, k, lambda i, dx: jax.lax.dynamic_update_slice_in_dim(
                dx, _ce_grad(*(chunk(a, i) for a in (x_btv, mx, lse, t_bt, scale_bt))), i * c, axis=1),
                jnp.zeros_like(x_btv))
        return dx, None, nll_bt * g

    ce_sum.defvjp(fwd, bwd)
    return ce_sum(logits_btv.astype(jnp.float32), targets_bt, mask_bt.astype(jnp.float32))


def make_eval_step(graphdef) -> Callable:
    """Jitted `(params, batch) -> (loss sum, target count)` of a packed batch (no router losses)."""
    @jax.jit
    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        logits, _ = model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
        return lm_loss_sum(logits, batch["targets"], batch["loss_mask"]), jnp.sum(batch["loss_mask"])

    return eval_step


# The fused LM head + cross-entropy: where it runs, and its chunk size.
FUSED_HEAD_MAX_WEIGHT_BYTES = 32 * 2 ** 20  # the head weight is re-read once per chunk: keep it cached
FUSED_HEAD_CHUNK_LOGIT_BYTES = 4 * 2 ** 20  # one chunk's float32 logits [b, c, V] stay in cache


def chunk_positions(t: int, b: int, v: int) -> int:
    """Positions per chunk of the fused head: the largest divisor of t whose b x c x V float32
    logits fit FUSED_HEAD_CHUNK_LOGIT_BYTES (at least 1)."""
    target = max(1, FUSED_HEAD_CHUNK_LOGIT_BYTES // (4 * v * max(b, 1)))
    return max(c for c in range(1, min(t, target) + 1) if t % c == 0)


def fused_head_applies(head_dv: jax.Array, vocab_split: bool) -> bool:
    """Whether `head_loss_sum` fuses the head into the loss: on CPU, with an unsplit vocabulary
    and a head weight small enough to stay in cache across chunks. Measured on the 2-core VM at the
    peer comparison's shapes (benchmarks/head_loss.py, docs/benchmarks.md): forward + backward of
    head + loss 1.4x faster, 1-2% of the whole train step. Accelerators keep the [B, T, V]
    logits: large matmuls are what they run best, and the vocabulary may be split over `tensor`."""
    nbytes = head_dv.size * head_dv.dtype.itemsize
    return jax.default_backend() == "cpu" and not vocab_split and nbytes <= FUSED_HEAD_MAX_WEIGHT_BYTES


def head_loss_sum(x_btd: jax.Array, head_dv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array,
                  fused: bool = True) -> jax.Array:
    """`lm_loss_sum(x @ head)` (float32 logits), with the head's matmul fused into the loss when
    `fused`: the logits are made `c` positions at a time (a loop over the sequence axis, so a
    sharded batch stays sharded), and the backward pass remakes each chunk's logits from x and the
    saved row max and log-sum-exp, then accumulates dx and d(head) from `(softmax - onehot) * mask * g`
    (the Liger / FlashAttention trick: one more matmul, no [B, T, V] buffer, every chunk in cache)."""
    if not fused:
        return lm_loss_sum(jnp.einsum("btd,dv->btv", x_btd, head_dv, preferred_element_type=jnp.float32),
                           targets_bt, mask_bt)
    b, t, _ = x_btd.shape
    c = chunk_positions(t, b, head_dv.shape[1])
    mask_bt = mask_bt.astype(jnp.float32)

    def chunk(a, i):
        return jax.lax.dynamic_slice_in_dim(a, i * c, c, axis=1)

    def logits(xc, w):
        return jnp.einsum("bcd,dv->bcv", xc, w, preferred_element_type=jnp.float32)

    def forward(x, w, t_bt):
        return _stats_by_chunk(lambda i: _ce_stats(logits(chunk(x, i), w), chunk(t_bt, i)), b, t, c)

    @jax.custom_vjp
    def ce_sum(x, w, t_bt, m_bt):
        _, lse, tgt = forward(x, w, t_bt)
        return jnp.sum(-(tgt - lse[..., 0]) * m_bt)

    def fwd(x, w, t_bt, m_bt):
        mx, lse, tgt = forward(x, w, t_bt)
        nll_bt = -(tgt - lse[..., 0])
        return jnp.sum(nll_bt * m_bt), (x, w, mx, lse, t_bt, m_bt, nll_bt)

    def bwd(res, g):
        x, w, mx, lse, t_bt, m_bt, nll_bt = res
        scale_bt = m_bt * g

        def body(i, acc):
            dx, dw = acc
            xc = chunk(x, i)
            dlg = _ce_grad(logits(xc, w), chunk(mx, i), chunk(lse, i), chunk(t_bt, i), chunk(scale_bt, i))
            dxc = jnp.einsum("bcv,dv->bcd", dlg, w.astype(jnp.float32)).astype(x.dtype)
            dw = dw + jnp.einsum("bcd,bcv->dv", xc.astype(jnp.float32), dlg)
            return jax.lax.dynamic_update_slice_in_dim(dx, dxc, i * c, axis=1), dw

        dx, dw = jax.lax.fori_loop(0, t // c, body, (jnp.zeros_like(x), jnp.zeros(w.shape, jnp.float32)))
        return dx, dw.astype(w.dtype), None, nll_bt * g

    ce_sum.defvjp(fwd, bwd)
    return ce_sum(x_btd, head_dv, targets_bt, mask_bt)
