"""Routing statistics in plain numpy: a tally accumulated batch by batch, and the measures read off it.

Everything here is a sum over tokens, so the tally of a whole dataset is the sum of its batches'
tallies, and nothing per token has to be kept (a 64-expert, 30-layer model over 100k tokens would
need gigabytes for that). The routing of one MoE layer for N tokens is two arrays [N, E]: `probs`,
the router's probabilities, and `gates`, the combine weight each expert got (0 = not chosen). A
token's *routed slots* are the experts with a non-zero gate (k of them for a top-k router, 0..E
for expert choice); its *first choice* is the expert with the largest gate.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import numpy as np

POSITION_GROUPS = 8
TOP_TOKENS = 12


def load_fractions(counts_xe: np.ndarray) -> np.ndarray:
    """Rows of routed-slot counts -> fractions of each row's slots (rows sum to 1; an empty row
    stays 0)."""
    counts_xe = np.asarray(counts_xe, np.float64)
    total = counts_xe.sum(-1, keepdims=True)
    return np.divide(counts_xe, total, out=np.zeros_like(counts_xe), where=total > 0)


def entropy(p: np.ndarray) -> float:
    """Shannon entropy in nats of a distribution (zeros contribute 0)."""
    p = np.asarray(p, np.float64).ravel()
    p = p[p > 0] / p.sum() if p.sum() > 0 else p[:0]
    return float(-(p * np.log(p)).sum())


def balance(load_e: np.ndarray) -> dict[str, float]:
    """Load-balance measures of one layer's load (counts or fractions per expert):
    `cv` coefficient of variation std/mean (0 = perfectly balanced), `max_over_mean` the busiest
    expert's load over the mean (1 = balanced, E = everything on one expert), `entropy` in nats and
    `entropy_norm` = entropy / log E (1 = balanced)."""
    f = load_fractions(np.asarray(load_e, np.float64)[None])[0]
    e = f.size
    mean = 1.0 / e
    h = entropy(f)
    return {"cv": float(f.std() / mean) if f.sum() else 0.0,
            "max_over_mean": float(f.max() / mean) if f.sum() else 0.0,
            "entropy": h, "entropy_norm": h / float(np.log(e)) if e > 1 else 1.0}


def mutual_information(joint_de: np.ndarray) -> float:
    """I(domain; expert) in nats from a table of counts (or probabilities) [domain, expert]:
    sum p(d,e) log(p(d,e) / (p(d) p(e))). 0 when experts ignore the domain; at most H(domain),
    reached when every expert serves a single domain."""
    p = np.asarray(joint_de, np.float64)
    if p.sum() <= 0:
        return 0.0
    p = p / p.sum()
    pd, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(max((p[nz] * np.log(p[nz] / (pd @ pe)[nz])).sum(), 0.0))


def position_edges(max_len: int, groups: int = POSITION_GROUPS) -> np.ndarray:
    """Left edges of `groups` equal-width position groups covering [0, max_len)."""
    width = max(1, -(-max_len // groups))
    return np.arange(0, max(max_len, 1), width, dtype=np.int64)


class RoutingTally:
    """Sums over tokens of everything the report and the training metrics need, per MoE layer.

    `domains` are the labels; `num_experts[l]` the experts of MoE layer l (may differ by layer).
    `add` takes one batch of valid tokens (padding already removed): domain index, the same tokens'
    domain under a fixed random relabelling (for the chance level of the mutual information; see
    `shuffled_labels`), token id, position in its sequence, and per layer (probs, gates) [N, E_l].
    """

    def __init__(self, domains: Sequence[str], num_experts: Sequence[int], edges: np.ndarray):
        self.domains = list(domains)
        self.num_experts = [int(e) for e in num_experts]
        self.edges = np.asarray(edges, np.int64)
        d, g = len(self.domains), len(self.edges)
        self.tokens_d = np.zeros(d, np.int64)
        self.slots = [np.zeros((d, e), np.int64) for e in self.num_experts]
        self.slots_shuffled = [np.zeros((d, e), np.int64) for e in self.num_experts]
        self.first = [np.zeros((d, e), np.int64) for e in self.num_experts]
        self.prob_sum = [np.zeros((d, e)) for e in self.num_experts]
        self.gate_pos = [np.zeros((d, g, e)) for e in self.num_experts]
        self.coselect = [np.zeros((e, e), np.int64) for e in self.num_experts]
        self.token_total: Counter = Counter()
        self.expert_tokens: list[list[Counter]] = [[Counter() for _ in range(e)]
                                                   for e in self.num_experts]

    def add(self, domain_n, shuffled_n, token_n, position_n,
            layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        domain_n = np.asarray(domain_n, np.int64)
        shuffled_n = np.asarray(shuffled_n, np.int64)
        token_n = np.asarray(token_n, np.int64)
        group_n = np.searchsorted(self.edges, np.asarray(position_n), side="right") - 1
        assert len(layers) == len(self.num_experts), "one (probs, gates) pair per MoE layer"
        nd = len(self.domains)
        self.tokens_d += np.bincount(domain_n, minlength=nd)
        ids, counts = np.unique(token_n, return_counts=True)
        self.token_total.update(dict(zip(ids.tolist(), counts.tolist())))
        for l, (probs_ne, gates_ne) in enumerate(layers):
            e = self.num_experts[l]
            probs_ne = np.asarray(probs_ne, np.float64)
            gates_ne = np.asarray(gates_ne, np.float64)
            chosen_ne = gates_ne > 0
            # Per-domain sums as one matmul with the domains' one-hot [D, N].
            onehot_dn = (domain_n[None, :] == np.arange(nd)[:, None]).astype(np.float64)
            self.slots[l] += np.rint(onehot_dn @ chosen_ne).astype(np.int64)
            shuf_dn = (shuffled_n[None, :] == np.arange(nd)[:, None]).astype(np.float64)
            self.slots_shuffled[l] += np.rint(shuf_dn @ chosen_ne).astype(np.int64)
            has = chosen_ne.any(1)
            first_n = gates_ne.argmax(1)
            np.add.at(self.first[l], (domain_n[has], first_n[has]), 1)
            self.prob_sum[l] += onehot_dn @ probs_ne
            np.add.at(self.gate_pos[l], (domain_n, group_n), gates_ne)
            c = chosen_ne.astype(np.float64)
            self.coselect[l] += np.rint(c.T @ c).astype(np.int64)
            tok_idx, exp_idx = np.nonzero(chosen_ne)
            keys, kc = np.unique(token_n[tok_idx] * e + exp_idx, return_counts=True)
            for key, cnt in zip(keys.tolist(), kc.tolist()):
                self.expert_tokens[l][key % e][key // e] += cnt


def shuffled_labels(domain_s: np.ndarray, seed: int = 0) -> np.ndarray:
    """The domain labels of all sequences in a random order: the same number of sequences per
    domain, no relation to their content. The mutual information between these labels (given to
    each token of the sequence) and the experts is what chance gives with this many samples.
    Sequences, not tokens, are relabelled: tokens of one sequence route alike, and shuffling them
    one by one would understate chance."""
    return np.random.default_rng(seed).permutation(np.asarray(domain_s))


def layer_measures(tally: RoutingTally) -> list[dict[str, float]]:
    """Per MoE layer: the balance measures of the load over all domains, the mutual information
    between domain and routed expert (real and with shuffled labels) and its ceiling H(domain)."""
    out = []
    for l in range(len(tally.num_experts)):
        m = balance(tally.slots[l].sum(0))
        m["mi"] = mutual_information(tally.slots[l])
        m["mi_shuffled"] = mutual_information(tally.slots_shuffled[l])
        m["mi_first_choice"] = mutual_information(tally.first[l])
        m["domain_entropy"] = entropy(tally.slots[l].sum(1))
        out.append(m)
    return out


def scalars(tally: RoutingTally) -> dict[str, float]:
    """The few numbers a training run logs: balance and specialisation over the MoE layers."""
    per = layer_measures(tally)
    if not per:
        return {}
    return {"routing_balance_cv": float(np.mean([m["cv"] for m in per])),
            "routing_max_over_mean": float(np.max([m["max_over_mean"] for m in per])),
            "routing_mi": float(np.mean([m["mi"] for m in per])),
            "routing_mi_shuffled": float(np.mean([m["mi_shuffled"] for m in per]))}


def leanings(tally: RoutingTally, min_lift: float = 1.5, min_share: float = 0.05) -> list[dict]:
    """(layer, expert, domain) where the expert's slots come from the domain `lift` times more than
    the domain's share of all slots, sorted by lift: p(domain | expert) / p(domain)."""
    out = []
    for l, slots_de in enumerate(tally.slots):
        total = slots_de.sum()
        if not total:
            continue
        p_d = slots_de.sum(1) / total
        p_d_given_e = load_fractions(slots_de.T)  # [E, D]
        expert_share = slots_de.sum(0) / total
        for e in range(slots_de.shape[1]):
            for d in range(slots_de.shape[0]):
                if p_d[d] <= 0 or expert_share[e] < min_share / slots_de.shape[1]:
                    continue
                lift = p_d_given_e[e, d] / p_d[d]
                if lift >= min_lift:
                    out.append({"layer": l, "expert": e, "domain": tally.domains[d],
                                "lift": float(lift), "share_of_expert": float(p_d_given_e[e, d]),
                                "domain_share": float(p_d[d])})
    return sorted(out, key=lambda r: -r["lift"])


