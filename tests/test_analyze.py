"""Routing analysis: statistics on hand-built routings with known answers, plots, report, CLI, errors."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from moejax import config
from moejax.analyze import plots, report, stats
from moejax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = [
    "model.vocab_size=320", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.d_ff=64", "model.moe.num_experts=4", "model.moe.top_k=2",
    "model.moe.d_expert=32", "model.moe.dispatch=dense",
    "data.source=tfds:moejax_tasks/tiny", "data.seq_len=64", "data.eval_questions=2",
    "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1",
    "train.steps=3", "train.eval_every=3", "train.save_every=3",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def one_hot_gates(expert_n, e, k_weights=(1.0,)):
    """Gates [N, E] choosing experts expert_n, expert_n + 1, ... (mod E) with the given weights."""
    g = np.zeros((len(expert_n), e))
    for j, w in enumerate(k_weights):
        g[np.arange(len(expert_n)), (np.asarray(expert_n) + j) % e] = w
    return g


def tally_of(domain_n, gates_list, domains, token_n=None, position_n=None):
    n = len(domain_n)
    token_n = np.zeros(n, int) if token_n is None else token_n
    position_n = np.zeros(n, int) if position_n is None else position_n
    t = stats.RoutingTally(domains, [g.shape[1] for g in gates_list], stats.position_edges(16))
    probs = [np.full(g.shape, 1.0 / g.shape[1]) for g in gates_list]
    t.add(domain_n, stats.shuffled_labels(domain_n), token_n, position_n, list(zip(probs, gates_list)))
    return t


# ----------------------------------------------------------------------------------- statistics


def test_uniform_routing_has_zero_mi_equal_load_and_perfect_balance():
    d, e, per = 3, 4, 40
    domain_n = np.repeat(np.arange(d), per)
    expert_n = np.tile(np.arange(e), d * per // e)  # every domain spreads evenly over the experts
    t = tally_of(domain_n, [one_hot_gates(expert_n, e, (0.6, 0.4))], ["a", "b", "c"])
    s = stats.summarize(t)
    np.testing.assert_allclose(s["expert_load"], 1.0 / e)
    for row in np.array(s["expert_load"]).reshape(-1, e):
        assert row.sum() == pytest.approx(1.0)
    assert s["mutual_information"][0]["mi"] == pytest.approx(0.0, abs=1e-12)
    b = s["balance"][0]
    assert b["cv"] == pytest.approx(0.0, abs=1e-12)
    assert b["max_over_mean"] == pytest.approx(1.0)
    assert b["entropy"] == pytest.approx(math.log(e)) and b["entropy_norm"] == pytest.approx(1.0)
    assert s["leanings"] == []
    np.testing.assert_allclose(s["mean_router_prob"], 1.0 / e)


def test_one_expert_per_domain_gives_mi_log_domains():
    d, e, per = 4, 6, 25
    domain_n = np.repeat(np.arange(d), per)
    t = tally_of(domain_n, [one_hot_gates(domain_n, e)], list("wxyz"))
    s = stats.summarize(t)
    mi = s["mutual_information"][0]
    assert mi["mi"] == pytest.approx(math.log(d))
    assert mi["mi_first_choice"] == pytest.approx(math.log(d))
    assert mi["domain_entropy"] == pytest.approx(math.log(d))
    np.testing.assert_allclose(np.array(s["expert_load"])[:, 0, :d], np.eye(d))
    # Leanings: each used expert takes all of its slots from its own domain, 4x that domain's share.
    lean = {(r["expert"], r["domain"]): r["lift"] for r in s["leanings"]}
    assert lean == {(i, "wxyz"[i]): pytest.approx(d) for i in range(d)}
    assert s["balance"][0]["max_over_mean"] == pytest.approx(e / d)


def test_shuffled_labels_keep_sizes_and_give_chance_level_mi():
    rng = np.random.default_rng(0)
    d, e, per = 4, 4, 500
    domain_n = np.repeat(np.arange(d), per)
    shuffled = stats.shuffled_labels(domain_n, seed=1)
    assert np.array_equal(np.bincount(shuffled), np.bincount(domain_n))
    t = stats.RoutingTally(list("abcd"), [e], stats.position_edges(4))
    g = one_hot_gates(domain_n, e)
    t.add(domain_n, shuffled, np.zeros(len(domain_n), int), rng.integers(0, 4, len(domain_n)),
          [(g, g)])
    m = stats.layer_measures(t)[0]
    assert m["mi"] == pytest.approx(math.log(d))
    assert m["mi_shuffled"] < 0.01  # chance: ~(D-1)(E-1)/(2N) = 0.0045


def test_balance_measures_on_known_loads():
    b = stats.balance([3, 1])  # fractions 0.75, 0.25: std 0.25 over mean 0.5
    assert b["cv"] == pytest.approx(0.5) and b["max_over_mean"] == pytest.approx(1.5)
    one = stats.balance([0, 10, 0, 0])
    assert one["max_over_mean"] == pytest.approx(4.0) and one["entropy"] == 0.0
    assert one["cv"] == pytest.approx(math.sqrt(3))


def test_mutual_information_matches_entropy_identity():
    joint = np.random.default_rng(0).integers(0, 20, (5, 7)).astype(float)
    h = stats.entropy
    expect = h(joint.sum(1)) + h(joint.sum(0)) - h(joint)
    assert stats.mutual_information(joint) == pytest.approx(expect)


def test_tally_is_additive_over_batches_and_counts_tokens_positions_coselection():
    rng = np.random.default_rng(0)
    n, e = 60, 5
    domain_n, token_n = rng.integers(0, 2, n), rng.integers(0, 9, n)
    position_n = rng.integers(0, 16, n)
    probs = rng.dirichlet(np.ones(e), n)
    first_n = rng.integers(0, e, n)
    gates = one_hot_gates(first_n, e, (0.7, 0.3))  # top-2: experts i and i + 1
    whole = stats.RoutingTally(["p", "q"], [e], stats.position_edges(16))
    whole.add(domain_n, domain_n, token_n, position_n, [(probs, gates)])
    parts = stats.RoutingTally(["p", "q"], [e], stats.position_edges(16))
    for sl in (slice(0, 25), slice(25, n)):
        parts.add(domain_n[sl], domain_n[sl], token_n[sl], position_n[sl], [(probs[sl], gates[sl])])
    a, b = stats.summarize(whole), stats.summarize(parts)
    assert_same_tree(a, b)
    co = np.array(a["coselection"][0])
    assert np.diag(co).sum() == 2 * n                      # two experts per token
    for i in range(e):
        assert co[i, (i + 1) % e] == co[(i + 1) % e, i] == (first_n == i).sum()
    assert co[0, 2] == 0                                   # never chosen together
    for per_domain in a["position_importance"]:
        rows = np.array(per_domain[0])
        np.testing.assert_allclose(rows.sum(1)[rows.sum(1) > 0], 1.0)
    top = a["top_tokens"][0]
    assert sum(t["count"] for t in top[0]) == int(gates[:, 0].astype(bool).sum())
    for t in top[0]:
        assert t["count"] == int(((token_n == t["id"]) & (gates[:, 0] > 0)).sum())
        assert t["share"] == pytest.approx(t["count"] / (token_n == t["id"]).sum())


def assert_same_tree(a, b):
    """Equal JSON-like trees, floats up to summation order."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
    else:
        assert a == b


