"""Knowledge distillation in training (`train.distill`): a frozen teacher run's logits as soft
targets.

loss = (1 - alpha) * CE + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)), both terms
normalised by the batch's target count (Hinton et al. 2015; the T^2 keeps the gradient scale).
The teacher runs forward only, and only for steps below `stop_step`: Mixture-of-Students
(Rajbhandari et al. 2022, DeepSpeed-MoE, arXiv:2201.05596) stops KD part-way because the
smaller student, still pulled toward the teacher, ends worse than one left to the plain loss. After
`stop_step` the plain train step runs, so training from there is exactly plain training.
Any student and teacher sharing a vocabulary: MoE -> dense, MoE -> smaller MoE, dense -> MoE.
"""
from __future__ import annotations

import filecmp
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from moejax.config import Config
from moejax.errors import UserError


def active(cfg: Config) -> bool:
    d = cfg.train.distill
    return bool(d.teacher) and d.alpha > 0


def kd_loss_sum(student_btv: jax.Array, teacher_btv: jax.Array, mask_bt: jax.Array,
                temperature: float) -> jax.Array:
    """sum over masked positions of KL(p_teacher || p_student) at temperature T (float32); exactly
    0 when the logits are equal."""
    ls = jax.nn.log_softmax(student_btv.astype(jnp.float32) / temperature, axis=-1)
    lt = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_btv).astype(jnp.float32) / temperature, axis=-1)
    kl_bt = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
    return jnp.sum(kl_bt * mask_bt.astype(jnp.float32))


def mixed_loss(ce_sum, student_btv, teacher_btv, mask_bt, n_targets, d) -> jax.Array:
    """(1 - alpha) * CE + alpha * T^2 * KL, per target."""
    kd = kd_loss_sum(student_btv, teacher_btv, mask_bt, d.temperature)
    return ((1.0 - d.alpha) * ce_sum + d.alpha * d.temperature ** 2 * kd) / n_targets


def load_teacher(cfg: Config) -> tuple[Any, Any]:
    """(graphdef, params) of the teacher run's latest checkpoint; one clear line when its
    vocabulary is not the student's."""
    from flax import nnx

    from moejax.runs import load_model, tokenizer_path

    path = cfg.train.distill.teacher
    t_cfg, model = load_model(path)
    if t_cfg.model.vocab_size != cfg.model.vocab_size:
        raise UserError(f"train.distill.teacher {path!r} has model.vocab_size = {t_cfg.model.vocab_size}, "
                        f"the student {cfg.model.vocab_size}: teacher and student must share a vocabulary")
    t_tok, s_tok = tokenizer_path(t_cfg, path), tokenizer_path(cfg, cfg.train.workdir)
    if os.path.isfile(t_tok) and os.path.isfile(s_tok) and not filecmp.cmp(t_tok, s_tok, shallow=False):
        raise UserError(f"train.distill.teacher {path!r} has another tokenizer ({t_tok}) than the student "
                        f"({s_tok}); set data.tokenizer to the teacher's")
    graphdef, params = nnx.split(model)
    return graphdef, params


def staged(kd_step: Callable, plain_step: Callable, teacher_params, stop_step: int, start: int) -> Callable:
    """state, batch -> state, metrics: `kd_step` (with the teacher) for steps below `stop_step`
    (0 = always), then `plain_step`. `start` is the step the run resumes at."""
    count = [start]

    def step(state, batch):
        n = count[0]
        count[0] += 1
        if stop_step and n >= stop_step:
            return plain_step(state, batch)
        return kd_step(state, batch, teacher_params)

    step.calls = count
    return step
