"""Optax optimizer: AdamW with warm-up + cosine decay, global-norm clipping, decay on matrices only,
and per-group freezing and learning-rate factors for fine-tuning.

Parameter groups are read from parameter paths (`param_group`): embed, attention, router, experts,
shared, ffn (dense FFN layers), norm, head. `router_bias` (DeepSeek's selection bias) is never
touched by the optimizer; the train step moves it by its own rule.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from moejax.config import TrainConfig

from moejax.names import PARAM_GROUPS  # the names live below the config (moejax.names)


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params) -> object:
    """Weight decay on matrices (and expert stacks) only; norm scales are left alone."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return out


def param_group(names: list[str]) -> str:
    """The group of a parameter from its path names (e.g. blocks/3/ffn/w_gate). First match wins."""
    if "router_bias" in names:
        return "router_bias"
    if any(n.startswith("router") for n in names):
        return "router"            # MoE routers and attention-expert routers
    if any("norm" in n for n in names):
        return "norm"
    if names[:1] == ["embed"]:
        return "embed"
    if names[:1] == ["head"]:
        return "head"
    if "attn" in names:
        return "attention"
    if any(n.startswith("shared") for n in names):
        return "shared"
    if "ffn" in names:
        return "ffn"  # `param_labels` tells expert stacks ([E, D, F]) from dense FFN matrices
    return "other"


def param_labels(params: Any) -> Any:
    """A pytree of group names with the structure of `params`. Expert stacks are told from dense
    FFN matrices by rank (3: [E, D, F])."""
    def label(path, leaf):
        names = [n for n in _names(path) if n != "value"]
        group = param_group(names)
        return "experts" if group == "ffn" and getattr(leaf, "ndim", 0) == 3 else group
    return jax.tree_util.tree_map_with_path(label, params)


def scale_by_group(factors: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply each parameter's update by the factor of its group (missing groups: 1)."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        labels = param_labels(updates)
        out = jax.tree.map(lambda u, g: u * jnp.asarray(factors.get(g, 1.0), u.dtype), updates, labels)
        return out, state

    return optax.GradientTransformation(init, update)


def group_factors(cfg: TrainConfig) -> dict[str, float]:
    """Update factor per group: 0 for frozen groups, the lr multiplier otherwise."""
    factors = {"router_bias": 0.0}
    for item in cfg.lr_multipliers:
        group, value = item.split("=", 1)
        factors[group.strip()] = float(value)
    frozen = set(cfg.freeze)
    if cfg.train_only:
        frozen |= set(PARAM_GROUPS + ("other",)) - set(cfg.train_only)
    for g in frozen:
        factors[g] = 0.0
    return factors


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    factors = group_factors(cfg)
    frozen = {g: 0.0 for g, f in factors.items() if f == 0.0}
    chain = [scale_by_group(frozen)]  # frozen groups' gradients do not count in the clipping norm
    if cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    chain.append(scale_by_group(factors))  # frozen: no update (nor decay); others: lr factor
    return optax.chain(*chain)
