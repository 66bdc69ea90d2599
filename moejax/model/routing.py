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

import dataclasses
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.registry import Registry


class Routing(NamedTuple):
    token: jax.Array   # int32[N]   which token each assignment routes
    expert: jax.Array  # int32[N]   to which expert
    weight: jax.Array  # f32[N]     combine weight (0: the assignment is skipped and takes no slot)
    probs: jax.Array   # f32[T, E]  router probabilities (for the load-balancing losses)
    logits: jax.Array  # f32[T, E]  router logits (for the z-loss)
    soft_load: Optional[jax.Array] = None  # f32[T, E] P(expert e chosen for token t) under noise


class RouteContext(NamedTuple):
    """What some routers need beyond the logits."""
    rng: Optional[jax.Array] = None           # random routers; None = deterministic (evaluation)
    token_ids: Optional[jax.Array] = None     # int32[T] (hash routing)
    bias: Optional[jax.Array] = None          # f32[E] selection-only bias (deepseek)
    noise_logits: Optional[jax.Array] = None  # f32[T, E] x @ W_noise (noisy top-k)


RouterFn = Callable[[jax.Array, MoEConfig, RouteContext], Routing]
ROUTERS: Registry[RouterFn] = Registry("router")


def router(name: str, *, noise_weights: bool = False, top_k: Optional[int] = None):
    """Register a router. `noise_weights`: the MoE block gives it a second [D, E] matrix (noisy
    top-k); `top_k`: the only k the router is defined for (Switch: 1, GShard: 2)."""
    def add(fn: RouterFn) -> RouterFn:
        fn.noise_weights = noise_weights
        fn.fixed_top_k = top_k
        return ROUTERS.register(name)(fn)
    return add


def check_router(cfg: MoEConfig) -> None:
    """Raise ConfigError when the router cannot run with these settings."""
    from moejax.errors import ConfigError
    fn = ROUTERS.get(cfg.router) if cfg.router in ROUTERS else None
    if fn is not None and fn.fixed_top_k is not None and cfg.top_k != fn.fixed_top_k:
        raise ConfigError(f"model.moe.router = {cfg.router!r} routes to exactly {fn.fixed_top_k} "
                          f"expert(s); set model.moe.top_k = {fn.fixed_top_k} (got {cfg.top_k})")


