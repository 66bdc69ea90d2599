"""Routers and router losses.

A router is a function registered in `ROUTERS`:

    router(logits_te: f32[T, E], cfg: MoEConfig, ctx: RouteContext) -> Routing

`Routing` lists routed *assignments* (token, expert, combine weight), N of them. Token-choice routers
(top-k) emit N = T*k assignments ordered choice-major (every token's first choice, then every
token's second ...), which is the priority order capacity dispatch fills its buffers in (GShard,
Switch). The same record also fits expert-choice (each expert picks tokens) and hash routing, so the
dispatchers never need to know which router ran.

Losses are computed from `RouterStats`, plain sums over tokens. Summing is what makes them exact under
data/expert parallelism: each shard sums its tokens, the sums are psum-ed, then the loss is taken.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.registry import Registry


class Routing(NamedTuple):
    token: jax.Array   # int32[N]   which token each assignment routes
    expert: jax.Array  # int32[N]   to which expert
    weight: jax.Array  # f32[N]     combine weight of the expert's output for that token
    probs: jax.Array   # f32[T, E]  router probabilities (for the load-balancing loss)
    logits: jax.Array  # f32[T, E]  router logits (for the z-loss)


class RouteContext(NamedTuple):
    """What some routers need beyond the logits (random routers, hash routing)."""
    rng: Optional[jax.Array] = None
    token_ids: Optional[jax.Array] = None  # int32[T]


RouterFn = Callable[[jax.Array, MoEConfig, RouteContext], Routing]
ROUTERS: Registry[RouterFn] = Registry("router")


def choice_major(indices_tk: jax.Array, weights_tk: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flatten [T, k] choices into N = T*k assignments, all first choices before any second choice."""
    t, k = indices_tk.shape
    token = jnp.tile(jnp.arange(t, dtype=jnp.int32), k)
    return token, indices_tk.T.reshape(-1).astype(jnp.int32), weights_tk.T.reshape(-1)


@ROUTERS.register("topk")
def topk_router(logits_te: jax.Array, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """Softmax over experts, keep the top k (Shazeer et al. 2017; GShard; Mixtral, Jiang et al. 2024).

    With `cfg.renormalize` the k kept probabilities are rescaled to sum to 1 (Mixtral, OLMoE);
    without it they are used as they are (Qwen1.5-MoE, DeepSeekMoE). k = 1 without renormalising is
    the Switch Transformer router.
    """
    del ctx
    probs = jax.nn.softmax(logits_te, axis=-1)
    weights, indices = jax.lax.top_k(probs, cfg.top_k)
    if cfg.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    token, expert, weight = choice_major(indices, weights)
    return Routing(token, expert, weight, probs, logits_te)


class RouterStats(NamedTuple):
    """Sums over (valid) tokens; add them across shards, then call the loss functions."""
    counts: jax.Array    # f32[E]  assignments routed to each expert (before any capacity drop)
    prob_sum: jax.Array  # f32[E]  sum over tokens of the router probability of each expert
    tokens: jax.Array    # f32[]   number of tokens
    z_sum: jax.Array     # f32[]   sum over tokens of logsumexp(logits)^2


def router_stats(r: Routing, valid_t: jax.Array | None = None) -> RouterStats:
    """Statistics of one routing; `valid_t` (bool[T]) leaves padding tokens out."""
    t, e = r.probs.shape
    valid = jnp.ones((t,), jnp.float32) if valid_t is None else valid_t.astype(jnp.float32)
    counts = jnp.zeros((e,), jnp.float32).at[r.expert].add(valid[r.token])
    prob_sum = valid @ r.probs
    z = jax.nn.logsumexp(r.logits, axis=-1)
    return RouterStats(counts, prob_sum, jnp.sum(valid), valid @ (z * z))


def load_balancing_loss(s: RouterStats) -> jax.Array:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eq. 4), for any k.

        loss = E * sum_e f_e * P_e

    f_e: fraction of routed slots that went to expert e (sums to 1 over experts);
    P_e: mean router probability of expert e over tokens (sums to 1).
    A perfectly balanced router (f_e = P_e = 1/E) scores exactly 1.0; the minimum is 1.0 whenever f is
    uniform, and it grows to E when every token goes to one expert with probability 1. (Hugging Face
    Mixtral sums over the k choices instead of normalising f, so its value is k times this one.)
    """
    e = s.counts.shape[0]
    f = s.counts / jnp.maximum(jnp.sum(s.counts), 1.0)
    p = s.prob_sum / jnp.maximum(s.tokens, 1.0)
    return e * jnp.sum(f * p)


def z_loss(s: RouterStats) -> jax.Array:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
    return s.z_sum / jnp.maximum(s.tokens, 1.0)
