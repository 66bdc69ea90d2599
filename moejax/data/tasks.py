"""The embedded default dataset `moejax_tasks`, and random access to TFDS datasets as `Example`s.

`moejax_tasks` is a multi-domain instruction dataset the project generates itself, so the quickstart
trains with no download. Six clearly different domains, each answer exact (one string, a few tokens),
so learning is measured by exact-match accuracy and expert specialisation can be read per domain:

    arithmetic  "What is 47 + 38?"                    -> "85"
    units       "Convert 7 km to m."                  -> "7000"
    strings     "Reverse the words: red blue green"   -> "green blue red"
    sorting     "Sort ascending: 5 2 9 1"             -> "1 2 5 9"
    code        "x = 4\\nx = x * 3\\nprint(x)"          -> "12"
    facts       "What color is the doltuft?"          -> "crimson"  (a fixed table of 40 fictional
                                                                    entities, 3 attributes each)

Held-out questions. Each split draws from its own seed, and for every domain but `facts` the question
space is also partitioned by a hash of the prompt: about 10% of all possible questions are reserved
for validation and test, the rest for train, so a held-out question never appears in train (validation
and test may share questions by chance). `facts` is memorisation of one table by design, so all splits
ask about the same table.

`tfds_source` builds `moejax_tasks` into the TFDS data dir on first use (ArrayRecord, no network) and
opens it, or any other TFDS dataset already prepared there, as a `Source` of `Example`s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import random
import sys
import zlib
from typing import Any, Callable, Mapping, Sequence

import tensorflow_datasets as tfds

from moejax.data.example import Example
from moejax.errors import UserError

NAME = "moejax_tasks"
_SPLITS = ("train", "validation", "test")
_HELD_OUT_PERCENT = 10
_FACTS_SEED = 20240601  # fixed forever: every split and every run asks about the same table
_NUM_ENTITIES = 40

# ----------------------------------------------------------------------------------------------
# Domains: each a function rng -> (prompt, answer).


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} * {b}?", str(a * b)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)  # keep answers non-negative: fewer tokens to learn
        return f"What is {a} - {b}?", str(a - b)
    return f"What is {a} + {b}?", str(a + b)


# (big unit, small unit, small units per big unit): exact integer factors only.
_UNITS = (("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("m", "mm", 1000),
          ("kg", "g", 1000), ("g", "mg", 1000), ("L", "mL", 1000), ("h", "min", 60),
          ("min", "s", 60), ("h", "s", 3600))


def _units(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(_UNITS)
    value = rng.randint(1, 99)
    if rng.random() < 0.5:
        return f"Convert {value} {big} to {small}.", str(value * factor)
    return f"Convert {value * factor} {small} to {big}.", str(value)  # divides exactly by construction


_WORDS = ("red", "blue", "green", "black", "white", "cat", "dog", "fish", "bird", "tree", "stone",
          "river", "sun", "moon", "star", "book", "door", "cup", "hat", "box", "car", "road", "rain",
          "snow", "wind", "fire", "milk", "bread", "apple", "lamp", "chair", "ship")


def _strings(rng: random.Random) -> tuple[str, str]:
    op = rng.randrange(4)
    if op == 0:
        words = rng.sample(_WORDS, rng.randint(3, 5))
        return "Reverse the words: " + " ".join(words), " ".join(reversed(words))
    if op == 1:
        words = rng.sample(_WORDS, rng.randint(1, 2))
        return "Repeat twice: " + " ".join(words), " ".join(words + words)
    if op == 2:
        words = rng.sample(_WORDS, rng.randint(3, 5))
        return "Last word: " + " ".join(words), words[-1]
    words = rng.sample(_WORDS, rng.randint(2, 6))
    return "Count the words: " + " ".join(words), str(len(words))


def _sorting(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    descending = rng.random() < 0.5
    order = "descending" if descending else "ascending"
    answer = sorted(numbers, reverse=descending)
    return f"Sort {order}: " + " ".join(map(str, numbers)), " ".join(map(str, answer))


_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _code(rng: random.Random) -> tuple[str, str]:
    """Tiny Python programs; the answer is computed here, not by running them."""
    kind = rng.randrange(3)
    if kind == 0:  # one variable updated once or twice
        var, value = rng.choice("xyn"), rng.randint(1, 9)
        lines = [f"{var} = {value}"]
        for _ in range(rng.randint(1, 2)):
            op, b = rng.choice("+-*"), rng.randint(1, 9)
            lines.append(f"{var} = {var} {op} {b}")
            value = _APPLY[op](value, b)
        lines.append(f"print({var})")
    elif kind == 1:  # two variables combined
        a, b, op = rng.randint(1, 9), rng.randint(1, 9), rng.choice("+-*")
        lines = [f"a = {a}", f"b = {b}", f"print(a {op} b)"]
        value = _APPLY[op](a, b)
    else:  # a counted loop
        start, times, step = rng.randint(0, 9), rng.randint(2, 5), rng.randint(1, 9)
        lines = [f"s = {start}", f"for i in range({times}):", f"    s = s + {step}", "print(s)"]
        value = start + times * step
    return "\n".join(lines), str(value)


_COLORS = ("teal", "amber", "violet", "crimson", "olive", "silver", "ivory", "indigo")
_HOMES = ("marsh", "cave", "forest", "desert", "reef", "tundra", "meadow", "canyon")
_FOODS = ("moss", "beetles", "berries", "fish", "seeds", "roots", "mushrooms", "honey")
_QUESTIONS = {"color": "What color is the {}?", "home": "Where does the {} live?",
              "food": "What does the {} eat?"}


@functools.lru_cache(maxsize=1)
def facts_table() -> dict[str, dict[str, str]]:
    """{entity: {"color", "home", "food"}}: 40 fictional entities, the same for every split and run."""
    rng = random.Random(_FACTS_SEED)
    onsets, middles, ends = "bdfgklmprstvz", "aeiou", ("blat", "nix", "mop", "dle", "rook", "vash",
                                                      "quin", "tuft", "gorn", "zel")
    names: list[str] = []
    while len(names) < _NUM_ENTITIES:
        name = rng.choice(onsets) + rng.choice(middles) + rng.choice("rln") + rng.choice(ends)
        if name not in names:
            names.append(name)
    return {n: {"color": rng.choice(_COLORS), "home": rng.choice(_HOMES), "food": rng.choice(_FOODS)}
            for n in names}


def _facts(rng: random.Random) -> tuple[str, str]:
    table = facts_table()
    entity = rng.choice(sorted(table))
    attribute = rng.choice(sorted(_QUESTIONS))
    return _QUESTIONS[attribute].format(entity), table[entity][attribute]


_DOMAINS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic, "units": _units, "strings": _strings, "sorting": _sorting,
    "code": _code, "facts": _facts}
DOMAINS = tuple(_DOMAINS)
_SHARED_ACROSS_SPLITS = ("facts",)


def _held_out(prompt: str) -> bool:
    """Whether a question belongs to validation/test: a stable hash, so the partition never moves."""
    return zlib.crc32(prompt.encode("ascii")) % 100 < _HELD_OUT_PERCENT


def generate(split: str, n: int, seed: int = 0) -> list[Example]:
    """`n` examples of `split`, domains in round-robin order; the same (split, n, seed) gives the same
    list, and a shorter `n` gives a prefix of a longer one."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(_SPLITS)}")
    rng = random.Random(f"{NAME}/{split}/{seed}")  # str seeds hash with SHA-512: stable across runs
    want_held_out = split != "train"
    examples = []
    for i in range(n):
        domain = DOMAINS[i % len(DOMAINS)]
        while True:  # rejection: ~1.1 draws per train example, ~10 per held-out one
            prompt, answer = _DOMAINS[domain](rng)
            if domain in _SHARED_ACROSS_SPLITS or _held_out(prompt) == want_held_out:
                break
        examples.append(Example((("user", prompt), ("assistant", answer)), domain))
    return examples