def top_tokens(tally: RoutingTally, piece: Callable[[int], str], n: int = TOP_TOKENS) -> list:
    """[layer][expert] -> the `n` tokens routed to the expert most often: piece, id, count, and
    `share` = the fraction of that token's occurrences that the expert took."""
    out = []
    for layer in tally.expert_tokens:
        rows = []
        for counter in layer:
            rows.append([{"token": piece(tid), "id": int(tid), "count": int(c),
                          "share": float(c / tally.token_total[tid])}
                         for tid, c in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]])
        out.append(rows)
    return out


def position_importance(tally: RoutingTally) -> list:
    """[domain][layer][position group][expert]: each group's share of gate weight per expert (rows
    sum to 1 where the group has tokens)."""
    return [[load_fractions(g[d]).tolist() for g in tally.gate_pos] for d in range(len(tally.domains))]


def summarize(tally: RoutingTally, piece: Callable[[int], str] = str,
              layer_names: Sequence[str] | None = None) -> dict:
    """Everything of `routing.json` (JSON-ready lists and floats)."""
    nl = len(tally.num_experts)
    per = layer_measures(tally)
    return {
        "domains": tally.domains,
        "tokens": {d: int(n) for d, n in zip(tally.domains, tally.tokens_d)},
        "layers": list(layer_names or [f"moe {l}" for l in range(nl)]),
        "num_experts": tally.num_experts,
        "expert_load": [[load_fractions(tally.slots[l][d]).tolist() for l in range(nl)]
                        for d in range(len(tally.domains))],
        "expert_load_all": [load_fractions(tally.slots[l].sum(0)).tolist() for l in range(nl)],
        "first_choice_load": [[load_fractions(tally.first[l][d]).tolist() for l in range(nl)]
                              for d in range(len(tally.domains))],
        "mean_router_prob": [[(tally.prob_sum[l][d] / max(tally.tokens_d[d], 1)).tolist()
                              for l in range(nl)] for d in range(len(tally.domains))],
        "balance": [{k: m[k] for k in ("cv", "max_over_mean", "entropy", "entropy_norm")} for m in per],
        "mutual_information": [{k: m[k] for k in ("mi", "mi_shuffled", "mi_first_choice",
                                                  "domain_entropy")} for m in per],
        "position_group_starts": tally.edges.tolist(),
        "position_importance": position_importance(tally),
        "coselection": [c.tolist() for c in tally.coselect],
        "top_tokens": top_tokens(tally, piece),
        "leanings": leanings(tally),
        "scalars": scalars(tally),
    }
