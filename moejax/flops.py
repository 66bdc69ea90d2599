"""Model FLOPs per token (active parameters only) and peak FLOP/s per device, for MFU."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from moejax.config import ModelConfig

# Dense bf16 peak TFLOP/s per chip, from the vendors' data sheets (TPU: cloud.google.com/tpu/docs
# system architecture pages; NVIDIA: H100/H200 SXM, A100 SXM, L4 data sheets, without sparsity).
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0,
}


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Parameters each token multiplies by in one forward pass: attention, the dense FFNs, the
    router, the k chosen experts and the shared experts of MoE layers, and the LM head. The
    embedding lookup is a gather, not a matmul, and is left out."""
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    m = cfg.moe
    attn = d * hd * (2 * h + 2 * kv)
    total = 0
    for i in range(cfg.n_layers):
        total += attn
        if cfg.is_moe_layer(i):
            shared = m.num_shared_experts * (m.d_shared or m.d_expert)
            total += d * m.num_experts + 3 * d * (m.top_k * m.d_expert + shared)
        else:
            total += 3 * d * cfg.d_ff
    return total + d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 N (forward + backward matmuls) + 12 L H hd T (attention scores and values), as in PaLM
    (Chowdhery et al. 2022, appendix B), N counting active parameters only."""
    return 6.0 * matmul_params_per_token(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len


_probe_cache: dict[str, float] = {}


def cpu_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
    """This CPU's measured float32 matmul rate in TFLOP/s (best of `repeats`): the CPU 'peak'."""
    if "cpu" not in _probe_cache:
        x = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda a: a @ a)
        f(x).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(x).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        _probe_cache["cpu"] = 2 * n ** 3 / best / 1e12
    return _probe_cache["cpu"]


def peak_tflops(device: jax.Device | None = None, override: float = 0.0) -> float | None:
    """Peak TFLOP/s of one device: the override if set, the table by device kind, a probe on CPU."""
    if override > 0:
        return override
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return cpu_matmul_tflops()
    kind = device.device_kind
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_TFLOPS[name]
    return None
