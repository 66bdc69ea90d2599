"""The embedded moejax_tasks dataset: determinism, balance, exact answers (re-derived here from the
prompt text), held-out splits, and the TFDS build/read round trip with no network."""
import collections
import contextlib
import io
import re
import socket

import pytest
import tensorflow_datasets as tfds

from moejax.data import tasks
from moejax.data.example import Example
from moejax.errors import UserError

DOMAINS = {"arithmetic", "units", "strings", "sorting", "code", "facts"}


def qa(ex):
    (user, prompt), (assistant, answer) = ex.turns
    assert (user, assistant) == ("user", "assistant")
    return prompt, answer


# Independent evaluators: each recomputes the answer from the prompt text alone.

_TO_BASE = {"km": 1000_000, "m": 1000, "cm": 10, "mm": 1, "kg": 1000_000, "g": 1000, "mg": 1,
            "L": 1000, "mL": 1, "h": 3600, "min": 60, "s": 1}


def solve_arithmetic(p):
    a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", p).groups()
    return str(eval(f"{a} {op} {b}"))


def solve_units(p):
    value, src, dst = re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", p).groups()
    base = int(value) * _TO_BASE[src]
    assert base % _TO_BASE[dst] == 0, p
    return str(base // _TO_BASE[dst])


def solve_strings(p):
    op, rest = p.split(": ", 1)
    words = rest.split()
    return {"Reverse the words": " ".join(words[::-1]), "Repeat twice": " ".join(words * 2),
            "Last word": words[-1], "Count the words": str(len(words))}[op]


def solve_sorting(p):
    order, rest = re.fullmatch(r"Sort (ascending|descending): ([\d ]+)", p).groups()
    return " ".join(map(str, sorted(map(int, rest.split()), reverse=order == "descending")))


def solve_code(p):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(p, {})
    return out.getvalue().strip()


def fact_key(p):
    for attribute, pattern in (("color", r"What color is the (\w+)\?"),
                               ("home", r"Where does the (\w+) live\?"),
                               ("food", r"What does the (\w+) eat\?")):
        m = re.fullmatch(pattern, p)
        if m:
            return m.group(1), attribute
    raise AssertionError(f"not a facts question: {p!r}")


SOLVERS = {"arithmetic": solve_arithmetic, "units": solve_units, "strings": solve_strings,
           "sorting": solve_sorting, "code": solve_code}


# ------------------------------------------------------------------------------------------------


def test_deterministic_by_seed_and_split():
    a = tasks.generate("train", 120, seed=0)
    assert a == tasks.generate("train", 120, seed=0)
    assert a[:30] == tasks.generate("train", 30, seed=0)
    assert a != tasks.generate("train", 120, seed=1)
    assert [qa(e) for e in a] != [qa(e) for e in tasks.generate("validation", 120, seed=0)]
    assert tasks.generate("validation", 60) != tasks.generate("test", 60)


def test_domains_round_robin_and_balanced():
    examples = tasks.generate("train", 600, seed=0)
    assert set(tasks.DOMAINS) == DOMAINS
    assert [e.domain for e in examples[:6]] == list(tasks.DOMAINS)
    assert collections.Counter(e.domain for e in examples) == {d: 100 for d in DOMAINS}


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_answers_exact_short_ascii(split):
    for ex in tasks.generate(split, 600, seed=3):
        prompt, answer = qa(ex)
        assert prompt.isascii() and answer.isascii()
        assert 0 < len(answer.split()) <= 10 and len(prompt) < 80, (prompt, answer)
        if ex.domain == "facts":
            entity, attribute = fact_key(prompt)
            assert tasks.facts_table()[entity][attribute] == answer
        else:
            assert SOLVERS[ex.domain](prompt) == answer, (ex.domain, prompt)


def test_every_question_kind_appears():
    prompts = [qa(e)[0] for e in tasks.generate("train", 1200, seed=0)]
    for marker in (" + ", " - ", " * ", "Reverse the words:", "Repeat twice:", "Last word:",
                   "Count the words:", "ascending", "descending", "for i in range", "print(a ",
                   "What color", "Where does", "What does"):
        assert any(marker in p for p in prompts), marker


def test_facts_table_fixed_and_shared_by_splits():
    table = tasks.facts_table()
    assert len(table) == 40 and all(set(v) == {"color", "home", "food"} for v in table.values())
    # Pinned: a data dir built at the same VERSION holds this table, so changing it needs a new VERSION.
    assert list(table.items())[:2] == [
        ("doltuft", {"color": "crimson", "home": "canyon", "food": "beetles"}),
        ("zindle", {"color": "amber", "home": "desert", "food": "berries"})]
    answers = collections.defaultdict(set)
    for split in ("train", "validation"):
        for ex in tasks.generate(split, 1200, seed=0):
            if ex.domain == "facts":
                prompt, answer = qa(ex)
                answers[fact_key(prompt)].add((split, answer))
    # Both splits ask about the same entities, and every question has one answer in both.
    assert len({k for k, v in answers.items() if {s for s, _ in v} == {"train", "validation"}}) > 10
    assert all(len({a for _, a in v}) == 1 for v in answers.values())


def test_held_out_questions_not_in_train():
    train = {qa(e)[0] for e in tasks.generate("train", 3000, seed=0) if e.domain != "facts"}
    for split in ("validation", "test"):
        held = [qa(e)[0] for e in tasks.generate(split, 600, seed=0) if e.domain != "facts"]
        assert not train.intersection(held), split


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_tfds_build_and_read_round_trip(tmp_path, capsys, no_network):
    source = tasks.tfds_source("moejax_tasks/tiny", "train", str(tmp_path))
    assert "building moejax_tasks into " + str(tmp_path) in capsys.readouterr().err
    want = tasks.generate("train", 600, seed=0)
    assert len(source) == 600
    got = [source[i] for i in range(len(source))]
    assert all(isinstance(e, Example) for e in got)
    assert sorted(got, key=qa) == sorted(want, key=qa)  # TFDS stores them in its own shuffled order
    # The second open reuses the build.
    validation = tasks.tfds_source("moejax_tasks/tiny", "validation", str(tmp_path))
    assert "building" not in capsys.readouterr().err
    assert sorted(map(qa, validation)) == sorted(map(qa, tasks.generate("validation", 120, seed=0)))


def test_tfds_unknown_split_and_config(tmp_path):
    with pytest.raises(UserError, match="no split 'bogus'.*train, validation, test"):
        tasks.tfds_source("moejax_tasks/tiny", "bogus", str(tmp_path))
    with pytest.raises(UserError, match="unknown config 'huge'"):
        tasks.tfds_source("moejax_tasks/huge", "train", str(tmp_path))


def test_missing_dataset_is_a_user_error(tmp_path, no_network):
    with pytest.raises(UserError) as e:
        tasks.tfds_source("no_such_dataset", "train", str(tmp_path))
    assert "'no_such_dataset'" in str(e.value) and str(tmp_path) in str(e.value)
    assert "\n" not in str(e.value)
    # A dataset TFDS knows how to build is still never downloaded.
    with pytest.raises(UserError, match="'mnist' is not in the data dir"):
        tasks.tfds_source("mnist", "train", str(tmp_path))
    assert not (tmp_path / "mnist").exists() or not any((tmp_path / "mnist").rglob("*.array_record*"))


# Other TFDS datasets already on disk: records map to Examples by their feature names.


class MoejaxTestAlpaca(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
            {k: tfds.features.Text() for k in ("instruction", "input", "output")}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"instruction": "Add.", "input": "2 3", "output": "5"}
        yield 1, {"instruction": "Say hi.", "input": "", "output": "hi"}


class MoejaxTestLabels(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
            {"question": tfds.features.Text(), "label": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"question": "q", "label": "l"}


def prepare(builder_cls, data_dir):
    builder = builder_cls(data_dir=data_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(file_format="array_record")


def test_generic_dataset_records(tmp_path):
    prepare(MoejaxTestAlpaca, str(tmp_path))
    source = tasks.tfds_source("moejax_test_alpaca", "train", str(tmp_path))
    got = sorted(source[i].turns for i in range(len(source)))
    assert got == [(("user", "Add.\n\n2 3"), ("assistant", "5")),
                   (("user", "Say hi."), ("assistant", "hi"))]

    prepare(MoejaxTestLabels, str(tmp_path))
    with pytest.raises(UserError, match="features label, question"):
        tasks.tfds_source("moejax_test_labels", "train", str(tmp_path))
