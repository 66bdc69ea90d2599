"""Train Hugging Face `transformers` Mixtral (PyTorch, CPU, AdamW) on random tokens and time the steps.

The peer of `python -m moejax.bench`: the same shapes, the same synthetic batches, the same timing
(compile/warm-up steps first, then the median of N timed optimizer steps). Runs in its own virtual
environment (benchmarks/requirements-peer.txt); benchmarks/peer_compare.py drives both.

    /work/peer-venv/bin/python benchmarks/peer_transformers.py --steps 10 --json

With --json the last stdout line is one JSON object (tokens_per_sec, step_time_s, ...).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--experts-impl", default=None,
                   help="transformers experts_implementation (eager, batched_mm, grouped_mm; "
                        "default: transformers' own choice)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--parts", action="store_true",
                   help="instead: time one layer's attention and MoE block and the head + loss, each forward "
                        "+ backward on its own (median of --steps), as benchmarks/step_profile.py does for moejax")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=a.vocab, hidden_size=a.d_model, intermediate_size=a.d_expert,
                        num_hidden_layers=a.layers, num_attention_heads=a.heads,
                        num_key_value_heads=a.kv_heads, num_local_experts=a.experts,
                        num_experts_per_tok=a.top_k, max_position_embeddings=a.seq,
                        output_router_logits=True, router_aux_loss_coef=0.01, use_cache=False,
                        tie_word_embeddings=False, torch_dtype=torch.float32)
    model = MixtralForCausalLM(cfg).float().train()
    if a.experts_impl:
        model.set_experts_implementation(a.experts_impl)
    experts_impl = getattr(model.config, "_experts_implementation", None)
    n_params = sum(x.numel() for x in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(1, a.vocab, (a.batch, a.seq), generator=gen) for _ in range(4)]

    def step(tokens):
        out = model(input_ids=tokens, labels=tokens)  # the model shifts labels itself
        out.loss.backward()  # loss includes router_aux_loss_coef * aux loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    if a.parts:
        time_parts(model, a)
        return
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {n_params / 1e6:.2f}M parameters; experts "
          f"{experts_impl}, attention {model.config._attn_implementation}", flush=True)
    for i in range(a.warmup):
        step(batches[i % len(batches)])
    times, cpu = [], []
    for i in range(a.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        loss = step(batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        print(f"step {i + 1}/{a.steps}: {times[-1] * 1e3:.0f} ms, loss {loss:.4f}", flush=True)
    med = statistics.median(times)
    tokens = a.batch * a.seq
    res = {"framework": "transformers", "version": __import__("transformers").__version__,
           "torch": torch.__version__, "experts_impl": experts_impl,
           "attn_impl": model.config._attn_implementation, "threads": torch.get_num_threads(), "params": n_params,
           "step_time_s": med, "step_time_min_s": min(times), "step_time_max_s": max(times),
           "step_cpu_time_s": statistics.median(cpu),
           "tokens_per_sec": tokens / med, "steps": a.steps}
    print(f"median step {med * 1e3:.0f} ms (min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}): "
          f"{res['tokens_per_sec']:,.0f} tokens/s", flush=True)
    if a.json:
        print(json.dumps(res), flush=True)


def time_parts(model, a) -> None:
    def median_ms(f):
        f()
        f()
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    layer = model.model.layers[0]
    x = torch.randn(a.batch, a.seq, a.d_model, requires_grad=True)
    pe = model.model.rotary_emb(x, torch.arange(a.seq)[None].expand(a.batch, -1))
    labels = torch.randint(0, a.vocab, (a.batch, a.seq))

    def attention():
        layer.self_attn(layer.input_layernorm(x), position_embeddings=pe, attention_mask=None)[0].sum().backward()

    def moe():
        y = layer.mlp(layer.post_attention_layernorm(x))
        (y[0] if isinstance(y, tuple) else y).sum().backward()

    def head():
        logits = model.lm_head(model.model.norm(x))
        torch.nn.functional.cross_entropy(logits.view(-1, a.vocab), labels.view(-1)).backward()

    ms = {"attention": a.layers * median_ms(attention), "moe": a.layers * median_ms(moe), "head_ce": median_ms(head)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (per-layer parts x {a.layers} layers)")
    for k, v in ms.items():
        print(f"{k:<10}{v:9.1f} ms")


if __name__ == "__main__":
    main()
