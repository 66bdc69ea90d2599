"""Tests of the JSONL record formats, format detection and the indexed JsonlSource."""
import json
import pickle

import pytest

from moejax.data.example import Example
from moejax.data.formats import FORMATS, detect_format
from moejax.data.jsonl import JsonlSource
from moejax.data.pipeline import iter_texts
from moejax.errors import UserError


def write_jsonl(tmp_path, lines, name="data.jsonl"):
    """Write records (dicts are JSON-encoded, strings written as they are) one per line."""
    path = tmp_path / name
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return str(path)


def user_error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        JsonlSource(*args, **kwargs)
    return str(e.value)


SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."},
                              {"from": "human", "value": "2+2?", "weight": None},
                              {"from": "gpt", "value": "4"}]}
MESSAGES = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}],
            "domain": "chat"}
ALPACA = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
TEXT = {"text": "Once upon a time.\nThe end.", "domain": "stories"}


# ------------------------------------------------------------------------------------- parsers


def test_sharegpt():
    assert FORMATS.get("sharegpt")(SHAREGPT) == Example(
        (("system", "Be brief."), ("user", "2+2?"), ("assistant", "4")))


def test_sharegpt_accepts_user_and_assistant_roles():
    record = {"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}],
              "domain": "math"}
    assert FORMATS.get("sharegpt")(record) == Example((("user", "a"), ("assistant", "b")), "math")


def test_messages():
    assert FORMATS.get("messages")(MESSAGES) == Example(
        (("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye.")), "chat")


def test_alpaca_with_input():
    assert FORMATS.get("alpaca")(ALPACA) == Example(
        (("user", "Translate to French.\n\ncat"), ("assistant", "chat")))


@pytest.mark.parametrize("record", [{"instruction": "Say hi.", "output": "hi"},
                                    {"instruction": "Say hi.", "input": "", "output": "hi"}])
def test_alpaca_without_input(record):
    assert FORMATS.get("alpaca")(record) == Example((("user", "Say hi."), ("assistant", "hi")))


def test_text_is_one_assistant_turn():
    assert FORMATS.get("text")(TEXT) == Example(
        (("assistant", "Once upon a time.\nThe end."),), "stories")


@pytest.mark.parametrize("fmt, record, reason", [
    ("sharegpt", {"conversation": []}, "missing key 'conversations'"),
    ("sharegpt", {"conversations": []}, "empty conversation"),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, "'bot' is not allowed"),
    ("sharegpt", {"conversations": [{"from": "human", "value": 3}]}, "must be a string"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, "no assistant turn"),
    ("sharegpt", {"conversations": [{"value": "x"}]}, "missing key 'from'"),
    ("messages", {"messages": [{"role": "tool", "content": "x"}]}, "'tool' is not allowed"),
    ("messages", {"messages": [{"role": "assistant", "content": None}]}, "must be a string"),
    ("messages", {"messages": "hi"}, "must be a list"),
    ("alpaca", {"instruction": "x"}, "missing key 'output'"),
    ("alpaca", {"instruction": "x", "output": ["y"]}, "must be a string"),
    ("text", {"text": ""}, "empty"),
    ("text", {"text": "x", "domain": 3}, "'domain' must be a string"),
])
def test_malformed_records_raise_value_error(fmt, record, reason):
    with pytest.raises(ValueError, match=reason):
        FORMATS.get(fmt)(record)


@pytest.mark.parametrize("record, fmt", [(SHAREGPT, "sharegpt"), (MESSAGES, "messages"),
                                         (ALPACA, "alpaca"), (TEXT, "text")])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_detect_format_unknown_keys():
    with pytest.raises(ValueError, match=r"cannot detect the format from keys \['prompt'\]"):
        detect_format({"prompt": "x"})


# ------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("record", [SHAREGPT, MESSAGES, ALPACA, TEXT])
def test_auto_source_detects_format_from_first_line(tmp_path, record):
    path = write_jsonl(tmp_path, ["", record, record])
    src = JsonlSource(path)
    assert src.format == detect_format(record)
    assert len(src) == 2
    assert src[1] == FORMATS.get(src.format)(record)


