"""Build tokenizer fixture directories and record transformers' outputs on them (run with a Python
that has transformers, e.g. /work/hfvenv/bin/python tests/make_tokenizer_fixtures.py).

Writes tests/fixtures/tokenizers/<name>/ (tokenizer.json or tokenizer.model, tokenizer_config.json,
chat templates) and tests/fixtures/tokenizers/expected.json: for every directory, transformers'
AutoTokenizer ids (with and without special tokens) and decodes of a set of hard texts, rendered chats,
generation prompts and their ids, the trained-token masks and the refusals. tests/test_hf_tokenizer.py
compares moejax.tokenizer.load against them; nothing here is imported by the tests.

Masks: with {% generation %} blocks, transformers' return_assistant_tokens_mask. For stock templates,
the rule moejax documents, computed here from transformers' renderings and offsets: each assistant
turn is the text between rendering messages[:i] with the generation prompt and rendering
messages[:i+1]; its content and the end-of-turn marker are trained (not the role header, not what
follows the marker), and a token is trained when it holds a character of that span.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from datetime import datetime

import sentencepiece as spm
import transformers
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures", "tokenizers")

# ------------------------------------------------------------------------------------------------
# Chat templates (exact texts of the models' tokenizer_config.json).

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
          "<|end_header_id|>\n\n' }}{% endif %}")
# meta-llama/Llama-3.2-3B-Instruct (the Llama-3.1 family's tool-aware template with the date line)
LLAMA32 = open(os.path.join(HERE, "fixtures", "tokenizers", "llama32.jinja"), encoding="utf-8").read() \
    if os.path.exists(os.path.join(OUT, "llama32.jinja")) else None
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
MIXTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN25 = open(os.path.join(OUT, "qwen25.jinja"), encoding="utf-8").read() if os.path.exists(os.path.join(OUT, "qwen25.jinja")) else None
# ChatML with {% generation %} blocks (as in transformers' tests of return_assistant_tokens_mask).
GENERATION = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
              "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Renders earlier assistant turns shortened (as reasoning templates drop earlier thoughts): a prefix
# rendering is not a prefix of the whole conversation.
REWRITE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
           "{% if message['role'] == 'assistant' and not loop.last %}{{ message['content'][:3] }}"
           "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

BYTE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
SP_SPECIALS = ["<start_of_turn>", "<end_of_turn>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 1234567890 is a number; 3.14159 is pi.",
    "Hello, world! How are you today? I'm fine, thanks — and you?",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Unicode: café, naïve, Zürich, Ελληνικά, русский, 日本語のテキスト, 中文文本, 한국어, emoji 🙂🚀.",
    "Whitespace   runs\t\ttabs\n\n\nnewlines    and trailing spaces   ",
    "Assistant answers questions. User asks questions. The answer is 42.",
] * 40

TEXTS = [
    "Hello world", " Hello world", "  two leading spaces", "trailing spaces   ", "a\tb\t\tc", "line\nbreak\n\n",
    "   ", "\n", "1234567890", "3.14159 + 2.71828 = 5.85987", "x=1;y=22;z=333", "café naïve Zürich",
    "日本語のテキスト and 中文", "emoji 🙂🚀👩‍👩‍👧", "Ελληνικά русский 한국어", "def f(x):\n    return x * 2\n",
    "<|eot_id|>", "text<|eot_id|>more", "<|im_start|>user\nhi<|im_end|>", "<s>", "</s> end", "a<s>b</s>c",
    "<start_of_turn>model\n", "<unk>", "mixed <|begin_of_text|> and <|end_of_text|>", "", "\u00a0nbsp\u2009thin",
    "I'm here, aren't you? Yes . No , maybe !",
]

CHATS = {
    "single": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."},
               {"role": "assistant", "content": "Blue."}],
    "multi": [{"role": "user", "content": "Hi 🙂"}, {"role": "assistant", "content": " Hello!  How can I help?\n"},
              {"role": "user", "content": "Count to 3."}, {"role": "assistant", "content": "1, 2, 3"}],
    "literal": [{"role": "user", "content": "Say <|eot_id|> and </s> literally"},
                {"role": "assistant", "content": "<|im_end|> and <end_of_turn> are markers"}],
    "bad_roles": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                  {"role": "assistant", "content": "c"}],
    "no_assistant": [{"role": "user", "content": "Only a question?"}],
}
PROMPTS = {"single": [{"role": "user", "content": "What is 2 + 2?"}],
           "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]}


def train_bytelevel() -> Tokenizer:
    """GPT-2 / Llama-3 style: ByteLevel pre-tokenizer (regex split), byte-level BPE, no normalizer."""
    tk = Tokenizer(BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=BYTE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    return tk


def train_spm(path_prefix: str) -> str:
    """A Llama-2 style SentencePiece BPE model with byte fallback."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=path_prefix, model_type="bpe", vocab_size=500,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.9995,
        split_digits=True, minloglevel=2, num_threads=1)
    return path_prefix + ".model"


