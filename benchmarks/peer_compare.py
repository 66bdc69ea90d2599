"""moejax against Hugging Face `transformers` Mixtral, same shapes, same machine, one invocation.

    python benchmarks/peer_compare.py [--peer-python /work/peer-venv/bin/python] [--steps 8] [--rounds 2]

Both train a 4-layer Mixtral-shaped MoE (vocab 4096, d_model 256, 8 heads / 4 KV heads, 8 experts
top-2 of width 512, seq 256, batch 8, float32, AdamW) on random tokens: the peer with
benchmarks/peer_transformers.py in its own virtual environment (benchmarks/requirements-peer.txt),
moejax with `python -m moejax.bench`. Each side runs in its own process, one after the other,
`--rounds` times alternately (so a change of machine load hits both), and every run reports the
median of `--steps` timed steps after its warm-up. The peer runs once per thread count of
`--peer-threads` (torch's default, 2 here, and 1: on a loaded machine torch's OpenMP threads slow
down badly when they must wait for each other) and its fastest run counts. The ratio is moejax
tokens/s over the peer's, per round and as the median over rounds. The last stdout line is one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"vocab": 4096, "d_model": 256, "layers": 4, "heads": 8, "kv_heads": 4, "experts": 8,
          "top_k": 2, "d_expert": 512, "seq": 256, "batch": 8}


def moejax_cmd(steps: int, extra: list[str]) -> list[str]:
    s = SHAPES
    sets = [f"model.vocab_size={s['vocab']}", f"model.d_model={s['d_model']}", f"model.n_layers={s['layers']}",
            f"model.n_heads={s['heads']}", f"model.n_kv_heads={s['kv_heads']}",
            f"model.moe.num_experts={s['experts']}", f"model.moe.top_k={s['top_k']}",
            f"model.moe.d_expert={s['d_expert']}", f"data.seq_len={s['seq']}",
            f"train.batch_size={s['batch']}", "train.dtype=float32", "mesh.data=1"] + extra
    cmd = [sys.executable, "-m", "moejax.bench", "--steps", str(steps), "--json"]
    for x in sets:
        cmd += ["--set", x]
    return cmd


def peer_cmd(python: str, steps: int, experts_impl: str | None, threads: int) -> list[str]:
    s = SHAPES
    cmd = [python, os.path.join(ROOT, "benchmarks", "peer_transformers.py"), "--steps", str(steps), "--json",
           "--vocab", str(s["vocab"]), "--d-model", str(s["d_model"]), "--layers", str(s["layers"]),
           "--heads", str(s["heads"]), "--kv-heads", str(s["kv_heads"]), "--experts", str(s["experts"]),
           "--top-k", str(s["top_k"]), "--d-expert", str(s["d_expert"]), "--seq", str(s["seq"]),
           "--batch", str(s["batch"]), "--threads", str(threads)]
    return cmd + (["--experts-impl", experts_impl] if experts_impl else [])


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        sys.exit(f"error: {' '.join(cmd[:3])} ... failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--experts-impl", default=None, help="peer experts_implementation (default: its own)")
    p.add_argument("--peer-threads", default="0,1",
                   help="torch thread counts to run the peer with (0 = torch's default); the fastest counts")
    p.add_argument("--no-hugetlb", action="store_true",
                   help="run both sides without GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (by default both get it, "
                        "as `python -m moejax.bench` sets it for itself: transparent huge pages for large "
                        "allocations, fewer page faults on the big per-step buffers)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra moejax config override (repeatable)")
    a = p.parse_args()
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if a.no_hugetlb:
        env["MOEJAX_BENCH_NO_HUGETLB"] = "1"
    else:
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    rounds = []
    for r in range(a.rounds):
        load = os.getloadavg()[0]
        peers = [run_json(peer_cmd(a.peer_python, a.steps, a.experts_impl, int(n)), env)
                 for n in a.peer_threads.split(",")]
        peer = max(peers, key=lambda x: x["tokens_per_sec"])
        ours = run_json(moejax_cmd(a.steps, a.set), dict(env, JAX_PLATFORMS="cpu"))
        ratio = ours["tokens_per_sec"] / peer["tokens_per_sec"]
        rounds.append({"load_avg_1m": load, "peer": peer, "peer_runs": peers, "moejax": ours, "ratio": ratio})
        tried = ", ".join(f"{x['threads']} thread(s) {x['tokens_per_sec']:,.0f}" for x in peers)
        print(f"round {r + 1}/{a.rounds} (1-min load average {load:.1f}): transformers "
              f"{peer['tokens_per_sec']:,.0f} tokens/s (best of {tried}; {peer['experts_impl']} experts), moejax "
              f"{ours['tokens_per_sec']:,.0f} tokens/s (MFU {100 * ours['mfu']:.1f}% of "
              f"{1e3 * ours['peak_tflops']:.0f} GFLOP/s matmul probe): ratio {ratio:.2f}", flush=True)
    ratio = statistics.median(x["ratio"] for x in rounds)
    print(f"median ratio moejax / transformers over {a.rounds} rounds: {ratio:.2f}", flush=True)
    print(json.dumps({"ratio": ratio, "shapes": SHAPES, "hugetlb": not a.no_hugetlb, "rounds": rounds}), flush=True)


if __name__ == "__main__":
    main()