def test_layers_may_have_different_expert_counts():
    domain_n = np.repeat(np.arange(2), 8)
    t = tally_of(domain_n, [one_hot_gates(domain_n, 4), one_hot_gates(domain_n, 8)], ["a", "b"])
    s = stats.summarize(t, layer_names=["layer 0", "layer 3"])
    assert [len(s["expert_load"][0][l]) for l in range(2)] == [4, 8]
    assert stats.scalars(t)["routing_mi"] == pytest.approx(math.log(2))


# ----------------------------------------------------------------------------------- plots, html


def synthetic_summary():
    rng = np.random.default_rng(0)
    domains, n = ["arith", "code", "facts"], 600
    domain_n = rng.integers(0, 3, n)
    layers = []
    for e in (4, 8):
        p = rng.dirichlet(np.ones(e), n)
        p[np.arange(n), domain_n % e] += 1
        p /= p.sum(1, keepdims=True)
        top = np.argsort(-p, 1)[:, :2]
        g = np.zeros_like(p)
        np.put_along_axis(g, top, np.take_along_axis(p, top, 1), 1)
        layers.append((p, g))
    t = stats.RoutingTally(domains, [4, 8], stats.position_edges(32))
    t.add(domain_n, stats.shuffled_labels(domain_n), rng.integers(3, 40, n), rng.integers(0, 32, n),
          layers)
    s = stats.summarize(t, piece=lambda i: f"w{i}", layer_names=["layer 1", "layer 3"])
    samples = [{"domain": d, "ids": list(range(30)),
                "first_choice": [rng.integers(-1, 4, 30).tolist(), rng.integers(0, 8, 30).tolist()]}
               for d in domains]
    return s, samples


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, path
    from PIL import Image
    with Image.open(path) as im:
        im.verify()
    import matplotlib.image
    assert matplotlib.image.imread(path).shape[0] > 50