def choice_major(indices_tk: jax.Array, weights_tk: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flatten [T, k] choices into N = T*k assignments, all first choices before any second choice."""
    t, k = indices_tk.shape
    token = jnp.tile(jnp.arange(t, dtype=jnp.int32), k)
    return token, indices_tk.T.reshape(-1).astype(jnp.int32), weights_tk.T.reshape(-1)


def _renormalized(weights_tk: jax.Array, cfg: MoEConfig) -> jax.Array:
    if cfg.renormalize:
        return weights_tk / jnp.maximum(jnp.sum(weights_tk, axis=-1, keepdims=True), 1e-20)
    return weights_tk


@router("topk")
def topk_router(logits_te: jax.Array, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """Softmax over experts, keep the top k (Shazeer et al. 2017; GShard; Mixtral, Jiang et al. 2024,
    arXiv:2401.04088).

    With `cfg.renormalize` the k kept probabilities are rescaled to sum to 1 (Mixtral); without it
    they are used as they are (Qwen1.5-MoE, OLMoE, DeepSeekMoE).
    """
    del ctx
    logits_te = logits_te.astype(jnp.float32)
    probs = jax.nn.softmax(logits_te, axis=-1)
    weights, indices = jax.lax.top_k(probs, cfg.top_k)
    token, expert, weight = choice_major(indices, _renormalized(weights, cfg))
    return Routing(token, expert, weight, probs, logits_te)


@router("switch", top_k=1)
def switch_router(logits_te: jax.Array, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """Switch Transformer (Fedus et al. 2021, arXiv:2101.03961): each token goes to its single most
    probable expert, scaled by that probability (never renormalised, or the router gets no gradient).
    Meant for `dispatch: capacity`, which drops the tokens beyond an expert's capacity."""
    return topk_router(logits_te, dataclasses.replace(cfg, top_k=1, renormalize=False), ctx)


@router("gshard", top_k=2)
def gshard_router(logits_te: jax.Array, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """GShard top-2 (Lepikhin et al. 2020, arXiv:2006.16668, Algorithm 1): the first expert always,
    the second with probability min(1, 2 * g2) where g1 + g2 = 1 are the renormalised top-2 gates.
    A second choice that is not dispatched gets weight 0 and takes no capacity slot. Without an rng
    (evaluation) every second choice is dispatched."""
    logits_te = logits_te.astype(jnp.float32)
    probs = jax.nn.softmax(logits_te, axis=-1)
    weights, indices = jax.lax.top_k(probs, 2)
    gates = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if ctx.rng is not None:
        u = jax.random.uniform(ctx.rng, (gates.shape[0],))
        gates = gates.at[:, 1].set(jnp.where(u < 2.0 * gates[:, 1], gates[:, 1], 0.0))
    token, expert, weight = choice_major(indices, gates)
    return Routing(token, expert, weight, probs, logits_te)


@router("noisy_topk", noise_weights=True)
def noisy_topk_router(logits_te: jax.Array, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """Noisy top-k gating (Shazeer et al. 2017, arXiv:1701.06538, sec. 2.1 and appendix A).

        H(x)_e = (x W_g)_e + N(0, 1) * softplus((x W_noise)_e);  G(x) = softmax(KeepTopK(H(x), k))

    `soft_load[t, e]` = P(e stays in the top k when only its own noise is redrawn)
    = Phi(((x W_g)_e - kth_excluding(H, e)) / softplus((x W_noise)_e)): the smooth load estimator of
    the paper's load loss. Without an rng (evaluation) no noise is added.
    """
    clean = logits_te.astype(jnp.float32)
    noise_std = jax.nn.softplus(ctx.noise_logits.astype(jnp.float32)) + 1e-2
    noisy = clean if ctx.rng is None else clean + noise_std * jax.random.normal(ctx.rng, clean.shape)
    k = cfg.top_k
    top_vals, indices = jax.lax.top_k(noisy, k + 1 if k < clean.shape[-1] else k)
    gates = jax.nn.softmax(top_vals[:, :k], axis=-1)
    # The k-th best value if e is not in the top k, else the (k+1)-th (the bar e must stay above).
    kth_in, kth_out = top_vals[:, k - 1:k], top_vals[:, -1:]
    bar = jnp.where(noisy >= kth_in, kth_out, kth_in)
    soft_load = (jax.scipy.stats.norm.cdf((clean - bar) / noise_std) if k < clean.shape[-1]
                 else jnp.ones_like(clean))
    token, expert, weight = choice_major(indices[:, :k], gates)
    probs = jax.nn.softmax(clean, axis=-1)
    return Routing(token, expert, weight, probs, clean, soft_load)


@router("expert_choice")
def expert_choice_router(logits_te: jax.Array, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """Expert choice (Zhou et al. 2022, arXiv:2202.09368): every expert takes its C best tokens by
    softmax score, C = ceil(T * top_k / E * capacity_factor) capped at T, so every expert is
    exactly full and a token may get 0..E experts. NOT causal: which tokens an expert takes depends
    on the other tokens of the batch, later positions included, so it leaks the future in an
    autoregressive LM and decoding differs from training. Use it for study, not for generation."""
    del ctx
    logits_te = logits_te.astype(jnp.float32)
    t, e = logits_te.shape
    probs = jax.nn.softmax(logits_te, axis=-1)
    c = min(t, max(1, math.ceil(t * cfg.top_k / e * cfg.capacity_factor)))
    weights_ec, tokens_ec = jax.lax.top_k(probs.T, c)
    expert = jnp.repeat(jnp.arange(e, dtype=jnp.int32), c)
    return Routing(tokens_ec.reshape(-1).astype(jnp.int32), expert, weights_ec.reshape(-1), probs,
                   logits_te)


HASH_MULTIPLIERS = (2654435761, 2246822519, 3266489917, 668265263)


def hash_experts(token_ids_t: jax.Array, num_experts: int, k: int) -> jax.Array:
    """[T, k] experts of each token id: k fixed multiplicative hashes (Knuth), k-th choice avoiding
    none of the others (hash collisions are possible for k > 1, as in the paper's multi-hash)."""
    ids = token_ids_t.astype(jnp.uint32)
    cols = [((ids * jnp.uint32(m)) >> 16) % jnp.uint32(num_experts) for m in HASH_MULTIPLIERS[:k]]
    return jnp.stack(cols, axis=-1).astype(jnp.int32)


@router("hash")
def hash_router(logits_te: jax.Array, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """Hash layers (Roller et al. 2021, arXiv:2106.04426): the expert is a fixed function of the
    token id (no learned routing, balanced by construction over the vocabulary), combine weight
    1/k. The router weights still run, only for the reported probabilities and the z-loss."""
    if ctx.token_ids is None:
        raise ValueError("the hash router needs the token ids")
    logits_te = logits_te.astype(jnp.float32)
    t, e = logits_te.shape
    k = min(cfg.top_k, len(HASH_MULTIPLIERS))
    indices = hash_experts(ctx.token_ids, e, k)
    token, expert, weight = choice_major(indices, jnp.full((t, k), 1.0 / k, jnp.float32))
    return Routing(token, expert, weight, jax.nn.softmax(logits_te, axis=-1), logits_te)


@router("deepseek")
def deepseek_router(logits_te: jax.Array, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """DeepSeek-V3 (arXiv:2412.19437, sec. 2.1.2): sigmoid affinities s; experts are *selected* by
    s + b, where b (`router_bias`, per expert) is not trained by gradients but nudged after each step
    toward balance (`bias_update`, aux-loss-free balancing); the combine weights are the chosen s
    (renormalised when `renormalize`), times `routed_scaling_factor` (applied by the block).
    Group-limited: experts form `n_group` groups scored by the sum of their top-2 s + b; only the
    best `topk_group` groups may be chosen (as in Hugging Face DeepseekV3)."""
    logits_te = logits_te.astype(jnp.float32)
    t, e = logits_te.shape
    scores = jax.nn.sigmoid(logits_te)
    select = scores if ctx.bias is None else scores + ctx.bias.astype(jnp.float32)
    if cfg.n_group > 1:
        grouped = select.reshape(t, cfg.n_group, e // cfg.n_group)
        group_score = jnp.sum(jax.lax.top_k(grouped, min(2, e // cfg.n_group))[0], axis=-1)
        _, best = jax.lax.top_k(group_score, cfg.topk_group)
        allowed = jnp.zeros((t, cfg.n_group), bool).at[jnp.arange(t)[:, None], best].set(True)
        select = jnp.where(jnp.repeat(allowed, e // cfg.n_group, axis=1), select, -jnp.inf)
    _, indices = jax.lax.top_k(select, cfg.top_k)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    token, expert, weight = choice_major(indices, _renormalized(weights, cfg))
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)  # normalised affinities (V3 eq. 19)
    return Routing(token, expert, weight, probs, logits_te)


def bias_update(bias_e: jax.Array, counts_e: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's aux-loss-free balancing step: b_e += rate * sign(mean load - load_e)."""
    return bias_e + rate * jnp.sign(jnp.mean(counts_e) - counts_e)


class RouterStats(NamedTuple):
    """Sums over (valid) tokens; add them across shards, then call the loss functions."""
    counts: jax.Array        # f32[E]  assignments routed to each expert (weight > 0, before drops)
    prob_sum: jax.Array      # f32[E]  sum over tokens of the router probability of each expert
    tokens: jax.Array        # f32[]   number of tokens
    z_sum: jax.Array         # f32[]   sum over tokens of logsumexp(logits)^2
    gate_sum: jax.Array      # f32[E]  sum over tokens of each expert's combine weight (importance)
    soft_load_sum: jax.Array  # f32[E] sum over tokens of the smooth load estimate (noisy top-k)
    seq_balance_sum: jax.Array  # f32[] sum over sequences of their own balance loss
    seqs: jax.Array          # f32[]   sequences with at least one valid token


def router_stats(r: Routing, valid_t: jax.Array | None = None, seq_len: int | None = None
                 ) -> RouterStats:
    """Statistics of one routing; `valid_t` (bool[T]) leaves padding tokens out; with `seq_len` the
    T tokens are B = T / seq_len whole sequences (for the sequence-level loss)."""
    t, e = r.probs.shape
    valid = jnp.ones((t,), jnp.float32) if valid_t is None else valid_t.astype(jnp.float32)
    used = valid[r.token] * (r.weight != 0)
    counts = jnp.zeros((e,), jnp.float32).at[r.expert].add(used)
    gate_sum = jnp.zeros((e,), jnp.float32).at[r.expert].add(used * r.weight.astype(jnp.float32))
    prob_sum = valid @ r.probs
    soft = jnp.zeros((e,), jnp.float32) if r.soft_load is None else valid @ r.soft_load
    z = jax.nn.logsumexp(r.logits, axis=-1)
    seq_len = seq_len or t
    b = t // seq_len
    seq_of = r.token // seq_len
    seq_counts = jnp.zeros((b, e), jnp.float32).at[seq_of, r.expert].add(used)
    seq_probs = jnp.einsum("bs,bse->be", valid.reshape(b, seq_len), r.probs.reshape(b, seq_len, e))
    seq_tokens = jnp.sum(valid.reshape(b, seq_len), axis=1)
    seq_balance = jax.vmap(_balance)(seq_counts, seq_probs, seq_tokens)
    return RouterStats(counts, prob_sum, jnp.sum(valid), valid @ (z * z), gate_sum, soft,
                       jnp.sum(seq_balance), jnp.sum(seq_tokens > 0).astype(jnp.float32))


def _balance(counts_e: jax.Array, prob_sum_e: jax.Array, tokens: jax.Array) -> jax.Array:
    """E * sum_e f_e * P_e, f the fraction of routed slots, P the mean probability (1.0 = balanced)."""
    e = counts_e.shape[0]
    f = counts_e / jnp.maximum(jnp.sum(counts_e), 1.0)
    return e * jnp.sum(f * prob_sum_e / jnp.maximum(tokens, 1.0))


LossFn = Callable[[RouterStats, int], jax.Array]
LOSSES: Registry[LossFn] = Registry("router loss")
"""name -> fn(stats, device_groups); the total loss adds `model.moe.<name>_coef` * each."""


@LOSSES.register("aux_loss")
def load_balancing_loss(s: RouterStats, groups: int = 1) -> jax.Array:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eq. 4), for any k.

        loss = E * sum_e f_e * P_e

    f_e: fraction of routed slots that went to expert e (sums to 1 over experts);
    P_e: mean router probability of expert e over tokens (sums to 1).
    A perfectly balanced router (f_e = P_e = 1/E) scores exactly 1.0; the minimum is 1.0 whenever f is
    uniform, and it grows to E when every token goes to one expert with probability 1. (Hugging Face
    Mixtral sums over the k choices instead of normalising f, so its value is k times this one.)
    """
    del groups
    return _balance(s.counts, s.prob_sum, s.tokens)


@LOSSES.register("z_loss")
def z_loss(s: RouterStats, groups: int = 1) -> jax.Array:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
    del groups
    return s.z_sum / jnp.maximum(s.tokens, 1.0)


@LOSSES.register("seq_aux_loss")
def sequence_balance_loss(s: RouterStats, groups: int = 1) -> jax.Array:
    """DeepSeek-V3 complementary sequence-wise balance loss (arXiv:2412.19437, eqs. 17-20): the
    Switch balance loss of each sequence on its own, averaged over sequences (1.0 = balanced)."""
    del groups
    return s.seq_balance_sum / jnp.maximum(s.seqs, 1.0)


@LOSSES.register("device_loss")
def device_balance_loss(s: RouterStats, groups: int = 1) -> jax.Array:
    """DeepSeek-V2 device-level balance loss (arXiv:2405.04434, eqs. 14-16): experts split into
    `groups` contiguous groups (one per device of the expert mesh axis), sum over groups of
    (mean f' of the group's experts) * (summed P of the group), f' = E * f. 1.0 = balanced devices."""
    e = s.counts.shape[0]
    f = e * s.counts / jnp.maximum(jnp.sum(s.counts), 1.0)
    p = s.prob_sum / jnp.maximum(s.tokens, 1.0)
    return jnp.sum(jnp.mean(f.reshape(groups, -1), axis=1) * jnp.sum(p.reshape(groups, -1), axis=1))


def _cv_squared(x: jax.Array) -> jax.Array:
    return jnp.var(x) / jnp.maximum(jnp.mean(x) ** 2, 1e-10)


@LOSSES.register("importance_loss")
def importance_loss(s: RouterStats, groups: int = 1) -> jax.Array:
    """Shazeer et al. 2017, eq. 6: CV(Importance)^2, Importance_e = sum over tokens of the gates."""
    del groups
    return _cv_squared(s.gate_sum)


@LOSSES.register("load_loss")
def load_loss(s: RouterStats, groups: int = 1) -> jax.Array:
    """Shazeer et al. 2017, eq. 11: CV(Load)^2 of the smooth load estimate (noisy top-k only;
    other routers leave it 0)."""
    del groups
    return _cv_squared(s.soft_load_sum)
