"""Tests of the SentencePiece tokenizer, its chat template and loss masks, and the training CLI."""
import json
import os
import random

import pytest

import moejax.data
from moejax import tokenizer as tokenizer_lib
import moejax.tokenizer.__main__ as tokenizer_cli
from moejax.data.example import Example
from moejax.errors import UserError, run_cli
from moejax.tokenizer import Tokenizer, render, train_tokenizer

VOCAB = 400
WORDS = ("the answer is sum of numbers add carry digit first then we write result because "
         "question please compute value total").split()


def corpus(n=300, seed=0) -> list[Example]:
    """Arithmetic chats: numbers everywhere, so without split_digits BPE would merge digits."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        words = " ".join(rng.choices(WORDS, k=8))
        examples.append(Example((("system", "You add numbers."), ("user", f"What is {a} + {b}?"),
                                 ("assistant", f"{words}: {a} + {b} = {a + b}")), "math"))
    return examples


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer((render(e) for e in corpus()), VOCAB, str(path))


CHAT = Example((("system", "Be brief."), ("user", "What is 12 + 30?"), ("assistant", "12 + 30 = 42"),
                ("user", "And 1 + 1?"), ("assistant", "the answer is\n2")))


# ------------------------------------------------------------------------------------- training


def test_vocab_size_within_request(tok):
    assert VOCAB - 50 < tok.vocab_size <= VOCAB  # merges fill the budget on this corpus


def test_small_corpus_with_large_request_gives_fewer_pieces(tmp_path):
    small = train_tokenizer(["tiny corpus", "tiny words"], 5000, str(tmp_path / "t.model"))
    assert small.vocab_size < 5000
    assert small.decode(small.encode("tiny words ok")) == "tiny words ok"


def test_vocab_too_small(tmp_path):
    with pytest.raises(UserError, match="vocab_size = 64 is too small"):
        train_tokenizer(["some text"], 64, str(tmp_path / "t.model"))


def test_many_characters_fall_back_to_bytes(tmp_path):
    # 300 distinct CJK characters can't all be pieces in a 300-piece vocabulary: rare ones go to bytes.
    text = "\n".join(chr(0x4E00 + i) * (i + 1) for i in range(300))
    small = train_tokenizer([text, "abc"], 300, str(tmp_path / "t.model"))
    assert len(small.encode(text[-10:])) < 10 * 3  # the most frequent characters are single pieces
    assert small.vocab_size <= 300
    assert small.decode(small.encode(text[::7])) == text[::7]
    assert 1 not in small.encode(text)  # no <unk>


def test_rare_characters_are_dropped_from_training_but_not_special_tokens():
    from moejax.tokenizer import _keep_frequent_chars

    assert _keep_frequent_chars(["aab<|end|>", "aac", "d"], 1) == ["aa<|end|>", "aa"]
    # The special tokens' own characters are not counted: "|" is not the most frequent character here.
    assert _keep_frequent_chars(["<|end|><|user|>ab", "b"], 1) == ["<|end|><|user|>b", "b"]
    assert _keep_frequent_chars(["ab", "c"], 3) == ["ab", "c"]


def test_written_atomically_and_loadable(tmp_path, tok):
    path = tmp_path / "sub" / "tokenizer.model"
    path.parent.mkdir()
    path.write_bytes(b"old")
    train_tokenizer((render(e) for e in corpus(50)), VOCAB, str(path))
    assert os.listdir(path.parent) == ["tokenizer.model"]  # no temporary file left behind
    loaded = Tokenizer.load(str(path))
    assert loaded.encode("What is 12 + 30?") == Tokenizer.load(str(path)).encode("What is 12 + 30?")
    assert Tokenizer.load(tok.path).encode(render(CHAT)) == tok.encode(render(CHAT))


def test_load_missing_file(tmp_path):
    path = str(tmp_path / "missing.model")
    with pytest.raises(UserError, match=f"tokenizer file '{path}' does not exist"):
        Tokenizer.load(path)


def test_load_corrupt_file(tmp_path):
    path = tmp_path / "bad.model"
    path.write_text("not a model")
    with pytest.raises(UserError, match=f"tokenizer file '{path}' is not a SentencePiece model"):
        Tokenizer.load(str(path))


# ------------------------------------------------------------------------------------- tokens


def test_fixed_ids(tok):
    assert (tok.pad_id, tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.sp.id_to_piece(tok.bos_id) == "<s>" and tok.sp.id_to_piece(tok.eos_id) == "</s>"


def test_special_tokens_are_single_ids(tok):
    ids = {}
    for token in ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]:
        [ids[token]] = tok.encode(token)
        assert tok.encode(f"x{token}y") == [*tok.encode("x"), ids[token], *tok.encode("y")]
    assert ids["<|end|>"] == tok.end_id
    assert len(set(ids.values()) | {0, 1, 2, 3}) == 8


def test_digits_split_one_per_token(tok):
    for text in ["1234567890", "x = 9876 + 5432"]:
        ids = tok.encode(text)
        digit_pieces = [tok.decode([i]) for i in ids if any(c.isdigit() for c in tok.decode([i]))]
        assert digit_pieces == [c for c in text if c.isdigit()]


@pytest.mark.parametrize("text", ["What is 12 + 30?", "  two leading spaces", "tabs\tand\nnew\n\nlines ",
                                  "unseen: ÿ ü 中文 🙂", "def f(x):\n    return x + 1\n", ""])
def test_encode_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_newline_is_always_one_byte_piece(tok):
    # Trained one line at a time, so "\n" never merges with its neighbours.
    newline = tok.sp.piece_to_id("<0x0A>")
    assert tok.encode("\n") == [newline]
    ids = tok.encode(render(CHAT))
    assert ids.count(newline) == render(CHAT).count("\n")


def test_merges_are_learned(tok):
    assert len(tok.encode("the answer is")) < len("the answer is")


# ------------------------------------------------------------------------------------- chat template


def test_render():
    assert render(CHAT) == ("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 12 + 30?<|end|>\n"
                            "<|assistant|>\n12 + 30 = 42<|end|>\n<|user|>\nAnd 1 + 1?<|end|>\n"
                            "<|assistant|>\nthe answer is\n2<|end|>\n")


def masked_runs(ids, mask) -> list[list[int]]:
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


def test_encode_chat_mask_covers_assistant_text_end_and_eos(tok):
    ids, mask = tok.encode_chat(CHAT)
    assert len(ids) == len(mask)
    assert ids[0] == tok.bos_id and not mask[0]
    assert ids[-1] == tok.eos_id and mask[-1]
    runs = masked_runs(ids, mask)
    assert [tok.decode(r) for r in runs[:-1]] == ["12 + 30 = 42<|end|>", "the answer is\n2<|end|>"]
    assert runs[-1] == [tok.eos_id]


def test_encode_chat_is_the_rendered_text(tok):
    ids, _ = tok.encode_chat(CHAT)
    assert tok.decode(ids) == render(CHAT)
    # Tokenizing the parts separately gives the same ids as tokenizing the whole rendering.
    assert ids[1:-1] == tok.encode(render(CHAT))


def test_plain_text_is_all_trained(tok):
    ids, mask = tok.encode_chat(Example((("assistant", "the sum"),)))
    assert [tok.decode(r) for r in masked_runs(ids, mask)] == ["the sum<|end|>", ""]
    assert ids[:3] == [tok.bos_id, tok.encode("<|assistant|>")[0], *tok.encode("\n")]


def test_encode_prompt_is_prefix_of_encode_chat(tok):
    prompt, answer = CHAT.split_answer()
    p = tok.encode_prompt(prompt)
    ids, mask = tok.encode_chat(CHAT)
    assert ids[:len(p)] == p
    assert not mask[len(p) - 1] and mask[len(p)]  # the answer's first token is the first trained
    assert tok.decode(p) == render(prompt) + "<|assistant|>\n"
    assert tok.decode(ids[len(p):]) == answer + "<|end|>\n"


# ------------------------------------------------------------------------------------- CLI


@pytest.fixture
def jsonl_config(tmp_path, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": r, "content": t} for r, t in e.turns]}) + "\n"
                            for e in corpus(200)), encoding="utf-8")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  source: jsonl:{data}\nmodel:\n  vocab_size: {VOCAB}\n"
                   f"train:\n  workdir: {tmp_path / 'run'}\n", encoding="utf-8")
    if not hasattr(moejax.data, "open_source"):  # moejax.data.open_source is not written yet
        from moejax.data.formats import JsonlSource

        def open_source(spec, split, data_cfg):
            assert spec.startswith("jsonl:") and split == "train"
            return JsonlSource(spec[len("jsonl:"):], data_cfg.format, data_cfg.skip_bad_lines)

        monkeypatch.setattr(moejax.data, "open_source", open_source, raising=False)
    return str(cfg), tmp_path


def test_cli_train_default_path(jsonl_config, capsys):
    cfg, tmp_path = jsonl_config
    assert tokenizer_cli.main(["train", "--config", cfg, "--limit", "100"]) == 0
    path = tmp_path / "run" / "tokenizer.model"
    tok = Tokenizer.load(str(path))
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"wrote {path} (vocab_size {tok.vocab_size}, requested {VOCAB})"]
    assert tok.vocab_size <= VOCAB


def test_cli_train_out_and_set(jsonl_config, capsys):
    cfg, tmp_path = jsonl_config
    out = tmp_path / "custom.model"
    tokenizer_cli.main(["train", "--config", cfg, "--set", "model.vocab_size=350", "--out", str(out)])
    assert Tokenizer.load(str(out)).vocab_size <= 350
    assert not (tmp_path / "run" / "tokenizer.model").exists()


def test_cli_error_is_one_line(jsonl_config, capsys):
    cfg, tmp_path = jsonl_config
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: tokenizer_cli.main(["train", "--config", cfg, "--set", f"data.source=jsonl:{missing}"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("text", [render(CHAT), "What is 12 + 30?", "  two leading spaces", "a   b    c",
                                  "tabs\tand\nnew\n\nlines ", "unseen: ÿ ü 中文 🙂", "<|end|>x<|user|>", ""])
def test_export_as_tokenizers_json_gives_the_same_ids(tok, text):
    """export-hf writes moejax's SentencePiece model as a tokenizer.json (what AutoTokenizer reads)."""
    from moejax.tokenizer.export import moejax_to_tokenizers

    tk = moejax_to_tokenizers(tok)
    assert tk.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert tk.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text))


def test_load_and_chat_interface(tok):
    loaded = tokenizer_lib.load(tok.path)
    msgs = [{"role": r, "content": t} for r, t in CHAT.turns]
    assert loaded.encode_chat(msgs) == tok.encode_chat(CHAT)
    assert loaded.apply_chat_template(msgs) == "<s>" + render(CHAT) + "</s>"
    assert loaded.apply_chat_template(msgs[:2], add_generation_prompt=True) == \
        "<s>" + render(Example(CHAT.turns[:2])) + "<|assistant|>\n"
    assert set(loaded.stop_ids) == {tok.end_id, tok.eos_id}
    with pytest.raises(tokenizer_lib.ChatTemplateError) as e:
        loaded.encode_chat([{"role": "user", "content": "x"}])
    assert e.value.reason == "no_assistant_turn"
