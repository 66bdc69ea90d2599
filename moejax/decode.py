"""Autoregressive decoding from a model (greedy or sampled), batched, few compilations.

Two paths with the same tokens under greedy decoding (tests/test_decode.py checks every attention):
- KV cache (default): one prefill pass over the right-padded prompts writes every layer's keys and
  values (moejax.model.kv_cache), then one token per step attends over the cache: O(T) per token.
- `kv_cache=False` (the reference): each new token re-runs the training forward pass over the whole
  fixed-size buffer (same masks, same dispatch): O(T^2) per token.

Shapes are bucketed (rows to a power of two, lengths to multiples of 32) so a handful compile.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.errors import UserError
from moejax.model.kv_cache import forward_cached, init_cache

LENGTH_BUCKET = 32


def bucket(n: int, multiple: int = LENGTH_BUCKET) -> int:
    return -(-n // multiple) * multiple


def row_bucket(n: int, cap: int) -> int:
    """Rows padded to the next power of two (at most `cap`)."""
    return min(cap, 1 << max(n - 1, 0).bit_length())


def sample(logits_bv: jax.Array, rng: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Next tokens int32[B]: argmax when temperature == 0, else a draw from softmax(logits / T)
    restricted to the `top_k` most likely tokens (0 = all) and to the smallest set whose probability
    reaches `top_p` (nucleus sampling, Holtzman et al. 2020; 1.0 = all)."""
    if temperature <= 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep_sorted = before < top_p  # the most likely token is always kept
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _forbid_stops(logits_bv, stop_ids, generated, min_new: int):
    """Stop ids get no probability before `min_new` tokens were generated."""
    if min_new <= 0:
        return logits_bv
    is_stop = jnp.zeros((logits_bv.shape[-1],), bool).at[stop_ids].set(True)
    return jnp.where(is_stop[None, :] & (generated < min_new), jnp.finfo(jnp.float32).min, logits_bv)


_STATIC = ("graphdef", "max_new", "min_new", "temperature", "top_k", "top_p")


@partial(jax.jit, static_argnames=_STATIC)
def _decode_nocache(graphdef, params, buf_bl, lengths_b, stop_ids, rng, *, max_new: int, min_new: int,
                    temperature: float, top_k: int, top_p: float):
    model = nnx.merge(graphdef, params)
    b, total = buf_bl.shape
    rows = jnp.arange(b)

    def step(carry):
        i, buf, lengths, done, rng = carry
        segment = (jnp.arange(total)[None, :] < lengths[:, None]).astype(jnp.int32)
        logits, _ = model(buf, segment_ids=segment)
        last = _forbid_stops(logits[rows, lengths - 1], stop_ids, i, min_new)
        rng, key = jax.random.split(rng)
        nxt = sample(last, key, temperature=temperature, top_k=top_k, top_p=top_p).astype(buf.dtype)
        write = ~done & (lengths < total)
        buf = buf.at[rows, jnp.minimum(lengths, total - 1)].set(
            jnp.where(write, nxt, buf[rows, jnp.minimum(lengths, total - 1)]))
        lengths = lengths + write.astype(lengths.dtype)
        done = done | (write & jnp.isin(nxt, stop_ids))
        return i + 1, buf, lengths, done, rng

    # A while loop (decoding needs no gradients) stops as soon as every row has ended.
    init = (0, buf_bl, lengths_b, jnp.zeros((b,), bool), rng)
    _, buf, lengths, _, _ = jax.lax.while_loop(lambda c: (c[0] < max_new) & ~jnp.all(c[3]), step, init)
    return buf, lengths


@partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def prefill(graphdef, params, prompt_bp, lengths_b, *, cache_len: int):
    """Prompt logits f32[B, P, V] and the caches ([B, cache_len] slots) after the prompts."""
    model = nnx.merge(graphdef, params)
    b, p = prompt_bp.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    valid = positions < lengths_b[:, None]
    return forward_cached(model, prompt_bp, positions, init_cache(model, b, cache_len), valid)