def test_plots_are_valid_pngs_and_the_page_shows_every_one(tmp_path):
    s, samples = synthetic_summary()
    names = plots.write_all(s, samples, lambda i: "\n" if i % 9 == 8 else f"w{i} ", str(tmp_path))
    assert set(names) == {"expert_load.png", "load_over_layers.png", "specialisation.png",
                          "token_samples.png", "position_importance.png", "coselection.png"}
    for name in names:
        assert_png(tmp_path / name)
    page = open(report.write_html(s, names, str(tmp_path), {"workdir": "w"}), encoding="utf-8").read()
    for name in names:
        assert f'src="{name}"' in page and (tmp_path / name).exists()
    assert "Summary" in page and "expert" in page and "layer 3" in page


def test_summary_text_names_the_leaning_expert_and_balance():
    d, e, per = 2, 4, 50
    domain_n = np.repeat(np.arange(d), per)
    s = stats.summarize(tally_of(domain_n, [one_hot_gates(domain_n * 2, e)], ["math", "code"]))
    text = " ".join(report.summary_text(s))
    assert "is strong" in text and "moderately balanced" in text
    assert "math -> expert 0 (100%)" in text and "code -> expert 2 (100%)" in text


# ----------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 3-step run of the tiny model on the embedded tiny dataset (with one eval)."""
    from moejax.train import train
    root = tmp_path_factory.mktemp("analyze")
    workdir = str(root / "run")
    train(config.load(None, TINY_RUN + [f"data.tfds_dir={root / 'tfds'}", f"train.workdir={workdir}"]))
    return workdir


def cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "moejax.analyze", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_training_logs_routing_scalars(tiny_run):
    from moejax.metrics import read_metrics
    evals = [r for r in read_metrics(tiny_run) if "eval_loss" in r]
    assert evals and all(k in evals[-1] for k in ("routing_balance_cv", "routing_mi",
                                                  "routing_mi_shuffled", "routing_max_over_mean"))
    assert 0 <= evals[-1]["routing_mi"] <= math.log(6) + 1e-6


def test_cli_end_to_end_on_a_tiny_run(tiny_run, tmp_path, capsys):
    from moejax.analyze.__main__ import main  # in-process (the exit codes: the errors test)
    extra = tmp_path / "mine.jsonl"
    extra.write_text("".join(json.dumps({"text": f"hello world number {i}"}) + "\n" for i in range(40)))
    out = tmp_path / "report"
    assert main(["--workdir", tiny_run, "--out", str(out), "--max-tokens", "400",
                 "--data", "run", "--data", f"jsonl:{extra}"]) == 0
    printed = capsys.readouterr()
    assert "routing" in printed.err and "Balance:" in printed.out  # progress; the summary
    data = json.loads((out / "routing.json").read_text())
    assert data["domains"] == ["arithmetic", "code", "facts", "sorting", "strings", "units", "mine"]
    assert data["layers"] == ["layer 0", "layer 1"] and data["num_experts"] == [4, 4]
    load = np.array(data["expert_load"])
    assert load.shape == (7, 2, 4)
    np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-9)
    assert all(0 < n <= 400 + 64 for n in data["tokens"].values())
    for key in ("mean_router_prob", "balance", "mutual_information", "top_tokens", "coselection",
                "position_importance", "samples"):
        assert key in data, key
    mi = data["mutual_information"][0]
    assert 0 <= mi["mi"] <= mi["domain_entropy"] + 1e-9
    page = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 6
    for name in pngs:
        assert f'src="{name}"' in page
        assert_png(out / name)


def test_cli_errors_are_one_clear_line(tiny_run, tmp_path):
    r = cli("--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "not a moejax run directory" in r.stderr and "Traceback" not in r.stderr
    from moejax.analyze.__main__ import main
    empty = tmp_path / "empty"
    empty.mkdir()
    config.dump(config.load(None, TINY_RUN), str(empty / "config.yaml"))
    with pytest.raises(UserError, match="no checkpoint"):
        main(["--workdir", str(empty), "--out", str(tmp_path / "r")])
    with pytest.raises(UserError, match="nope.jsonl.*does not exist"):
        main(["--workdir", tiny_run, "--out", str(tmp_path / "r"), "--data", "jsonl:/nope.jsonl"])
    with pytest.raises(UserError, match="unknown scheme"):
        main(["--workdir", tiny_run, "--out", str(tmp_path / "r"), "--data", "s3:abc"])
