"""Run a model over examples of several domains and tally its routing (see stats.RoutingTally).

Each example is its own sequence (never packed with another domain's), truncated to the run's
`data.seq_len`. Sequences are sorted by length and padded to a few bucket lengths, so a whole dataset
costs a handful of compilations of one jitted forward pass.
"""
from __future__ import annotations

import functools
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import moejax.analyze.stats as stats
from moejax.data import open_source
from moejax.data.example import Example
from moejax.errors import UserError

RUN_DATA = "run"     # --data keyword: the run's own validation split, one domain per domain tag
BATCH = 32           # sequences per forward pass
SAMPLES_PER_DOMAIN = 1


@dataclass
class Collected:
    """The tally plus what the report shows verbatim: a few sequences per domain with each token's
    first-choice expert per MoE layer (-1 = no expert)."""
    tally: stats.RoutingTally
    layer_names: list[str]
    samples: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Data: (domain, examples) pairs.


def _label(spec: str) -> tuple[str, str]:
    """`LABEL=SCHEME:REST` or `SCHEME:REST` (label: the file or dataset name)."""
    label, eq, rest = spec.partition("=")
    if eq and ":" not in label:
        return label, rest
    name = spec.partition(":")[2].rstrip("/")
    base = os.path.basename(name) or name
    return base.split(".")[0] or spec, spec


def read_domains(specs: Sequence[str], data_cfg, max_tokens: int, count_tokens,
                 scan_limit: int = 200_000) -> list[tuple[str, list[Example]]]:
    """Examples per domain, each domain's until its tokens reach `max_tokens`. `RUN_DATA` is the
    run's own `data.source` at `data.eval_split`, split by the examples' domain tags (untagged ones
    form one domain named after the source); any other spec is one domain, read from its
    validation split first, then its train split (a JSONL file's hold-out, then the rest)."""
    out: dict[str, list[Example]] = {}
    for spec in specs:
        if spec == RUN_DATA:
            src = open_source(data_cfg.source, data_cfg.eval_split, data_cfg)
            default = _label(data_cfg.source)[0]
            groups: dict[str, list[Example]] = defaultdict(list)
            used: dict[str, int] = defaultdict(int)
            last_new = 0
            for i in range(min(len(src), scan_limit)):
                ex = src[i]
                d = ex.domain or default
                if d not in used:
                    last_new = i
                if used[d] < max_tokens:
                    groups[d].append(ex)
                    used[d] += count_tokens(ex)
                elif all(u >= max_tokens for u in used.values()) and i - last_new >= 1000:
                    break  # every domain full, and no new one for a while
            for d in sorted(groups):
                out[_unique(d, out)] = groups[d]
            continue
        label, source = _label(spec)
        exs, used_n = [], 0
        for split in ("validation", "train"):
            try:
                src = open_source(source, split, data_cfg)
            except UserError as e:
                if split == "validation" and "no examples" in str(e):
                    continue
                raise UserError(f"--data {spec!r}: {e}") from None
            except (FileNotFoundError, OSError) as e:
                raise UserError(f"--data {spec!r}: cannot read it ({e})") from None
            for i in range(min(len(src), scan_limit)):
                if used_n >= max_tokens:
                    break
                exs.append(src[i])
                used_n += count_tokens(exs[-1])
            if used_n >= max_tokens:
                break
        out[_unique(label, out)] = exs
    return list(out.items())


def _unique(name: str, taken) -> str:
    k, base = 2, name
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


# ----------------------------------------------------------------------------------------------
# The model.


def restore_params(workdir: str):
    """(config, model, tokenizer) of a run directory: its latest checkpoint's parameters on one
    device (`moejax.runs.restore_model`)."""
    from moejax.runs import restore_model
    return restore_model(workdir)


# ----------------------------------------------------------------------------------------------
# The forward pass.


@functools.partial(jax.jit, static_argnums=0)
def _routing(graphdef, state, tokens_bt, segment_ids_bt, positions_bt):
    model = nnx.merge(graphdef, state)
    _, aux = model(tokens_bt, segment_ids=segment_ids_bt, positions=positions_bt, return_routing=True)
    return aux["routing"]


def moe_layer_names(model) -> list[str]:
    return [f"layer {i}" for i, b in enumerate(model.blocks) if getattr(b, "is_moe", False)]


def _bucket(n: int, cap: int) -> int:
    return min(cap, max(32, 1 << (max(n, 1) - 1).bit_length()))


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=not enabled,
                    mininterval=1.0)
    except ImportError:  # plain lines on stderr
        return _Lines(total, desc, enabled)


class _Lines:
    def __init__(self, total, desc, enabled):
        self.total, self.desc, self.enabled, self.n, self.shown = total, desc, enabled, 0, -1

    def update(self, k):
        self.n += k
        pct = int(100 * self.n / max(self.total, 1)) // 10 * 10
        if self.enabled and pct != self.shown:
            self.shown = pct
            print(f"{self.desc}: {pct}% ({self.n}/{self.total} tokens)", file=sys.stderr, flush=True)

    def close(self):
        pass


