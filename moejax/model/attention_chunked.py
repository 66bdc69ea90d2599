"""Blockwise attention with an online softmax (FlashAttention, Dao et al. 2022, arXiv:2205.14135), in
pure JAX, so it runs on every backend.

The T x S probabilities are never stored: queries are taken `block_q` rows at a time (a sequential
`lax.map`), and for each query block the key/value blocks up to the diagonal are visited in a loop
that keeps the running row maximum m, the running denominator l and the unnormalised output. Key
blocks wholly above the diagonal are not visited (causal), so about half the score FLOPs of the
dense form are skipped. The backward pass is a custom VJP that recomputes each block's probabilities
from the saved log-sum-exp (m + log l) instead of storing them: memory is O(T x block) per layer,
not O(T x S).

Layout and mask are those of `attention.grouped_attention` (queries grouped under their KV head, no
KV repetition; causal, same packed segment, and with a window `pos_q - pos_k < window`); scores and
softmax statistics in float32; probabilities cast to the value dtype before the product with v, as
the dense form.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min


def _pad_to(x: jax.Array, axis: int, multiple: int, value) -> jax.Array:
    n = x.shape[axis]
    extra = -n % multiple
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, constant_values=value)


def _block_mask(seg_q, pos_q, idx_q, seg_k, pos_k, idx_k, window):
    """[B, bq, bk] bool: causal (by index), same segment, inside the window (by position)."""
    m = (idx_q[:, None] >= idx_k[None, :])[None] & (seg_q[:, :, None] == seg_k[:, None, :])
    if window is not None:
        m = m & (pos_q[:, :, None] - pos_k[:, None, :] < window)
    return m


def _layout(q, k, v, seg, pos, bq, bk):
    """Pad to whole blocks and group: q [B, kv, g, T', hd], k [B, S', kv, hd], v [B, S', kv, vd]."""
    b, t, n, hd = q.shape
    kv = k.shape[2]
    q = _pad_to(q, 1, bq, 0)
    k, v = _pad_to(k, 1, bk, 0), _pad_to(v, 1, bk, 0)
    # Padded rows get segment -1: they see only padded keys (themselves, so no empty softmax row) and
    # real rows never see them.
    seg_q, pos_q = _pad_to(seg, 1, bq, -1), _pad_to(pos, 1, bq, 0)
    seg_k, pos_k = _pad_to(seg, 1, bk, -1), _pad_to(pos, 1, bk, 0)
    q = q.reshape(b, q.shape[1], kv, n // kv, hd).transpose(0, 2, 3, 1, 4)
    return q, k, v, seg_q, pos_q, seg_k, pos_k


def _kv_blocks_for(i, bq, bk):
    """Number of key blocks at or below the diagonal for query block i."""
    return ((i + 1) * bq - 1) // bk + 1


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def chunked_attention(q, k, v, seg, pos, scale: float, window: int | None, block_q: int,
                      block_kv: int):
    """q [B, T, n, hd], k [B, T, kv, hd], v [B, T, kv, vd], seg / pos int[B, T] -> [B, T, n, vd]."""
    return _forward(q, k, v, seg, pos, scale, window, block_q, block_kv)[0]


def _key_block_scores(qb, sq, pq, iq, kp, vp, seg_k, pos_k, j, bk, window, scale):
    """Key block j: its keys and values, the [B, 1, 1, bq, bk] mask against query block (sq, pq, iq), and the
    float32 scores q k^T * scale (the same in the forward and the recomputing backward)."""
    kb = jax.lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=1)
    vb = jax.lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=1)
    sk = jax.lax.dynamic_slice_in_dim(seg_k, j * bk, bk, axis=1)
    pk = jax.lax.dynamic_slice_in_dim(pos_k, j * bk, bk, axis=1)
    mask = _block_mask(sq, pq, iq, sk, pk, j * bk + jnp.arange(bk), window)[:, None, None]
    s = jnp.einsum("bkgqh,bskh->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale
    return kb, vb, mask, s


def _forward(q, k, v, seg, pos, scale, window, block_q, block_kv):
    b, t, n, _ = q.shape
    vd = v.shape[-1]
    bq, bk = min(block_q, t), min(block_kv, t)
    qg, kp, vp, seg_q, pos_q, seg_k, pos_k = _layout(q, k, v, seg, pos, bq, bk)
    kv, g = qg.shape[1], qg.shape[2]

    def one_q_block(i):
        qb = jax.lax.dynamic_slice_in_dim(qg, i * bq, bq, axis=3)
        sq = jax.lax.dynamic_slice_in_dim(seg_q, i * bq, bq, axis=1)
        pq = jax.lax.dynamic_slice_in_dim(pos_q, i * bq, bq, axis=1)
        iq = i * bq + jnp.arange(bq)

        def body(j, carry):
            m, l, acc = carry
            kb, vb, mask, s = _key_block_scores(qb, sq, pq, iq, kp, vp, seg_k, pos_k, j, bk, window, scale)
            s = jnp.where(mask, s, _NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            l = alpha * l + p.sum(-1)
            acc = alpha[..., None] * acc + jnp.einsum("bkgqs,bskv->bkgqv", p.astype(vb.dtype), vb,
                                                      preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full((b, kv, g, bq), _NEG, jnp.float32), jnp.zeros((b, kv, g, bq), jnp.float32),
                jnp.zeros((b, kv, g, bq, vd), jnp.float32))
        upper = jnp.minimum(_kv_blocks_for(i, bq, bk), kp.shape[1] // bk)
        m, l, acc = jax.lax.fori_loop(0, upper, body, init)
        l_safe = jnp.where(l == 0, 1.0, l)
        return acc / l_safe[..., None], m + jnp.log(l_safe)

    nq = qg.shape[3] // bq
    out, lse = jax.lax.map(one_q_block, jnp.arange(nq))  # [nq, B, kv, g, bq, vd], [nq, B, kv, g, bq]
    out = out.transpose(1, 2, 3, 0, 4, 5).reshape(b, kv, g, nq * bq, vd)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, kv, g, nq * bq)
    o = out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, vd).astype(v.dtype)
    return o, lse


def _fwd(q, k, v, seg, pos, scale, window, block_q, block_kv):
    o, lse = _forward(q, k, v, seg, pos, scale, window, block_q, block_kv)
    return o, (q, k, v, seg, pos, o, lse)


def _bwd(scale, window, block_q, block_kv, res, do):
    q, k, v, seg, pos, o, lse = res
    b, t, n, hd = q.shape
    bq, bk = min(block_q, t), min(block_kv, t)
    qg, kp, vp, seg_q, pos_q, seg_k, pos_k = _layout(q, k, v, seg, pos, bq, bk)
    kv, g = qg.shape[1], qg.shape[2]
    dog = _layout(do, k, v, seg, pos, bq, bk)[0].astype(jnp.float32)   # [B, kv, g, T', vd]
    og = _layout(o, k, v, seg, pos, bq, bk)[0].astype(jnp.float32)
    delta = jnp.sum(dog * og, axis=-1)                                  # [B, kv, g, T']
    nq = qg.shape[3] // bq

    def one_q_block(carry, i):
        dk, dv = carry
        qb = jax.lax.dynamic_slice_in_dim(qg, i * bq, bq, axis=3)
        dob = jax.lax.dynamic_slice_in_dim(dog, i * bq, bq, axis=3)
        lb = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
        db = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
        sq = jax.lax.dynamic_slice_in_dim(seg_q, i * bq, bq, axis=1)
        pq = jax.lax.dynamic_slice_in_dim(pos_q, i * bq, bq, axis=1)
        iq = i * bq + jnp.arange(bq)

        def body(j, inner):
            dq, dk, dv = inner
            kb, vb, mask, s = _key_block_scores(qb, sq, pq, iq, kp, vp, seg_k, pos_k, j, bk, window, scale)
            p = jnp.where(mask, jnp.exp(s - lb[..., None]), 0.0)
            # The forward multiplies v by p in v's dtype; its gradient flows through that cast.
            p_v = p.astype(vb.dtype)
            dv_j = jnp.einsum("bkgqs,bkgqv->bskv", p_v, dob.astype(vb.dtype),
                              preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqv,bskv->bkgqs", dob.astype(vb.dtype), vb,
                            preferred_element_type=jnp.float32)
            ds = p * (dp - db[..., None]) * scale
            dq = dq + jnp.einsum("bkgqs,bskh->bkgqh", ds.astype(kb.dtype), kb,
                                 preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bkgqs,bkgqh->bskh", ds.astype(qb.dtype), qb,
                              preferred_element_type=jnp.float32)
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, j * bk, bk, axis=1) + dk_j, j * bk, axis=1)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, j * bk, bk, axis=1) + dv_j, j * bk, axis=1)
            return dq, dk, dv

        upper = jnp.minimum(_kv_blocks_for(i, bq, bk), kp.shape[1] // bk)
        dq0 = jnp.zeros(qb.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(0, upper, body, (dq0, dk, dv))
        return (dk, dv), dq

    init = (jnp.zeros(kp.shape, jnp.float32), jnp.zeros(vp.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(one_q_block, init, jnp.arange(nq))     # dq [nq, B, kv, g, bq, hd]
    dq = dq.transpose(1, 2, 3, 0, 4, 5).reshape(b, kv, g, nq * bq, hd)[:, :, :, :t]
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, t, n, hd).astype(q.dtype)
    return (dq, dk[:, :t].astype(k.dtype), dv[:, :t].astype(v.dtype), None, None)


chunked_attention.defvjp(_fwd, _bwd)
