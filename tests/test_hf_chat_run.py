"""A Hugging Face Llama checkpoint saved with its own tokenizer and chat template (made by
tests/make_tokenizer_fixtures.py): import-hf with no --tokenizer, then `moejax.generate --json` gives
transformers' greedy chat token ids; export-hf writes tokenizer files that read back the same."""
import json
import os

import pytest

from moejax import convert, generate
from moejax import tokenizer as tokenizer_lib
from moejax.errors import UserError
from moejax.runs import load_tokenizer, load_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers")
CKPT = os.path.join(FIXTURES, "tiny_llama_chat")
with open(os.path.join(CKPT, "expected_generate.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)["answers"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatrun")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(20)))
    sets = [f"data.source=jsonl:{data}", "data.seq_len=32", "data.eval_questions=0", "train.batch_size=2"]
    workdir = root / "run"
    assert convert.main(["import-hf", CKPT, str(workdir)] + [a for s in sets for a in ("--set", s)]) == 0
    return workdir


def test_import_points_data_tokenizer_at_the_copied_files(run):
    cfg = load_config(str(run))
    assert cfg.data.tokenizer == str(run / "tokenizer")
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(run / "tokenizer"))
    tok = load_tokenizer(cfg, str(run))
    for e in EXPECTED:
        assert tok.encode_prompt([{"role": "user", "content": e["prompt"]}]) == e["prompt_ids"]


def test_generate_json_equals_transformers_greedy_ids(run, capsys):
    args = ["--workdir", str(run), "--max-new-tokens", "12", "--json"]
    for e in EXPECTED:
        args += ["--prompt", e["prompt"]]
    assert generate.main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [o["prompt"] for o in lines] == [e["prompt"] for e in EXPECTED]
    assert [o["token_ids"] for o in lines] == [e["token_ids"] for e in EXPECTED]
    tok = load_tokenizer(load_config(str(run)), str(run))
    for o in lines:
        assert o["completion"] == tok.decode([t for t in o["token_ids"] if t not in tok.stop_ids])


def test_export_writes_tokenizer_files_that_read_back_the_same(run, tmp_path):
    out = tmp_path / "hf"
    assert convert.main(["export-hf", str(run), str(out)]) == 0
    gen = json.load(open(out / "generation_config.json"))
    src = tokenizer_lib.load(CKPT)
    back = tokenizer_lib.load(str(out))
    assert set(gen["eos_token_id"]) == set(src.stop_ids) and len(gen["eos_token_id"]) >= 2
    assert json.load(open(out / "tokenizer_config.json"))["chat_template"] == src.chat_template
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2 <|eot_id|> ?"},
            {"role": "assistant", "content": "4"}]
    text = src.apply_chat_template(msgs)
    assert back.apply_chat_template(msgs) == text
    assert raw.encode(text, add_special_tokens=False).ids == back.encode(text) == src.encode(text)
    assert back.encode_chat(msgs) == src.encode_chat(msgs)


def test_tokenizer_ids_beyond_the_embedding_are_refused(tmp_path):
    """The 320-token Llama fixture with the 528-token chat tokenizer next to it: refused, nothing written."""
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama"), ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(os.path.join(CKPT, name), ckpt / name)
    with pytest.raises(UserError, match="has ids up to 527 but model.vocab_size is 320: every token id "
                                        "needs an embedding row"):
        convert.main(["import-hf", str(ckpt), str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
