"""`python -m moejax.convert mix RUN_A RUN_B ... OUT` and `convert merge-dense RUN_A RUN_B ... OUT`
(registered in moejax.convert's COMMANDS; the math is moejax.compress.mix)."""
from __future__ import annotations

import argparse

from moejax.convert import command


def _args(p: argparse.ArgumentParser, mix: bool) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="dense run directories of one architecture, then OUT")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per model (default: equal)")
    if mix:
        p.add_argument("--top-k", type=int, default=2, help="experts per token (at most the model count)")
        p.add_argument("--router", choices=["mean", "zero"], default="mean",
                       help="router init: each model's mean hidden state on calibration data, or zero")
        p.add_argument("--data", action="append", metavar="SPEC", help="calibration data (default: "
                       "the first run's validation split)")
        p.add_argument("--tokens", type=int, default=4096, help="calibration tokens")


def _load(args):
    from moejax.compress.common import numpy_params
    from moejax.errors import UserError
    from moejax.runs import load_model

    if len(args.runs) < 2:
        raise UserError("give at least one run directory and OUT")
    *runs, out = args.runs
    loaded = [load_model(r) for r in runs]
    return runs, out, [c for c, _ in loaded], [m for _, m in loaded], [numpy_params(m) for _, m in loaded]


@command("merge-dense", "dense run directories -> their weighted mean (Model-GLUE linear merge)",
         lambda p: _args(p, mix=False))
def merge_dense_cmd(args) -> int:
    from moejax.compress import mix
    from moejax.compress.common import write_run

    runs, out, cfgs, _, params = _load(args)
    cfg, merged = mix.merge_dense(cfgs, params, args.weights, runs)
    write_run(cfg, merged, out, runs[0], {"command": "merge-dense", "runs": runs,
                                          "weights": mix.normalise_weights(args.weights, len(runs))})
    print(f"{' + '.join(runs)} -> {out} (linear merge)")
    return 0


@command("mix", "dense run directories -> an MoE whose experts are their FFNs (Branch-Train-MiX)",
         lambda p: _args(p, mix=True))
def mix_cmd(args) -> int:
    from moejax.compress import common, mix
    from moejax.errors import UserError
    from moejax.runs import load_tokenizer

    runs, out, cfgs, models, params = _load(args)
    mix.check_same(cfgs, params, runs)
    if args.top_k < 1:
        raise UserError(f"--top-k {args.top_k} must be >= 1")
    means = None
    if args.router == "mean":
        tok = load_tokenizer(cfgs[0], runs[0])
        seqs, _, _ = common.calibration_sequences(cfgs[0], tok, args.data, args.tokens)
        batch = common.batch_sequences(seqs, cfgs[0].data.seq_len)
        means = [mix.ffn_input_means(m, *batch) for m in models]
    cfg, mixed = mix.mix(cfgs, params, args.weights, top_k=args.top_k, router_means=means, names=runs)
    common.write_run(cfg, mixed, out, runs[0], {"command": "mix", "runs": runs, "router": args.router,
                                                "weights": mix.normalise_weights(args.weights, len(runs))})
    print(f"{' + '.join(runs)} -> {out}: {len(runs)} experts, top-{cfg.model.moe.top_k}")
    return 0
