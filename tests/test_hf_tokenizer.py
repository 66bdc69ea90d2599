"""moejax.tokenizer.load on Hugging Face tokenizer directories against transformers' own outputs,
recorded by tests/make_tokenizer_fixtures.py in tests/fixtures/tokenizers/expected.json: ids (with and
without special tokens), decodes, rendered chats, generation prompts, trained-token masks, refusals."""
import datetime
import json
import os
import shutil

import pytest

from moejax import tokenizer as tokenizer_lib
from moejax.errors import UserError
from moejax.tokenizer import ChatTemplateError
from moejax.tokenizer import chat_template

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers")
with open(os.path.join(FIXTURES, "expected.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)
DIRS = sorted(EXPECTED["dirs"])


@pytest.fixture(autouse=True)
def render_on_the_fixtures_day(monkeypatch):
    """Templates that print today's date (Llama-3.1/3.2) render on the day transformers rendered
    the fixtures (make_tokenizer_fixtures.RENDER_DATE), not on the day the tests run."""
    day = datetime.datetime.fromisoformat(EXPECTED["render_date"])
    monkeypatch.setattr(chat_template, "clock", lambda: day)


def test_strftime_now_formats_the_clock(monkeypatch):
    """The fixtures' day is a test setting: the runtime formats the current time."""
    monkeypatch.undo()
    before = datetime.datetime.now().strftime("%d %b %Y")
    text = tokenizer_lib.load(os.path.join(FIXTURES, "llama32")).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    after = datetime.datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {before}" in text or f"Today Date: {after}" in text


@pytest.fixture(scope="module")
def toks():
    return {name: tokenizer_lib.load(os.path.join(FIXTURES, name)) for name in DIRS}


def test_fixture_set_covers_the_families():
    assert {"llama3", "llama32", "mistral", "mixtral", "gemma", "chatml", "qwen25", "generation",
            "spm_bare"} <= set(DIRS)


@pytest.mark.parametrize("name", DIRS)
def test_ids_and_decode_equal_transformers(toks, name):
    tok, exp = toks[name], EXPECTED["dirs"][name]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (exp["vocab_size"], exp["bos_id"], exp["eos_id"])
    for t in exp["texts"]:
        assert tok.encode(t["text"]) == t["ids"], t["text"]
        assert tok.encode(t["text"], add_special_tokens=True) == t["ids_special"], t["text"]
        assert tok.decode(t["ids"]) == t["decode"], t["text"]
        assert tok.decode(t["ids"], skip_special_tokens=False) == t["decode_keep"], t["text"]


@pytest.mark.parametrize("name", DIRS)
def test_chats_masks_and_refusals_equal_transformers(toks, name):
    tok, exp = toks[name], EXPECTED["dirs"][name]
    for cname, e in exp["chats"].items():
        msgs = EXPECTED["chats"][cname]
        if e.get("error") == "template_error":
            with pytest.raises(ChatTemplateError) as err:
                tok.apply_chat_template(msgs)
            assert err.value.reason == "template_error" and e["message"] in str(err.value)
            continue
        assert tok.apply_chat_template(msgs) == e["text"], cname
        if "error" in e:
            with pytest.raises(ChatTemplateError) as err:
                tok.encode_chat(msgs)
            assert err.value.reason == e["error"], cname
            continue
        ids, mask = tok.encode_chat(msgs)
        assert ids == e["ids"], cname
        assert mask == e["mask"], cname
        assert 0 < sum(mask) < len(mask)


@pytest.mark.parametrize("name", DIRS)
def test_generation_prompts_equal_transformers(toks, name):
    tok, exp = toks[name], EXPECTED["dirs"][name]
    for pname, e in exp["prompts"].items():
        msgs = EXPECTED["prompts"][pname]
        if "error" in e:
            with pytest.raises(ChatTemplateError):
                tok.encode_prompt(msgs)
            continue
        assert tok.apply_chat_template(msgs, add_generation_prompt=True) == e["text"]
        assert tok.encode_prompt(msgs) == e["ids"]


def test_masks_train_content_and_end_marker_only(toks):
    """Independent of the fixtures: on Llama-3, the trained text is the answer plus <|eot_id|>."""
    tok = toks["llama3"]
    ids, mask = tok.encode_chat(EXPECTED["chats"]["multi"])
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == \
        ["Hello!  How can I help?<|eot_id|>", "1, 2, 3<|eot_id|>"]  # the template trims content


def test_stop_ids_include_end_of_turn(toks):
    llama = toks["llama3"]
    assert set(llama.stop_ids) >= {llama.eos_id, llama.tk.token_to_id("<|end_of_text|>")}
    assert toks["chatml"].tk.token_to_id("<|im_end|>") in toks["chatml"].stop_ids


def test_chat_template_jinja_file_wins_and_named_list(toks):
    assert toks["llama32"].chat_template.startswith("{{- bos_token }}\n{%- if custom_tools")
    assert toks["mixtral"].chat_template.startswith("{{ bos_token }}{% for message")


def test_override_template_builtin_and_file(tmp_path):
    tok = tokenizer_lib.load(os.path.join(FIXTURES, "mistral"), chat_template="chatml")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    tok = tokenizer_lib.load(os.path.join(FIXTURES, "mistral"), chat_template=str(path))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x"
    with pytest.raises(UserError, match="neither a file nor a built-in template"):
        tokenizer_lib.load(os.path.join(FIXTURES, "mistral"), chat_template="nope")


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=f"tokenizer directory '{tmp_path}' has no tokenizer.json or "
                                        "tokenizer.model"):
        tokenizer_lib.load(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        tokenizer_lib.load(str(tmp_path / "missing"))


def test_bare_model_file_reads_like_its_directory(toks, tmp_path):
    shutil.copyfile(os.path.join(FIXTURES, "spm_bare", "tokenizer.model"), tmp_path / "tokenizer.model")
    bare = tokenizer_lib.load(str(tmp_path / "tokenizer.model"))
    for t in EXPECTED["dirs"]["spm_bare"]["texts"]:
        assert bare.encode(t["text"]) == t["ids"]


def test_template_syntax_error_is_user_error(toks):
    with pytest.raises(UserError, match="chat template does not parse"):
        toks["chatml"].apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
