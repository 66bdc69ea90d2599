"""`python -m moejax.selfcheck --quick --json` runs on CPU and reports every registered implementation."""
import json
import subprocess
import sys

from moejax.model import attention_impl, dispatch


def test_selfcheck_runs_on_cpu_and_covers_the_registries():
    out = subprocess.run([sys.executable, "-m", "moejax.selfcheck", "--quick", "--json"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["backend"] == "cpu"
    attn = {(r["impl"], r["dtype"]): r for r in report["attention"]}
    for name in attention_impl.ATTENTION_IMPLS.names():
        if name != "xla":
            for dt in ("float32", "bfloat16"):
                assert (name, dt) in attn
    assert attn[("cudnn", "float32")]["status"] == "unsupported"  # cudnn on CPU: named, not run
    for name in ("chunked", "splash", "pallas_gpu"):
        assert attn[(name, "float32")]["status"] == "ok"
        assert attn[(name, "float32")]["max_rel_err"] <= report["tolerances"]["float32"]
    assert {r["impl"] for r in report["grouped_ffn"]} == set(dispatch.GROUPED_FFNS.names()) - {"ragged_dot"}
    assert report["ragged_dot"]["form"].startswith("dense masked dot")  # CPU lowering (DESIGN.md)
    assert report["attention_auto"]["seq 8192, float32"] == "chunked"
    assert {r["impl"] for r in report["bench"]} >= {"xla", "chunked"}
    assert all(r["tokens_per_sec"] > 0 and r["peak_memory_bytes"] > 0 for r in report["bench"])