def test_explicit_format_rejects_other_formats(tmp_path):
    path = write_jsonl(tmp_path, [MESSAGES, TEXT])
    assert user_error(path, format="messages") == f"{path}:2: missing key 'messages'"


@pytest.mark.parametrize("bad, reason", [
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"text": "x"}', "missing key 'messages'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "'robot' is not allowed"),
    ('{"messages": []}', "empty conversation"),
])
def test_bad_line_names_file_and_line(tmp_path, bad, reason):
    # Line 1 good, 2 blank, 3 good, 4 bad: the blank line still counts.
    path = write_jsonl(tmp_path, [MESSAGES, "", MESSAGES, bad, MESSAGES])
    msg = user_error(path, format="messages")
    assert msg.startswith(f"{path}:4: ")
    assert reason in msg


def test_auto_bad_first_line(tmp_path):
    path = write_jsonl(tmp_path, ["  ", '{"prompt": "x"}', TEXT])
    assert user_error(path).startswith(f"{path}:2: cannot detect the format")


def test_skip_bad_lines_skips_and_counts(tmp_path, capsys):
    path = write_jsonl(tmp_path, ["not json", ALPACA, '{"instruction": 1, "output": "x"}', "",
                                  {"instruction": "a", "output": "b"}, '{"output": "x"}'])
    src = JsonlSource(path, skip_bad_lines=True)
    assert src.format == "alpaca"  # detected past the bad first line
    assert src.skipped == 3
    assert len(src) == 2
    assert src[0] == FORMATS.get("alpaca")(ALPACA)
    assert src[1] == Example((("user", "a"), ("assistant", "b")))
    assert "skipped 3 bad lines" in capsys.readouterr().err


def test_no_warning_without_skipped_lines(tmp_path, capsys):
    JsonlSource(write_jsonl(tmp_path, [TEXT]), skip_bad_lines=True)
    assert capsys.readouterr().err == ""


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    assert user_error(path) == f"data file {path!r} does not exist"


def test_unknown_format(tmp_path):
    msg = user_error(write_jsonl(tmp_path, [TEXT]), format="chatml")
    assert msg == "data.format = 'chatml' is not allowed; allowed: auto, alpaca, messages, sharegpt, text"


def test_empty_file(tmp_path):
    path = write_jsonl(tmp_path, ["", "   "])
    assert "has no examples" in user_error(path)


def test_random_access_with_blank_lines(tmp_path):
    texts = [f"line {i} ü" for i in range(7)]
    lines = []
    for i, t in enumerate(texts):
        lines += [""] * (i % 3) + [json.dumps({"text": t, "domain": f"d{i}"})]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines + ["  \t"]), encoding="utf-8")  # no final newline
    src = JsonlSource(str(path), format="text")
    assert len(src) == 7
    for i in [6, 0, 3, 5, 1, 2, 4, -1]:
        assert src[i] == Example((("assistant", texts[i]),), f"d{i % 7}")
    with pytest.raises(IndexError):
        src[7]


def test_source_pickles(tmp_path):
    src = JsonlSource(write_jsonl(tmp_path, [TEXT, ALPACA, TEXT]), skip_bad_lines=True)
    src[0]  # opens the file handle, which must not travel
    copy = pickle.loads(pickle.dumps(src))
    assert len(copy) == 2 and copy[1] == src[1]


def test_iter_texts_renders_spread_examples():
    examples = [Example((("user", f"q{i}"), ("assistant", f"a{i}"))) for i in range(10)]
    texts = list(iter_texts(examples, limit=5))
    assert texts[1] == "<|user|>\nq2<|end|>\n<|assistant|>\na2<|end|>\n"
    assert [t.split("\n")[1] for t in texts] == ["q0<|end|>", "q2<|end|>", "q4<|end|>", "q6<|end|>",
                                                 "q8<|end|>"]
    assert len(list(iter_texts(examples))) == 10
