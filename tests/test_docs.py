"""The docs tell the truth: the configuration reference is generated from the code and current, the
shell blocks marked runnable run as shown, every relative link resolves, the README's commands are
the ones CI runs.

A shell block is runnable when the line before its fence is `<!-- runnable -->` (exit code 0
expected) or `<!-- runnable exit=N -->` (a user error: exit code N and one `error: ...` line). They run
with bash in a temp directory holding a copy of configs/, with this Python first on PATH, so each
must be cheap (seconds): `--help`, `plan`, config errors. Expensive commands are run by hand and the
docs say when and where.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from moejax import config, config_doc
from moejax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted([os.path.join(REPO, "README.md"),
               *glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)])
RUNNABLE = re.compile(r"^<!--\s*runnable(?P<opts>[^>]*?)\s*-->[ \t]*\n```(?:bash|sh|console)?[ \t]*\n"
                      r"(?P<body>.*?)\n```", re.S | re.M)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_SRC = re.compile(r"<(?:img|a)\s[^>]*(?:src|href)=\"(?P<target>[^\"]+)\"")


def rel(path: str) -> str:
    return os.path.relpath(path, REPO)


def runnable_blocks() -> list:
    blocks = []
    for path in DOCS:
        text = open(path, encoding="utf-8").read()
        for m in RUNNABLE.finditer(text):
            opts = dict(o.split("=", 1) for o in m["opts"].split())
            line = text.count("\n", 0, m.start()) + 1
            blocks.append(pytest.param(m["body"], int(opts.get("exit", 0)), id=f"{rel(path)}:{line}"))
    return blocks


# ------------------------------------------------------------------------------- configuration.md


def test_configuration_reference_is_current():
    with open(config_doc.repo_doc_path(), encoding="utf-8") as f:
        current = f.read()
    assert current == config_doc.render(), \
        "docs/configuration.md is out of date: run `python -m moejax.config_doc --write`"


def _row(text: str, key: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, key
    return rows[0]


def test_reference_lists_every_key_with_its_bounds_and_default():
    text = config_doc.render()
    leaves = [k for k in config._all_keys(config.Config)
              if not any(o.startswith(k + ".") for o in config._all_keys(config.Config))]
    for key in leaves:
        _row(text, key)
    assert "| `train.min_lr_ratio` | float | `0.1` | [0, 1] |" in text
    assert "| `model.moe.capacity_factor` | float | `1.25` | >= 0 |" in text  # 0 = dynamic capacity
    assert "| `model.moe.routed_scaling_factor` | float | `1.0` | > 0 |" in text  # an exclusive bound
    assert "| `model.head_dim` | int or null | `null` | >= 1 |" in text
    assert "| `train.dtype` | str | `float32` | `float32`, `bfloat16` |" in text


@pytest.mark.parametrize("key", ["model.moe.router", "model.moe.dispatch", "model.moe.gmm",
                                 "model.attention", "model.rope_scaling.type", "train.freeze"])
def test_allowed_names_in_the_reference_are_what_validation_allows(key):
    """The reference's `allowed` cell and the validator's error message list the same names."""
    value = "[nope]" if key == "train.freeze" else "nope"
    with pytest.raises(ConfigError) as e:
        config.load(None, [f"{key}={value}"])
    allowed = str(e.value).split("allowed: ")[1]
    in_doc = re.findall(r"`([^`]+)`", _row(config_doc.render(), key).split(" | ")[3])
    assert sorted(in_doc) == sorted(a.strip() for a in allowed.split(","))


def test_config_doc_check_flags_a_stale_file(tmp_path, monkeypatch):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    monkeypatch.setattr(config_doc, "repo_doc_path", lambda: str(stale))
    assert config_doc.main(["--check"]) == 1
    assert config_doc.main(["--write"]) == 0
    assert config_doc.main(["--check"]) == 0


# ------------------------------------------------------------------------------ runnable commands


def test_docs_have_runnable_blocks():
    ids = [p.id for p in runnable_blocks()]
    assert len(ids) >= 5, ids
    assert any("getting_started" in i for i in ids)


@pytest.mark.parametrize("body, exit_code", runnable_blocks())
def test_runnable_block(body, exit_code, tmp_path):
    shutil.copytree(os.path.join(REPO, "configs"), tmp_path / "configs")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(["bash", "-eo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == exit_code, f"{body}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
    if exit_code:
        assert out.stderr.strip().splitlines()[-1].startswith("error: "), out.stderr


# -------------------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set:
    text = FENCE.sub("", open(path, encoding="utf-8").read())
    seen, out = {}, set()
    for h in re.findall(r"^#{1,6}\s+(.*?)\s*#*$", text, re.M):
        s = slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_relative_links_resolve(path):
    text = FENCE.sub("", open(path, encoding="utf-8").read())
    bad = []
    for m in [*LINK.finditer(text), *HTML_SRC.finditer(text)]:
        target = m["target"]
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(dest):
            bad.append(f"{target} (no such file)")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            bad.append(f"{target} (no such heading)")
    assert not bad, f"{rel(path)}: " + ", ".join(bad)


# ----------------------------------------------------------------------------------- README vs CI


def test_readme_commands_are_the_ones_ci_runs():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
    assert "pip install -e . && python -m moejax.train --config configs/quickstart.yaml" in readme
    test_cmd = re.search(r"^pip install -e '\.\[test\]' && (pytest.*)$", readme, re.M)
    assert test_cmd, "README lost its install-and-test command"
    assert "pip install --quiet -e '.[test]'" in ci
    assert test_cmd[1] in ci.splitlines(), f"README runs {test_cmd[1]!r}; .ci/run does not"