# ----------------------------------------------------------------------------------------------
# The TFDS builder.


@dataclasses.dataclass
class MoejaxTasksConfig(tfds.core.BuilderConfig):
    split_sizes: dict[str, int] = dataclasses.field(default_factory=dict)


class MoejaxTasks(tfds.core.GeneratorBasedBuilder):
    """`moejax_tasks`: the examples of `generate(split, n, seed=0)` as prompt/answer/domain text.

    Bump VERSION whenever `generate` changes its output, so old data dirs are rebuilt, not reused."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Six domains: arithmetic, units, strings, sorting, code, facts."}
    BUILDER_CONFIGS = [
        # 20,000 rather than 50,000 train examples: see `tfds_source` for the measured build times.
        MoejaxTasksConfig(name="default", description="The quickstart's dataset.",
                          split_sizes={"train": 20_000, "validation": 1_000, "test": 1_000}),
        MoejaxTasksConfig(name="tiny", description="A few hundred examples, for tests and smoke runs.",
                          split_sizes={"train": 600, "validation": 120, "test": 120}),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text
        return self.dataset_info_from_configs(
            description="Six-domain instructions with exact answers, generated by moejax.",
            features=tfds.features.FeaturesDict({"prompt": text(), "answer": text(), "domain": text()}))

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        return {split: self._generate_examples(split, n)
                for split, n in self.builder_config.split_sizes.items()}

    def _generate_examples(self, split: str, n: int):
        for i, ex in enumerate(generate(split, n, seed=0)):
            (_, prompt), (_, answer) = ex.turns
            yield i, {"prompt": prompt, "answer": answer, "domain": ex.domain}


# ----------------------------------------------------------------------------------------------
# Random access to TFDS datasets as Examples.


class Source:
    """A random-access sequence of `Example`s: `len(source)`, `source[i]`."""

    def __init__(self, records: Sequence[Mapping[str, Any]], to_example: Callable[[Mapping], Example]):
        self._records = records
        self._to_example = to_example

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> Example:
        n = len(self._records)
        if not -n <= i < n:  # IndexError (not ArrayRecord's ValueError) ends a `for` loop over us
            raise IndexError(f"example {i} is out of range for {n} examples")
        return self._to_example(self._records[i % n])


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _from_prompt_answer(r: Mapping) -> Example:
    return Example((("user", _text(r["prompt"])), ("assistant", _text(r["answer"]))),
                   _text(r.get("domain", "")))


def _from_instruction_output(r: Mapping) -> Example:
    prompt = _text(r["instruction"])
    if _text(r.get("input", "")):  # Alpaca's optional context goes after the instruction
        prompt += "\n\n" + _text(r["input"])
    return Example((("user", prompt), ("assistant", _text(r["output"]))), _text(r.get("domain", "")))


def _from_text(r: Mapping) -> Example:
    return Example((("assistant", _text(r["text"])),), _text(r.get("domain", "")))


# Checked in order: the first whose features are all present decides how records become Examples.
_RECORD_FORMATS = ((("prompt", "answer"), _from_prompt_answer),
                   (("instruction", "output"), _from_instruction_output),
                   (("text",), _from_text))


def _record_converter(name: str, features: Sequence[str]) -> Callable[[Mapping], Example]:
    for keys, convert in _RECORD_FORMATS:
        if all(k in features for k in keys):
            return convert
    wanted = " or ".join("(" + ", ".join(keys) + ")" for keys, _ in _RECORD_FORMATS)
    raise UserError(f"TFDS dataset {name!r} has features {', '.join(sorted(features))}; moejax needs "
                    f"string features {wanted}")


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # TFDS writes a variant into a temporary dir and renames it when complete, so its
    # dataset_info.json exists only for a finished build. (`builder.is_prepared()` says the same
    # but logs a warning for every missing dataset.)
    return (builder.data_path / "dataset_info.json").exists()


def _build_embedded(builder: tfds.core.DatasetBuilder) -> None:
    print(f"building {builder.name} into {builder.data_dir_root} ...", file=sys.stderr)
    tfds.disable_progress_bar()  # moejax reads by random access: TFDS's bars only ever show here
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading and preparing ..."
        builder.download_and_prepare(
            file_format="array_record",
            # Nothing to fetch: never look for a prebuilt copy on GCS.
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def _open_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    base, _, config = name.partition("/")
    if base == NAME:
        configs = [c.name for c in MoejaxTasks.BUILDER_CONFIGS]
        if config and config not in configs:
            raise UserError(f"TFDS dataset {name!r}: unknown config {config!r}; allowed: "
                            f"{', '.join(NAME + '/' + c for c in configs)}")
        builder = MoejaxTasks(data_dir=data_dir, config=config or None)
        if not _is_prepared(builder):
            _build_embedded(builder)
        return builder
    missing = UserError(f"TFDS dataset {name!r} is not in the data dir {data_dir} (moejax never "
                        "downloads datasets: prepare it there first, in array_record format)")
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise missing from None
    except ValueError as e:  # e.g. an unknown config of a known dataset
        raise UserError(f"TFDS dataset {name!r} in {data_dir}: {str(e).splitlines()[0]}") from None
    if not _is_prepared(builder):  # a dataset TFDS has code for, but not built here
        raise missing
    return builder


def tfds_source(name: str, split: str, data_dir: str | None = None) -> Source:
    """Open `split` of the TFDS dataset `name` ("NAME" or "NAME/CONFIG") in `data_dir` as Examples.

    `moejax_tasks` is built there first if missing (measured on an idle 2-core CPU: 2.1-2.5 s for
    the default config, 0.3 s for `moejax_tasks/tiny`; 4.2 s with 50,000 train examples, hence
    20,000). Any other dataset must already be prepared there in ArrayRecord format: moejax never
    downloads one."""
    data_dir = data_dir or default_data_dir()
    builder = _open_builder(name, data_dir)
    try:
        records = builder.as_data_source(split=split)
    except NotImplementedError:
        raise UserError(f"TFDS dataset {name!r} in {data_dir} is stored as {builder.info.file_format}; "
                        "random access needs array_record: rebuild it with "
                        "--file_format=array_record") from None
    except (KeyError, ValueError):
        raise UserError(f"TFDS dataset {name!r} has no split {split!r}; available: "
                        f"{', '.join(builder.info.splits)}") from None
    return Source(records, _record_converter(name, list(builder.info.features.keys())))
