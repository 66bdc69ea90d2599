"""Task-level sub-networks (task-level routing, Kudugunta et al. 2021, "Beyond Distillation",
arXiv:2110.03742): per MoE layer keep the K experts that route most of one domain's tokens, so a
smaller model serves that domain. Counts come from `moejax.analyze`'s routing tally (routed slots
per domain and expert); the cut itself is `prune.prune`. On every token whose top-k choices all
stay inside the kept experts the sub-network computes exactly what the full model does (renormalised
top-k; the kept router columns rank those experts as before)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from moejax.errors import UserError


def domain_experts(tally, domain: str, ks: Sequence[int]) -> list[list[int]]:
    """Per layer the K experts with the most routed slots of `domain`'s tokens."""
    if domain not in tally.domains:
        raise UserError(f"--domain {domain!r} is not in the calibration data; its domains are: "
                        f"{', '.join(tally.domains)}")
    d = tally.domains.index(domain)
    if tally.tokens_d[d] == 0:
        raise UserError(f"--domain {domain!r} has no tokens in the calibration data")
    return [sorted(np.argsort(-s[d], kind="stable")[:k].tolist()) for s, k in zip(tally.slots, ks)]
