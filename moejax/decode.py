"""Autoregressive decoding from a model (greedy or sampled), batched, one compilation per shape.

No KV cache: each new token re-runs the model over the fixed-size buffer. That keeps decoding exactly
the training forward pass (same masks, same dispatch) and is cheap at evaluation sizes.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@partial(jax.jit, static_argnames=("graphdef", "max_new", "temperature"))
def _decode(graphdef, params, buf_bl, lengths_b, stop_ids, rng, *, max_new: int, temperature: float):
    model = nnx.merge(graphdef, params)
    b, total = buf_bl.shape
    rows = jnp.arange(b)

    def step(carry):
        i, buf, lengths, done, rng = carry
        segment = (jnp.arange(total)[None, :] < lengths[:, None]).astype(jnp.int32)
        logits, _ = model(buf, segment_ids=segment)
        last = logits[rows, lengths - 1]
        if temperature > 0:
            rng, key = jax.random.split(rng)
            nxt = jax.random.categorical(key, last / temperature).astype(buf.dtype)
        else:
            nxt = jnp.argmax(last, axis=-1).astype(buf.dtype)
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


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new: int, stop_ids: Sequence[int],
             pad_id: int = 0, temperature: float = 0.0, seed: int = 0, batch_size: int = 128,
             ) -> list[list[int]]:
    """Continue each prompt by up to `max_new` tokens; a continuation ends after its first stop id
    (included). Prompts are right-padded to a shared bucketed length so few shapes compile."""
    graphdef, params = nnx.split(model)
    out: list[list[int]] = []
    longest = max(len(p) for p in prompts)
    total = -(-(longest + max_new) // 32) * 32
    stops = jnp.asarray(list(stop_ids), jnp.int32)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        buf = np.full((batch_size, total), pad_id, np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for i, p in enumerate(chunk):
            buf[i, :len(p)] = p
            lengths[i] = len(p)
        rng = jax.random.key(seed + start)
        new_buf, new_len = jax.device_get(_decode(graphdef, params, jnp.asarray(buf), jnp.asarray(lengths),
                                                  stops, rng, max_new=max_new, temperature=temperature))
        for i, p in enumerate(chunk):
            out.append(new_buf[i, len(p):new_len[i]].tolist())
    return out
