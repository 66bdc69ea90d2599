"""lm-eval adapter: a tiny Mixtral with its own tokenizer, imported into moejax, scores a local
multiple-choice task exactly as lm-eval's own hf backend did (fixtures: tests/make_lm_eval_fixtures.py)."""
import json
import os

import numpy as np
import pytest

import lm_eval  # noqa: E402,F401  (the optional extra moejax[eval]; the [test] extra installs it)

from moejax.errors import UserError  # noqa: E402
from moejax.interop.hf import from_pretrained  # noqa: E402
from moejax.lm_eval_adapter import MoejaxLM, lm_eval_results, run_lm_eval  # noqa: E402
from moejax.tokenizer import load  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join("tests", "fixtures", "lm_eval")
TASK = "moejax_tiny_mc"


@pytest.fixture(scope="module")
def lm():
    os.chdir(REPO)  # the task YAML's data_files is relative to the repository root
    model, _ = from_pretrained(os.path.join(FIX, "tiny_mixtral"))
    return MoejaxLM(model, load(os.path.join(FIX, "tiny_mixtral")), batch_size=8, max_length=128)


def test_same_accuracy_and_loglikelihoods_as_hf_backend(lm):
    from lm_eval.tasks import TaskManager

    expected = json.load(open(os.path.join(FIX, "expected.json")))
    res = lm_eval_results(lm, [TASK], TaskManager(include_path=FIX), log_samples=True)
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    got = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    np.testing.assert_allclose(got, expected["loglikelihoods"], atol=1e-3, rtol=0)
    assert res["results"][TASK]["acc,none"] == expected["acc"]


def test_writes_results_and_samples_files(lm, tmp_path):
    metrics = run_lm_eval(None, [TASK], include_path=FIX, output_path=str(tmp_path), log_samples=True,
                          model=lm.model, tokenizer=lm.tokenizer, max_length=128)
    assert TASK + "/acc" in metrics
    files = [f for _, _, fs in os.walk(tmp_path) for f in fs]
    assert any(f.startswith("results_") and f.endswith(".json") for f in files), files
    assert any(f.startswith(f"samples_{TASK}_") for f in files), files


def test_unknown_task_is_a_user_error(lm):
    with pytest.raises(UserError, match="unknown lm-eval task 'no_such_task'"):
        run_lm_eval(None, ["no_such_task"], include_path=FIX, model=lm.model, tokenizer=lm.tokenizer)


def test_generate_until_uses_the_cache_and_stops_at_until(lm):
    class Req:
        args = ("Question: What is 2 + 3?\nAnswer:", {"until": ["\n"], "max_gen_toks": 6})

    (text,) = lm.generate_until([Req()])
    assert "\n" not in text and isinstance(text, str)


def test_without_lm_eval_the_command_names_the_extra(tmp_path):
    """With lm_eval not importable, `evaluate --lm-eval-tasks` fails in one line naming the extra."""
    import subprocess
    import sys

    blocker = tmp_path / "block"
    blocker.mkdir()
    # A meta-path finder that refuses lm_eval, as an environment without the extra would.
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoLmEval:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'lm_eval' or name.startswith('lm_eval.'):\n"
        "            raise ImportError('no lm_eval')\n"
        "sys.meta_path.insert(0, _NoLmEval())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), REPO])}
    r = subprocess.run([sys.executable, "-m", "moejax.evaluate", "--workdir", str(tmp_path / "none"),
                        "--lm-eval-tasks", "anything"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == ["error: lm-evaluation-harness is not installed: pip install 'moejax[eval]'"], r.stderr


def test_rolling_loglikelihood_and_greedy_generation_equal_hf_backend(lm):
    """loglikelihood_rolling (one text longer than max_length 128, so scored in rolling windows) and
    generate_until equal lm-eval's hf backend on the same checkpoint (expected_rolling.json)."""
    from lm_eval.api.instance import Instance

    expected = json.load(open(os.path.join(FIX, "expected_rolling.json")))
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                    for i, t in enumerate(expected["texts"])])
    np.testing.assert_allclose(got, expected["rolling"], atol=1e-3, rtol=1e-6)
    gens = lm.generate_until([Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 6,
                                                                   "do_sample": False}), i)
                              for i, c in enumerate(expected["contexts"])])
    assert gens == expected["generations"]


def test_apply_chat_template_renders_as_hf_backend(tmp_path):
    """--apply-chat-template: generation prompt, continuing an assistant prefix, and the retry
    without a refused system turn render as lm-eval's hf backend did (expected_chat.json)."""
    expected = json.load(open(os.path.join(REPO, FIX, "expected_chat.json")))
    template = tmp_path / "chat.jinja"
    template.write_text(expected["chat_template"])
    model, _ = from_pretrained(os.path.join(REPO, FIX, "tiny_mixtral"))
    lm = MoejaxLM(model, load(os.path.join(REPO, FIX, "tiny_mixtral"), chat_template=str(template)),
                  batch_size=8, max_length=128)
    got = [lm.apply_chat_template(chat, add_generation_prompt=gen) for chat, gen in expected["chats"]]
    assert got == expected["renders"]
