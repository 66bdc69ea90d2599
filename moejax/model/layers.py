"""Small building blocks: parameters with logical axes, RMSNorm, RoPE, the SwiGLU FFN.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (one name per dimension). The
sharding rules (moejax.parallel) map these names to mesh axes; the model never names a mesh axis.
Logical names: vocab, embed, heads, kv_heads, head_dim, mlp, exp (the expert dimension), norm.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float) -> nnx.Param:
    """A float32 normal(0, std) parameter annotated with its logical axes."""
    assert len(shape) == len(axes), (shape, axes)
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, logical_axes=axes)


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    return variable.get_metadata().get("logical_axes")


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype (bf16 mean-of-squares loses precision).
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021) in the rotate-half layout used by Llama checkpoints."""
    half = x_btnh.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_bth)[:, :, None, :]
    sin = jnp.sin(angles_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


class SwiGLU(nnx.Module):
    """Dense gated FFN: down(silu(x @ gate) * (x @ up)) (Shazeer 2020)."""

    def __init__(self, d_model: int, d_ff: int, *, std: float, rngs: nnx.Rngs):
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
        self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), std)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = jax.nn.silu(x @ self.w_gate[...].astype(dt)) * (x @ self.w_up[...].astype(dt))
        return h @ self.w_down[...].astype(dt)
