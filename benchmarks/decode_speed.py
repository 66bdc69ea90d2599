"""Prefill and decode tokens/s with the KV cache, and no-cache decode tokens/s, on a run's model.

    python benchmarks/decode_speed.py RUN [--prompts 16] [--prompt-len 32] [--new 256]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.decode import bucket, generate, prefill
from moejax.runs import load_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new", type=int, default=256)
    a = p.parse_args()
    _, model = load_model(a.workdir)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, model.cfg.vocab_size, a.prompt_len).tolist() for _ in range(a.prompts)]
    graphdef, params = nnx.split(model)
    buf = jnp.asarray(np.asarray(prompts, np.int32))
    lengths = jnp.full((a.prompts,), a.prompt_len, jnp.int32)
    run = lambda: jax.block_until_ready(prefill(graphdef, params, buf, lengths,
                                                cache_len=bucket(a.prompt_len + a.new)))
    run()
    t = time.perf_counter(); run(); t_prefill = time.perf_counter() - t
    for cache in (True, False):
        kw = dict(max_new=a.new, min_new=a.new, stop_ids=[], kv_cache=cache)
        generate(model, prompts, **kw)  # compile
        t = time.perf_counter(); generate(model, prompts, **kw); dt = time.perf_counter() - t
        print(f"{'kv cache' if cache else 'no cache'}: {a.prompts * a.new / dt:.0f} generated tokens/s "
              f"({dt:.2f} s for {a.prompts} x {a.new})")
    print(f"prefill: {a.prompts * a.prompt_len / t_prefill:.0f} prompt tokens/s ({t_prefill * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
