"""Make the Hugging Face fixtures of tests/test_hf.py, and check moejax's exports in transformers.

Needs a Python with torch + transformers + safetensors + numpy (not moejax's runtime), e.g.

    python3 -m venv /work/fixture-venv
    /work/fixture-venv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /work/fixture-venv/bin/python tests/make_hf_fixtures.py --moejax-python /work/venv/bin/python

For each family it builds a tiny random transformers model (weights, norm scales, biases and the
DeepSeek-V3 selection bias all drawn with a large enough spread that logits and routing are far from
flat), saves it with `save_pretrained` under tests/fixtures/hf/<family>/ (Mixtral sharded, with an
index), with fixed input ids and transformers' float32 logits (`input_ids.npy`, `logits.npy`).
Then, through `--moejax-python` (a Python where moejax is installed), it loads every fixture with
`moejax.interop.hf.from_pretrained`, compares moejax's logits (dense and dropless dispatch), writes
the model back with `to_pretrained`, loads that directory in transformers and compares its logits
too. It prints one line per family and writes tests/fixtures/hf/versions.json.
`--check-only` skips making the fixtures and runs the checks on the committed ones.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "hf")
REPO = os.path.dirname(HERE)
BATCH, SEQ, SEED = 2, 16, 0

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-5)
# Tiny configs, each exercising its family's options: rope scalings, tied embeddings, a head_dim
# that is not d / H, a sliding window shorter than the inputs, shared experts, dense layers between
# MoE layers, q/k norms, MLA with a query bottleneck, group-limited routing with a selection bias.
CONFIGS = {
    # vocab 320: room for a moejax SentencePiece tokenizer in tests/test_convert_hf.py
    "llama": dict(model_type="llama", vocab_size=320, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=64)),
    "mistral": dict(model_type="mistral", head_dim=24, sliding_window=5,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, decoder_sparse_step=2, norm_topk_prob=False,
                      qkv_bias=True),
    "olmoe": dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, intermediate_size=32,
                  norm_topk_prob=False, eos_token_id=2),
    "deepseek_v3": dict(model_type="deepseek_v3", num_key_value_heads=4,
                        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                        n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, intermediate_size=64,
                        max_position_embeddings=64,
                        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                             original_max_position_embeddings=16, beta_fast=32,
                                             beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
}
SHARD = {"mixtral": "150KB"}  # saved sharded, to test the index format transformers writes
STD = 0.15


# ----------------------------------------------------------------------------------------------
# transformers side (this file's Python).


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def _randomize(model, seed: int) -> None:
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(STD * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def make(family: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**COMMON, **CONFIGS[family]}
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    _randomize(model, SEED)
    out = os.path.join(FIXTURES, family)
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        os.remove(os.path.join(out, f))
    model.save_pretrained(out, max_shard_size=SHARD.get(family, "50MB"))
    gen = os.path.join(out, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    ids = np.random.default_rng(SEED).integers(0, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
    np.save(os.path.join(out, "input_ids.npy"), ids)
    np.save(os.path.join(out, "logits.npy"), _hf_logits(model, ids))


def hf_check(exported: str, family: str) -> float:
    """Max |logits| difference of transformers on a moejax-exported directory vs the fixture's."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager", dtype="float32")
    model.eval()
    ids = np.load(os.path.join(FIXTURES, family, "input_ids.npy"))
    ref = np.load(os.path.join(FIXTURES, family, "logits.npy"))
    return float(np.max(np.abs(_hf_logits(model, ids) - ref)))


# ----------------------------------------------------------------------------------------------
# moejax side (run with --moejax-side OUT under a Python that has moejax).


def moejax_side(out: str) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from moejax.interop.hf import from_pretrained, to_pretrained

    results = {}
    for family in CONFIGS:
        src = os.path.join(FIXTURES, family)
        ids = np.load(os.path.join(src, "input_ids.npy"))
        ref = np.load(os.path.join(src, "logits.npy"))
        diffs = {}
        for dispatch in ("dense", "dropless"):
            model, cfg = from_pretrained(src, [f"model.moe.dispatch={dispatch}"])
            logits, _ = jax.jit(lambda m, t: m(t))(model, ids)
            diffs[dispatch] = float(np.max(np.abs(np.asarray(logits) - ref)))
        results[family] = {"moejax": diffs,
                           "model_type": to_pretrained(model, cfg, os.path.join(out, family),
                                                       max_shard_size="100KB")}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moejax-python", default=os.path.join(os.path.dirname(sys.executable), "python"),
                   help="a Python with moejax installed (for the checks)")
    p.add_argument("--check-only", action="store_true", help="keep the fixtures, only run the checks")
    p.add_argument("--moejax-side", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.moejax_side:
        moejax_side(args.moejax_side)
        return

    import safetensors
    import torch
    import transformers
    if not args.check_only:
        for family in CONFIGS:
            make(family)
        with open(os.path.join(FIXTURES, "versions.json"), "w") as f:
            json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                       "safetensors": safetensors.__version__, "batch": BATCH, "seq": SEQ, "seed": SEED},
                      f, indent=2)
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([args.moejax_python, os.path.abspath(__file__), "--moejax-side", out], check=True,
                       cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
        print(f"transformers {transformers.__version__}, torch {torch.__version__}; max |logits - "
              "transformers' fixture logits| (float32):")
        print(f"{'family':<12} {'moejax dense':>13} {'moejax dropless':>16} {'HF on moejax export':>20}")
        for family, r in results.items():
            exported = hf_check(os.path.join(out, family), family)
            print(f"{family:<12} {r['moejax']['dense']:>13.2e} {r['moejax']['dropless']:>16.2e} "
                  f"{exported:>20.2e}   (exported as {r['model_type']})")


if __name__ == "__main__":
    main()
