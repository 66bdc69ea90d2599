"""Where the real train step's CPU time goes, operation by operation (XLA:CPU profiler trace).

    python benchmarks/op_profile.py [--steps 4] [--top 30] [--set key=value ...]

Compiles the train step at the peer comparison's shapes (as benchmarks/step_variants.py), with
`jax.named_scope`s put around attention, the MoE block and the norms for this run, traces `--steps`
steps with `jax.profiler`, and reads the trace back (`jax.profiler.ProfileData`). Each XLA operation's
exclusive time (its own, less the operations nested in it, such as a loop's body) on the XLA
worker threads is summed by part: attention, moe, head (the LM head + loss, named by its einsum),
norm, other. Also printed: the step's wall time, and the share of it the worker threads spent in
operations (the rest is waiting: for the other thread's half of a split operation, or between
operations). Figures are per step; the profiler itself slows the step by ~10%.
"""
from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import re
import shutil
import sys
import tempfile
import time

import jax
from jax.profiler import ProfileData

from moejax.model import attention, layers, moe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_variants import compile_variant  # noqa: E402

SCOPES = ((attention.Attention, "ATTN"), (moe.MoEBlock, "MOE"), (layers.RMSNorm, "NORM"))
SKIP = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ", "$", "PjitFunction")


def add_scopes() -> None:
    for cls, name in SCOPES:
        call = cls.__call__

        @functools.wraps(call)
        def scoped(*a, _call=call, _name=name, **k):
            with jax.named_scope(_name):
                return _call(*a, **k)

        cls.__call__ = scoped


def part_of(op_name: str) -> str:
    for scope, part in (("ATTN", "attention"), ("MOE", "moe"), ("NORM", "norm")):
        if scope in op_name:
            return part
    return "head" if ("bcd" in op_name or "bcv" in op_name) else "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    add_scopes()
    step, state, batch, _ = compile_variant(True, a.set)
    op_names = {}
    for line in step.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"", line)
        if m:
            op_names[m.group(1)] = (m.group(3), m.group(2))
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    trace_dir = tempfile.mkdtemp(prefix="moejax_profile_")
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    wall = (time.perf_counter() - t0) / a.steps
    jax.profiler.stop_trace()
    data = ProfileData.from_file(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0])
    shutil.rmtree(trace_dir, ignore_errors=True)

    exclusive = collections.Counter()
    threads = 0
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            threads += 1
            events = sorted((e.start_ns, e.duration_ns, e.name) for e in line.events if not e.name.startswith(SKIP))
            stack: list[tuple[int, int, str]] = []
            for start, dur, name in events:
                while stack and stack[-1][0] + stack[-1][1] <= start:
                    stack.pop()
                if stack:
                    exclusive[stack[-1][2]] -= dur
                exclusive[name] += dur
                stack.append((start, dur, name))
    parts, ops = collections.Counter(), collections.Counter()
    for name, ns in exclusive.items():
        op, shape = op_names.get(name, ("?", "?"))
        parts[part_of(op)] += ns
        short = re.sub(r"jit\(step\)/|while/body/|closed_call/", "", op)
        ops[(part_of(op), name.split(".")[0], short[-60:], shape[:32])] += ns
    total = sum(parts.values())
    per_step = lambda ns: ns / a.steps / 1e6  # noqa: E731
    print(f"step {1e3 * wall:.0f} ms wall; in operations {per_step(total):.0f} ms of CPU on {threads} worker "
          f"threads ({100 * per_step(total) / (1e3 * wall * max(threads, 1)):.0f}% of their wall time)")
    for part, ns in parts.most_common():
        print(f"{part:<10}{per_step(ns):9.1f} ms {100 * ns / total:5.1f}%")
    print()
    for (part, kind, op, shape), ns in ops.most_common(a.top):
        print(f"{per_step(ns):8.1f} ms  {part:<9} {kind:<28} {shape:<32} {op}")


if __name__ == "__main__":
    main()
