"""Every notebook runs top to bottom in a real kernel (nbclient + ipykernel) on CPU at smoke sizes
(MOEJAX_NOTEBOOK_SMOKE=1), and is what notebooks/make_notebooks.py generates, without outputs."""
import asyncio
import os
import re
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from tests.xla import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(REPO, "notebooks")
NAMES = ["quickstart", "dense_to_moe", "routing_analysis"]


def test_notebooks_are_current_and_have_no_outputs():
    out = subprocess.run([sys.executable, os.path.join(NB_DIR, "make_notebooks.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sorted(f[:-6] for f in os.listdir(NB_DIR) if f.endswith(".ipynb")) == sorted(NAMES)
    for name in NAMES:
        nb = nbformat.read(os.path.join(NB_DIR, f"{name}.ipynb"), as_version=4)
        nbformat.validate(nb)
        badge = f"colab.research.google.com/github/moejax/moejax/blob/main/notebooks/{name}.ipynb"
        assert badge in nb.cells[0].source
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in nb.cells if c.cell_type == "code")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """name -> (notebook after execution or the exception that stopped it, its runs directory).

    The three notebooks run at the same time, each in its own kernel: on 2 cores that halves the
    wall-clock time (most of it is XLA compiling, one core per process). Each kernel gets smoke sizes,
    CPU, its own runs and TFDS directories, a shared persistent compilation cache (a notebook that
    trains the same model twice compiles it once), and XLA's cheapest CPU optimisation level: at
    these sizes compiling is nearly all of the time, and -O0 halved it (dense_to_moe alone: 98 s of
    CPU -> 50 s, same logits to 1e-7)."""
    fast_compile = FAST_COMPILE
    cache = str(tmp_path_factory.mktemp("jax_cache"))

    async def run(name):
        base = tmp_path_factory.mktemp(name)
        env = {**os.environ, "MOEJAX_NOTEBOOK_SMOKE": "1", "JAX_PLATFORMS": "cpu",
               "MOEJAX_NOTEBOOK_RUNS": str(base / "runs"), "TFDS_DATA_DIR": str(base / "tfds"),
               "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {fast_compile}".strip()}
        nb = nbformat.read(os.path.join(NB_DIR, f"{name}.ipynb"), as_version=4)
        client = NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": NB_DIR}})
        try:
            await client.async_execute(env=env)  # raises CellExecutionError on a failing cell
            return nb, base / "runs"
        except Exception as e:  # noqa: BLE001 - reported by that notebook's own test
            return e, base / "runs"

    async def run_all():
        return await asyncio.gather(*(run(name) for name in NAMES))

    return dict(zip(NAMES, asyncio.run(run_all())))


def notebook(executed, name):
    nb, runs = executed[name]
    if isinstance(nb, Exception):
        raise nb
    return nb, runs


def text_of(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def images_of(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)


def test_quickstart_notebook(executed):
    nb, runs = notebook(executed, "quickstart")
    out = text_of(nb)
    assert "backend cpu" in out and "smoke mode: True" in out
    assert re.search(r"step 4/4 \| loss", out)
    assert images_of(nb) == 1  # loss + expert load
    assert len(re.findall(r"model: '.*'   reference: ", out)) >= 6  # two questions per domain
    assert os.path.isfile(runs / "notebook_quickstart" / "metrics.jsonl")


def test_dense_to_moe_notebook(executed):
    nb, _ = notebook(executed, "dense_to_moe")
    out = text_of(nb)
    diffs = dict(re.findall(r"^(\S.*?)\s+max \|logits - dense logits\| = (\S+)$", out, re.M))
    assert set(diffs) == {"dense", "upcycled, top-2", "split, top-4", "split, top-2"}, out
    # Upcycling keeps the dense function for any k, splitting with k = E; split with k < E does not.
    assert float(diffs["upcycled, top-2"]) < 1e-4 and float(diffs["split, top-4"]) < 1e-4
    assert float(diffs["split, top-2"]) > 1e-3
    assert len(re.findall(r"eval loss after 2 more steps: \d", out)) == 3
    assert images_of(nb) == 1


def test_routing_analysis_notebook(executed):
    nb, runs = notebook(executed, "routing_analysis")
    out = text_of(nb)
    assert "notebook_routing" in out  # no quickstart run there: it trained its own
    report = runs / "notebook_routing" / "routing_report"
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert len(pngs) >= 5 and images_of(nb) == len(pngs)
    assert (report / "index.html").is_file()
    assert re.search(r"layer 0: max/mean load \d", out)
