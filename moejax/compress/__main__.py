"""`python -m moejax.compress COMMAND ...`: a smaller MoE run directory from a trained one.

  prune RUN OUT --keep K[,K2,...] --method usage|reconstruction|random [--data SPEC ...] [--tokens N] [--seed S]
  merge RUN OUT --experts K[,K2,...] --method mcsmoe|average [--data SPEC ...] [--tokens N]
  extract RUN OUT --domain D --keep K[,K2,...] [--data SPEC ...] [--tokens N]

Calibration data (`--data`, as `python -m moejax.analyze --data` takes it) defaults to the run's
own validation split. OUT trains (`python -m moejax.train --config OUT/config.yaml` fine-tunes it),
evaluates, generates, analyses and exports like any run; OUT/compress.json records what was kept.
See docs/compression.md.
"""
from __future__ import annotations

import argparse
import os

from moejax.errors import run_cli


def _common(p: argparse.ArgumentParser) -> None:
    from moejax.compress.common import DEFAULT_TOKENS

    p.add_argument("run", help="moejax run directory of the MoE model")
    p.add_argument("out", help="the run directory to create")
    p.add_argument("--data", action="append", metavar="SPEC",
                   help="calibration data (repeatable; default: the run's validation split)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens in all")


def _calibrate(args, cfg, model, tok):
    from moejax.compress import common
    from moejax.errors import UserError

    if args.tokens < 1:
        raise UserError(f"--tokens {args.tokens} must be >= 1")
    seqs, dom, names = common.calibration_sequences(cfg, tok, args.data, args.tokens)
    if not seqs:
        raise UserError("no calibration examples were read")
    return seqs, dom, names, common.routing_tally(model, seqs, dom, names, cfg.data.seq_len)


def run_prune(args) -> int:
    from moejax.compress import common, prune
    from moejax.runs import restore_model

    cfg, model, tok = restore_model(args.run)
    ks = common.keep_counts(args.keep, cfg)
    if args.method not in prune.SELECTORS:
        from moejax.errors import UserError
        raise UserError(f"--method {args.method!r} is not allowed; allowed: {', '.join(prune.SELECTORS.names())}")
    params = common.numpy_params(model)
    kw = dict(ks=ks, num_experts=common.experts_per_layer(cfg), seed=args.seed, cfg=cfg, params=params)
    if args.method in ("usage", "reconstruction"):
        seqs, dom, names, tally = _calibrate(args, cfg, model, tok)
        kw["usage"] = common.routed_weight(tally)
        if args.method == "reconstruction":
            kw["io"] = common.moe_io(model, *common.batch_sequences(seqs, cfg.data.seq_len))
    keep = prune.SELECTORS.get(args.method)(**kw)
    new_cfg, new_params = prune.prune(cfg, params, keep)
    common.write_run(new_cfg, new_params, args.out, args.run,
                     {"command": "prune", "method": args.method, "kept_experts": keep,
                      "params_before": common.param_count(params), "params_after": common.param_count(new_params)})
    print(f"{args.run} -> {args.out}: kept experts per MoE layer {keep} ({args.method})")
    return 0


def run_merge(args) -> int:
    from moejax.compress import common, merge
    from moejax.runs import restore_model

    cfg, model, tok = restore_model(args.run)
    ks = common.keep_counts(args.experts, cfg, "--experts")
    params = common.numpy_params(model)
    *_, tally = _calibrate(args, cfg, model, tok)
    new_params, maps = merge.merge(cfg, params, common.usage(tally), ks, args.method)
    common.write_run(cfg, new_params, args.out, args.run,
                     {"command": "merge", "method": args.method, "expert_groups": maps,
                      "params_before": common.param_count(params),
                      "distinct_params_after": merge.distinct_params(cfg, new_params, maps)})
    print(f"{args.run} -> {args.out}: experts merged into groups {[g.tolist() for g in maps]} "
          f"({args.method}; the router keeps its outputs, each slot holds its group's merged expert)")
    return 0


def run_extract(args) -> int:
    from moejax.compress import common, extract, prune
    from moejax.runs import restore_model

    cfg, model, tok = restore_model(args.run)
    ks = common.keep_counts(args.keep, cfg)
    *_, tally = _calibrate(args, cfg, model, tok)
    keep = extract.domain_experts(tally, args.domain, ks)
    params = common.numpy_params(model)
    new_cfg, new_params = prune.prune(cfg, params, keep)
    common.write_run(new_cfg, new_params, args.out, args.run,
                     {"command": "extract", "domain": args.domain, "kept_experts": keep,
                      "params_before": common.param_count(params),
                      "params_after": common.param_count(new_params)})
    print(f"{args.run} -> {args.out}: {args.domain!r} sub-network, kept experts per MoE layer {keep}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from moejax.compress.prune import SELECTORS
    from moejax.compress.merge import METHODS

    p = argparse.ArgumentParser(prog="python -m moejax.compress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    a = sub.add_parser("prune", help="drop experts (usage, NAEE reconstruction or random)")
    _common(a)
    a.add_argument("--keep", required=True, help="experts kept per MoE layer: K, or K1,K2,... per layer")
    a.add_argument("--method", required=True, choices=SELECTORS.names())
    a.add_argument("--seed", type=int, default=0, help="seed of --method random")
    a.set_defaults(fn=run_prune)
    m = sub.add_parser("merge", help="MC-SMoE: merge experts into K groups")
    _common(m)
    m.add_argument("--experts", required=True, help="merged experts per MoE layer: K or K1,K2,...")
    m.add_argument("--method", default="mcsmoe", choices=list(METHODS))
    m.set_defaults(fn=run_merge)
    e = sub.add_parser("extract", help="the sub-network of experts that serve one domain")
    _common(e)
    e.add_argument("--domain", required=True, help="a domain of the calibration data")
    e.add_argument("--keep", required=True, help="experts kept per MoE layer: K or K1,K2,...")
    e.set_defaults(fn=run_extract)
    args = p.parse_args(argv)
    return args.fn(args) or 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run_cli(main)
