"""Make the lm-eval fixtures: a tiny Mixtral with its own tokenizer, scored by lm-eval's `hf` backend.

Run with the torch + transformers + lm-eval venv, from the repository root:
    /work/hfvenv/bin/python tests/make_lm_eval_fixtures.py
Writes tests/fixtures/lm_eval/tiny_mixtral/ (config.json, model.safetensors, tokenizer files) and
tests/fixtures/lm_eval/expected.json: the accuracy and every per-choice log-likelihood that lm-eval's
hf backend computes on the local task moejax_tiny_mc (tests/fixtures/lm_eval/moejax_tiny_mc.yaml).
tests/test_lm_eval.py imports the checkpoint into moejax and compares.
"""
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

HERE = os.path.join("tests", "fixtures", "lm_eval")
OUT = os.path.join(HERE, "tiny_mixtral")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the task text (so words become a few tokens), with a chat template."""
    rows = [json.loads(line) for line in open(os.path.join(HERE, "tiny_mc.jsonl"))]
    text = [f"Question: {r['question']}\nAnswer: " + " ".join(r["choices"]) for r in rows]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    return tok


def main() -> None:
    torch.manual_seed(0)
    tok = build_tokenizer()
    vocab = -(-len(tok) // 64) * 64
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg).eval()
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    tok.save_pretrained(OUT)

    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={OUT},dtype=float32",
                                  tasks=["moejax_tiny_mc"], task_manager=TaskManager(include_path=HERE),
                                  batch_size=1, device="cpu", log_samples=True)
    samples = res["samples"]["moejax_tiny_mc"]
    expected = {
        "acc": res["results"]["moejax_tiny_mc"]["acc,none"],
        "loglikelihoods": [[float(r[0][0]) for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])],
    }
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print(expected)
    rolling_and_generation()


ROLLING_TEXTS = ["The quick brown fox jumps over the lazy dog.",
                 "Question: What is 2 + 3?\nAnswer: 5",
                 " ".join(f"word{i} and {i * 7} more" for i in range(60))]  # > 128 tokens: several windows
GEN_CONTEXTS = ["Question: What is 2 + 3?\nAnswer:", "The capital of France is"]


def rolling_and_generation() -> None:
    """tests/fixtures/lm_eval/expected_rolling.json: lm-eval hf backend's loglikelihood_rolling (max
    length 128, so the long text is scored in rolling windows) and greedy generate_until."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=OUT, dtype="float32", device="cpu", batch_size=1, max_length=128)
    rolling = hf.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                        for i, t in enumerate(ROLLING_TEXTS)])
    gens = hf.generate_until([Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 6,
                                                                   "do_sample": False}), i)
                              for i, c in enumerate(GEN_CONTEXTS)])
    out = {"texts": ROLLING_TEXTS, "rolling": [float(x) for x in rolling], "contexts": GEN_CONTEXTS,
           "generations": gens}
    with open(os.path.join(HERE, "expected_rolling.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(out)


# ChatML that refuses a system turn: lm-eval's hf backend then retries without it.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                 "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = [([{"role": "user", "content": "What is 2 + 3?"}], True),
         ([{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "The answer is "}],
          False),
         ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True)]


def chat_renders() -> None:
    """tests/fixtures/lm_eval/expected_chat.json: the hf backend's apply_chat_template (generation
    prompt; continuing a final assistant prefix; the system-turn retry) with CHAT_TEMPLATE."""
    import shutil
    import tempfile

    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "m")
        shutil.copytree(OUT, d)
        with open(os.path.join(d, "chat_template.jinja"), "w") as f:
            f.write(CHAT_TEMPLATE)
        hf = HFLM(pretrained=d, dtype="float32", device="cpu", batch_size=1, max_length=128)
        renders = [hf.apply_chat_template(chat, add_generation_prompt=gen) for chat, gen in CHATS]
    out = {"chat_template": CHAT_TEMPLATE, "chats": [[c, g] for c, g in CHATS], "renders": renders}
    with open(os.path.join(HERE, "expected_chat.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(out)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--rolling-only"]:
        rolling_and_generation()
    elif sys.argv[1:] == ["--chat-only"]:
        chat_renders()
    else:
        main()
        chat_renders()