def spm_tokenizer_json(model_path: str) -> Tokenizer:
    """tokenizer.json as shipped with Llama-2 / Mistral (legacy layout): Prepend + Replace normalizer,
    BPE with byte fallback, Replace/ByteFallback/Fuse/Strip decoder, <s> added by the post-processor."""
    sp = spm.SentencePieceProcessor(model_file=model_path)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    from transformers.tokenization_utils_base import generate_merges
    tk = Tokenizer(BPE(vocab=vocab, merges=generate_merges(vocab), unk_token="<unk>", fuse_unk=True,
                       byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    from tokenizers import AddedToken
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    return tk


def write_dir(name, tokenizer_json=None, model_file=None, config=None, jinja=None, generation=None):
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    if tokenizer_json is not None:
        tokenizer_json.save(os.path.join(d, "tokenizer.json"))
    if model_file is not None:
        shutil.copyfile(model_file, os.path.join(d, "tokenizer.model"))
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1, ensure_ascii=False)
    if jinja is not None:
        with open(os.path.join(d, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(jinja)
    if generation is not None:
        with open(os.path.join(d, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation, f)
    return d


def prefix_mask(tok, template, messages, markers):
    """The documented rule, from transformers' renderings and offsets (independent of moejax)."""
    full = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[:i + 1], chat_template=template, tokenize=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            return full, None, "prefix_rewrite"
        turn = upto[len(prompt):]
        ends = [turn.rfind(mk) + len(mk) for mk in markers if mk and turn.rfind(mk) >= 0]
        end = max(ends) if ends else len(turn.rstrip())
        spans.append((len(prompt), len(prompt) + end))
    if not spans:
        return full, None, "no_assistant_turn"
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < e2 and e > s2 for s2, e2 in spans)) for s, e in enc["offset_mapping"]]
    return full, (enc["input_ids"], mask), None


def record(name, d, markers_extra=()):
    tok = AutoTokenizer.from_pretrained(d)
    template = tok.get_chat_template()  # the default of a list of named templates
    out = {"class": type(tok).__name__, "vocab_size": len(tok), "bos_id": tok.bos_token_id,
           "eos_id": tok.eos_token_id, "texts": [], "chats": {}, "prompts": {}}
    for t in TEXTS:
        ids = tok.encode(t, add_special_tokens=False)
        out["texts"].append({"text": t, "ids": ids, "ids_special": tok.encode(t, add_special_tokens=True),
                             "decode": tok.decode(ids, skip_special_tokens=True), "decode_keep": tok.decode(ids, skip_special_tokens=False)})
    markers = [tok.eos_token] + [m for m in ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")
                                 if m in tok.get_vocab()] + list(markers_extra)
    has_gen = "generation %}" in template
    for cname, msgs in CHATS.items():
        entry = {}
        try:
            entry["text"] = tok.apply_chat_template(msgs, tokenize=False)
        except Exception as e:  # jinja2 TemplateError from raise_exception
            entry["error"] = "template_error"
            entry["message"] = str(e)
            out["chats"][cname] = entry
            continue
        if has_gen:
            r = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            entry["ids"], entry["mask"] = list(r["input_ids"]), list(r["assistant_masks"])
            if not any(r["assistant_masks"]):  # all-zero: refused, never trained silently
                entry["error"] = ("no_assistant_turn" if not any(m["role"] == "assistant" for m in msgs)
                                  else "empty_mask")
        else:
            _, got, err = prefix_mask(tok, template, msgs, markers)
            if err:
                entry["error"] = err
            else:
                entry["ids"], entry["mask"] = got
        out["chats"][cname] = entry
    for pname, msgs in PROMPTS.items():
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            out["prompts"][pname] = {"error": "template_error", "message": str(e)}
            continue
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
        out["prompts"][pname] = {"text": text, "ids": list(ids)}
    return out


# The day templates that print today's date (Llama-3.1/3.2: strftime_now) are rendered on, so a
# regeneration reproduces the recorded texts; the tests render on the same day.
RENDER_DATE = datetime(2026, 12, 2)


def freeze_render_date() -> None:
    """transformers' `strftime_now` formats `datetime.now()` of its chat-template module."""
    import transformers.utils.chat_template_utils as ctu

    class _RenderDay(datetime):
        @classmethod
        def now(cls, tz=None):
            return RENDER_DATE

    ctu.datetime = _RenderDay


def main() -> int:
    global LLAMA32, QWEN25
    freeze_render_date()
    os.makedirs(OUT, exist_ok=True)
    LLAMA32 = open(os.path.join(OUT, "llama32.jinja"), encoding="utf-8").read()
    QWEN25 = open(os.path.join(OUT, "qwen25.jinja"), encoding="utf-8").read()
    random.seed(0)
    byte = train_bytelevel()
    work = os.path.join(OUT, "_work")
    os.makedirs(work, exist_ok=True)
    model = train_spm(os.path.join(work, "sp"))
    sptk = spm_tokenizer_json(model)
    from tokenizers import AddedToken
    sptk_gemma = Tokenizer.from_str(sptk.to_str())
    sptk_gemma.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SP_SPECIALS])

    dirs = {
        "llama3": write_dir("llama3", byte, config={
            "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3,
            "clean_up_tokenization_spaces": True, "tokenizer_class": "PreTrainedTokenizerFast"},
            generation={"bos_token_id": byte.token_to_id("<|begin_of_text|>"),
                        "eos_token_id": [byte.token_to_id("<|end_of_text|>"), byte.token_to_id("<|eot_id|>")]}),
        # inline template is a decoy: chat_template.jinja wins
        "llama32": write_dir("llama32", byte, config={
            "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}, "eos_token": "<|eot_id|>",
            "chat_template": CHATML, "clean_up_tokenization_spaces": False,
            "tokenizer_class": "PreTrainedTokenizerFast"}, jinja=LLAMA32),
        "chatml": write_dir("chatml", byte, config={
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML,
            "tokenizer_class": "PreTrainedTokenizerFast"}),
        "qwen25": write_dir("qwen25", byte, config={
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": QWEN25,
            "errors": "replace", "tokenizer_class": "Qwen2Tokenizer", "clean_up_tokenization_spaces": False}),
        "generation": write_dir("generation", byte, config={
            "eos_token": "<|im_end|>", "chat_template": GENERATION, "tokenizer_class": "PreTrainedTokenizerFast"}),
        "rewrite": write_dir("rewrite", byte, config={
            "eos_token": "<|im_end|>", "chat_template": REWRITE, "tokenizer_class": "PreTrainedTokenizerFast"}),
        "mistral": write_dir("mistral", sptk, config={
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": MISTRAL,
            "add_bos_token": True, "add_eos_token": False, "legacy": True,
            "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer"}),
        "mixtral": write_dir("mixtral", sptk, config={
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
            "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
            "unk_token": "<unk>", "chat_template": [{"name": "default", "template": MIXTRAL},
                                                     {"name": "tool_use", "template": CHATML}],
            "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast"}),
        "gemma": write_dir("gemma", sptk_gemma, config={
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": GEMMA,
            "clean_up_tokenization_spaces": False, "tokenizer_class": "GemmaTokenizer"}),
        "spm_bare": write_dir("spm_bare", model_file=model, config={
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": MIXTRAL,
            "add_bos_token": True, "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer"}),
    }
    shutil.rmtree(work)
    expected = {"versions": {"transformers": transformers.__version__, "tokenizers": __import__("tokenizers").__version__},
                "render_date": RENDER_DATE.date().isoformat(), "chats": CHATS, "prompts": PROMPTS, "dirs": {}}
    for name, d in dirs.items():
        expected["dirs"][name] = record(name, d)
        # How far transformers is from the raw tokenizers library on this directory (for the docs).
        if os.path.exists(os.path.join(d, "tokenizer.json")):
            raw = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
            diff = sum(raw.encode(t["text"], add_special_tokens=False).ids != t["ids"]
                       for t in expected["dirs"][name]["texts"])
            print(f"{name}: {expected['dirs'][name]['class']}, raw tokenizers differs on {diff} texts")
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
    tiny_llama(dirs["llama3"])
    return 0


CHAT_PROMPTS = ["What is 2 + 2?", "Name a color."]


def tiny_llama(tokenizer_dir: str) -> None:
    """A tiny random Llama checkpoint saved with the llama3 fixture tokenizer and its chat template,
    and transformers' greedy chat answers (new token ids, stopping at eos / <|eot_id|>)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    d = os.path.join(OUT, "tiny_llama_chat")
    shutil.rmtree(d, ignore_errors=True)
    torch.manual_seed(0)
    eos = [tok.convert_tokens_to_ids("<|end_of_text|>"), tok.convert_tokens_to_ids("<|eot_id|>")]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=eos, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # spread logits: greedy choices far from ties
    model.save_pretrained(d)
    tok.save_pretrained(d)
    model.generation_config.eos_token_id = eos
    answers = []
    for prompt in CHAT_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        answers.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "token_ids": out[0, ids.shape[1]:].tolist()})
    with open(os.path.join(d, "expected_generate.json"), "w", encoding="utf-8") as f:
        json.dump({"transformers": transformers.__version__, "answers": answers}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