def collect(model: nnx.Module, sequences: Sequence[Sequence[int]], domain_s: Sequence[int],
            domains: Sequence[str], seq_len: int, *, batch_size: int = BATCH, seed: int = 0,
            samples_per_domain: int = SAMPLES_PER_DOMAIN, progress: bool = False) -> Collected:
    """Route every sequence (token ids, one example each) through `model`; tally per domain."""
    graphdef, state = nnx.split(model)
    layer_names = moe_layer_names(model)
    seqs = [list(s)[:seq_len] for s in sequences]
    domain_s = np.asarray(domain_s, np.int64)
    shuffled_s = stats.shuffled_labels(domain_s, seed)
    edges = stats.position_edges(max((len(s) for s in seqs), default=1))
    tally = None
    sample_ids = _sample_ids(domain_s, seqs, samples_per_domain)
    samples: dict[int, dict] = {}
    # Rows of a batch split over the devices' batch axes: keep the batch a multiple of them.
    batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    bar = _progress(sum(len(s) for s in seqs), "routing", progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        t = _bucket(max(len(seqs[i]) for i in idx), max(seq_len, 1))
        tokens = np.zeros((batch_size, t), np.int32)
        seg = np.zeros((batch_size, t), np.int32)
        pos = np.zeros((batch_size, t), np.int32)
        for r, i in enumerate(idx):
            n = len(seqs[i])
            tokens[r, :n], seg[r, :n], pos[r, :n] = seqs[i], 1, np.arange(n)
        routing = jax.device_get(_routing(graphdef, state, jnp.asarray(tokens), jnp.asarray(seg),
                                          jnp.asarray(pos)))
        valid = seg.astype(bool)
        if tally is None:  # experts per MoE layer, from the routing itself (E may differ by layer)
            tally = stats.RoutingTally(domains, [r["probs"].shape[-1] for r in routing], edges)
        rows = np.broadcast_to(np.asarray(idx + [0] * (batch_size - len(idx)))[:, None], seg.shape)[valid]
        tally.add(domain_s[rows], shuffled_s[rows], tokens[valid], pos[valid],
                  [(np.asarray(r["probs"])[valid], np.asarray(r["gates"])[valid]) for r in routing])
        for r, i in enumerate(idx):
            if i in sample_ids:
                n = len(seqs[i])
                samples[i] = {"domain": domains[domain_s[i]], "ids": seqs[i],
                              "first_choice": [_first(np.asarray(x["gates"])[r, :n]).tolist()
                                               for x in routing]}
        bar.update(int(valid.sum()))
    bar.close()
    if tally is None:
        raise UserError("no examples to analyse")
    return Collected(tally, layer_names, [samples[i] for i in sorted(samples, key=lambda i: (
        domain_s[i], i))])


def _first(gates_te: np.ndarray) -> np.ndarray:
    return np.where(gates_te.max(-1) > 0, gates_te.argmax(-1), -1)


def _sample_ids(domain_s: np.ndarray, seqs, k: int) -> set[int]:
    """The first `k` sequences of each domain of at least 8 tokens (else the first ones)."""
    picked: dict[int, list[int]] = defaultdict(list)
    for want_long in (True, False):
        for i, d in enumerate(domain_s.tolist()):
            if len(picked[d]) < k and (len(seqs[i]) >= 8 or not want_long) and i not in picked[d]:
                picked[d].append(i)
    return {i for v in picked.values() for i in v}


# ----------------------------------------------------------------------------------------------
# Examples -> sequences.


def encode(tokenizer, domains: Sequence[tuple[str, Iterable[Example]]]
           ) -> tuple[list[list[int]], list[int], list[str]]:
    """Token ids of each example as the model saw them in training (BOS + rendered chat, without the
    final EOS that is only ever a target), their domain index, and the domain names."""
    seqs, dom = [], []
    for d, (_, exs) in enumerate(domains):
        for ex in exs:
            ids, _ = tokenizer.encode_chat(ex)
            seqs.append(ids[:-1])
            dom.append(d)
    return seqs, dom, [name for name, _ in domains]


def routing_metrics(model: nnx.Module, tokenizer, examples: Sequence[Example], seq_len: int
                    ) -> dict[str, float]:
    """Balance and specialisation scalars (stats.scalars) of `model` on domain-tagged examples:
    what the training loop logs at each evaluation."""
    by_domain: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_domain[ex.domain or "all"].append(ex)
    if not examples or not moe_layer_names(model):
        return {}
    seqs, dom, names = encode(tokenizer, sorted(by_domain.items()))
    return stats.scalars(collect(model, seqs, dom, names, seq_len, samples_per_domain=0).tally)