@partial(jax.jit, static_argnames=_STATIC)
def _decode_cached(graphdef, params, caches, first_logits_bv, lengths_b, stop_ids, rng, *, max_new: int,
                   min_new: int, temperature: float, top_k: int, top_p: float):
    model = nnx.merge(graphdef, params)
    b = lengths_b.shape[0]
    out = jnp.zeros((b, max_new), jnp.int32)

    def step(carry):
        i, out, logits, lengths, done, caches, rng = carry
        rng, key = jax.random.split(rng)
        nxt = sample(_forbid_stops(logits, stop_ids, i, min_new), key, temperature=temperature,
                     top_k=top_k, top_p=top_p)
        out = out.at[:, i].set(jnp.where(done, 0, nxt))
        n_new = jnp.where(done, 0, 1)
        done = done | jnp.isin(nxt, stop_ids)
        # The new token goes in at its row's next slot; finished rows keep writing harmlessly past
        # their end (their slots are never read by a live row).
        logits_b1v, caches = forward_cached(model, nxt[:, None], lengths[:, None], caches)
        return i + 1, out, logits_b1v[:, 0], lengths + n_new, done, caches, rng

    init = (0, out, first_logits_bv, lengths_b, jnp.zeros((b,), bool), caches, rng)
    _, out, _, _, _, _, _ = jax.lax.while_loop(lambda c: (c[0] < max_new) & ~jnp.all(c[4]), step, init)
    return out


def _check_lengths(prompts, max_len):
    for i, p in enumerate(prompts):
        if not len(p):
            raise UserError(f"prompt {i} is empty (0 tokens)")
        if max_len is not None and len(p) > max_len:
            raise UserError(f"prompt {i} has {len(p)} tokens, longer than the model's maximum length "
                            f"{max_len}")


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new: int, stop_ids: Sequence[int],
             pad_id: int = 0, temperature: float = 0.0, seed: int = 0, batch_size: int = 128,
             top_k: int = 0, top_p: float = 1.0, min_new: int = 0, kv_cache: bool = True,
             max_len: int | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new` tokens; a continuation ends after its first stop id
    (included), and contains no stop id before `min_new` tokens. Prompts are right-padded to a
    shared bucketed length; `max_len` (if given) bounds a prompt's length."""
    _check_lengths(prompts, max_len)
    graphdef, params = nnx.split(model)
    out: list[list[int]] = []
    longest = max(len(p) for p in prompts)
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    stops_set = set(stop_ids)
    kw = dict(max_new=max_new, min_new=min_new, temperature=float(temperature), top_k=int(top_k),
              top_p=float(top_p))
    rows = row_bucket(min(len(prompts), batch_size), batch_size)
    for start in range(0, len(prompts), rows):
        chunk = prompts[start:start + rows]
        rng = jax.random.key(seed + start)
        width = bucket(longest) if kv_cache else bucket(longest + max_new)
        buf = np.full((rows, width), pad_id, np.int32)
        lengths = np.ones((rows,), np.int32)
        for i, p in enumerate(chunk):
            buf[i, :len(p)] = p
            lengths[i] = len(p)
        if kv_cache:
            logits, caches = prefill(graphdef, params, jnp.asarray(buf), jnp.asarray(lengths),
                                     cache_len=bucket(longest + max_new))
            first = logits[jnp.arange(rows), jnp.asarray(lengths) - 1]
            new = np.asarray(jax.device_get(_decode_cached(graphdef, params, caches, first,
                                                           jnp.asarray(lengths), stops, rng, **kw)))
            for i in range(len(chunk)):
                row = new[i].tolist()
                end = next((j + 1 for j, t in enumerate(row) if t in stops_set), len(row))
                out.append(row[:end])
        else:
            new_buf, new_len = jax.device_get(_decode_nocache(graphdef, params, jnp.asarray(buf),
                                                              jnp.asarray(lengths), stops, rng, **kw))
            for i, p in enumerate(chunk):
                out.append(new_buf[i, len(p):new_len[i]].tolist())
    return out
