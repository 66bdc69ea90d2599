"""Write the notebooks of this directory from the cell sources below, without outputs.

    python notebooks/make_notebooks.py          # (re)write notebooks/*.ipynb
    python notebooks/make_notebooks.py --check  # exit 1 when a notebook differs from this file

The .ipynb files are generated so that a change to a notebook is a reviewable diff of Python here.
Every notebook runs top to bottom on a Colab TPU, GPU or CPU runtime or locally; with
MOEJAX_NOTEBOOK_SMOKE=1 (what tests/test_notebooks.py sets) it runs at tiny sizes in seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
GITHUB = "https://github.com/moejax/moejax"
DOCS = f"{GITHUB}/blob/main/docs"


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/moejax/moejax/blob/main/notebooks/{name}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


# --------------------------------------------------------------------------------------------------
# Cells every notebook shares.

INSTALL = f'''\
# Install moejax unless it is already importable (a fresh Colab runtime). The repository is cloned,
# not only pip-installed, because the notebooks read its configs/.
import importlib.util, os, shutil, subprocess, sys

if importlib.util.find_spec("moejax") is None:
    src = os.path.abspath("moejax")
    if not os.path.isdir(src):
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", "{GITHUB}", src], check=True)
    on_tpu = "COLAB_TPU_ADDR" in os.environ or os.path.exists("/dev/accel0")
    extra = "[tpu]" if on_tpu else "[cuda]" if shutil.which("nvidia-smi") else ""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", src + extra], check=True)
    sys.path.insert(0, src)  # an editable install is seen by new kernels only; this one needs the path
'''

SETUP = '''\
import os
import jax

BACKEND = jax.default_backend()  # "tpu", "gpu" or "cpu": sizes below follow it
SMOKE = os.environ.get("MOEJAX_NOTEBOOK_SMOKE") == "1"  # tests: tiny sizes, seconds


def repo_root() -> str:
    """The directory that holds configs/: the current one, its parent (running from notebooks/),
    or the source tree moejax is installed from (pip install -e)."""
    import moejax
    here = os.getcwd()
    for d in (here, os.path.dirname(here), os.path.dirname(os.path.dirname(moejax.__file__))):
        if os.path.isfile(os.path.join(d, "configs", "quickstart.yaml")):
            return d
    raise FileNotFoundError("configs/quickstart.yaml not found: run this notebook from a clone of "
                            "the moejax repository")


ROOT = repo_root()
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
RUNS = os.environ.get("MOEJAX_NOTEBOOK_RUNS", os.path.join(ROOT, "runs"))  # where runs are written
# Smoke mode: a one-layer model on the small `tiny` variant of the embedded dataset, a few steps.
TINY = ["model.vocab_size=320", "model.d_model=32", "model.n_layers=1", "model.n_heads=4",
        "model.n_kv_heads=2", "model.d_ff=64", "model.moe.num_experts=4", "model.moe.d_expert=32",
        "model.moe.tile_size=32", "data.source=tfds:moejax_tasks/tiny", "data.seq_len=64",
        "data.eval_questions=0", "train.batch_size=4", "train.warmup_steps=2"]
print(f"backend {BACKEND}: {jax.device_count()} x {jax.devices()[0].device_kind}; "
      f"smoke mode: {SMOKE}; configs from {ROOT}")
'''


def code(src: str):
    return new_code_cell(textwrap.dedent(src).strip("\n"))


def md(src: str):
    return new_markdown_cell(textwrap.dedent(src).strip("\n"))


def header(name: str, title: str, intro: str) -> list:
    return [md(f"# {title}\n\n{badge(name)}\n\n{textwrap.dedent(intro).strip()}"), code(INSTALL),
            code(SETUP)]


# --------------------------------------------------------------------------------------------------
# quickstart.ipynb

QUICKSTART_CELLS = header("quickstart", "moejax quickstart: train a small Mixture-of-Experts LM", f"""
    This notebook trains the quickstart MoE of [`configs/quickstart.yaml`]({GITHUB}/blob/main/configs/quickstart.yaml)
    (4 layers, 8 experts per layer, top-2 routing, 3.6M parameters) on moejax's embedded instruction
    dataset (six domains: arithmetic, code, facts, sorting, strings, units; generated locally, no
    download), plots its loss and how the tokens spread over the experts, and asks it questions.

    It detects the runtime: on a CPU it trains 400 steps, on a GPU or TPU 800 steps of 32 sequences.
    Measured on CPU: the whole notebook took 6m17s on a 2-core VM shared with other jobs (load average
    about 5; 2026-11-23); the full 800-step quickstart takes 5m17s on that VM unshared. The same run
    from a shell is `python -m moejax.train --config configs/quickstart.yaml`
    ([getting started]({DOCS}/getting_started.md)).
""") + [
    md("""
        ## Configure

        `moejax.config.load` reads the YAML file and applies `key.path=value` overrides, exactly like
        `--set` on the command line. Every key is listed in the
        [configuration reference](%s/configuration.md).
    """ % DOCS),
    code('''
        from moejax import config

        WORKDIR = os.path.join(RUNS, "notebook_quickstart")
        if SMOKE:
            sizes = TINY + ["train.steps=4", "train.log_every=2"]
        elif BACKEND == "cpu":
            sizes = ["train.steps=400", "train.eval_every=400"]
        else:  # an accelerator: more tokens per step, more steps
            sizes = ["train.steps=800", "train.batch_size=32", "train.eval_every=800"]
        cfg = config.load(QUICKSTART, overrides=[f"train.workdir={WORKDIR}", *sizes])
        m = cfg.model
        print(f"{m.n_layers} layers, d_model {m.d_model}, {m.moe.num_experts} experts of width "
              f"{m.moe.d_expert}, top-{m.moe.top_k} {m.moe.router} router, {m.moe.dispatch} dispatch; "
              f"{cfg.train.steps} steps of {cfg.train.batch_size} x {cfg.data.seq_len} tokens")
    '''),
    md("""
        ## Train

        `moejax.train.train(cfg)` builds the embedded dataset and a SentencePiece tokenizer on first use,
        then trains, logging every `train.log_every` steps and evaluating at the end (validation loss and
        exact-match accuracy of greedy answers per domain). Everything goes to `WORKDIR`: `metrics.jsonl`,
        checkpoints, `config.yaml`, `tokenizer.model`. Running the cell again resumes from the latest
        checkpoint (a finished run returns at once).
    """),
    code('''
        from moejax.train import train

        last = train(cfg)
        print({k: round(v, 4) for k, v in last.items() if k.startswith("eval_")})
    '''),
    md("""
        ## Loss and expert load

        `metrics.jsonl` holds one JSON object per logged step: `loss` (language model), `aux_loss`
        (Switch load-balancing loss, 1.0 = balanced), `z_loss`, `grad_norm`, `tokens_per_sec`, `mfu`,
        and `expert_load`: per MoE layer, the fraction of the routed token slots each expert received.
        The heatmap shows each expert's share against the uniform 1/E: 1.0 (white) is a perfectly
        balanced expert.
    """),
    code('''
        import matplotlib.pyplot as plt
        import numpy as np
        from moejax.metrics import read_metrics

        records = read_metrics(WORKDIR)
        train_recs = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        load = np.array(train_recs[-1]["expert_load"])  # [MoE layers, experts] at the last logged step
        rel = load * load.shape[1]  # 1.0 = the uniform share

        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
        ax0.plot([r["step"] for r in train_recs], [r["loss"] for r in train_recs], label="train loss")
        ax0.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", label="eval loss")
        ax0.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
        ax0.legend()
        span = max(1.0, float(np.abs(rel - 1).max()))
        im = ax1.imshow(rel, cmap="RdBu_r", vmin=1 - span, vmax=1 + span, aspect="auto")
        ax1.set(xlabel="expert", ylabel="MoE layer", xticks=range(load.shape[1]), yticks=range(load.shape[0]),
                title=f"expert load / uniform, step {train_recs[-1]['step']}")
        fig.colorbar(im, ax=ax1)
        plt.tight_layout()
        plt.show()
        print(f"aux loss {train_recs[-1]['aux_loss']:.3f} (1.0 = balanced); busiest expert "
              f"{rel.max():.2f}x the uniform share, least used {rel.min():.2f}x")
    '''),
    md("""
        ## Ask the model

        `restore_model` reads the run's config, latest checkpoint and tokenizer; `moejax.decode.generate`
        continues token prompts greedily. The questions are held-out validation examples, two per
        domain, next to their reference answers. (From a shell:
        `python -m moejax.generate --workdir WORKDIR --prompt "..."`.)
    """),
    code('''
        from moejax.data import open_source
        from moejax.decode import generate
        from moejax.evaluate import held_out_questions
        from moejax.runs import restore_model

        cfg, model, tok = restore_model(WORKDIR)
        questions = held_out_questions(open_source(cfg.data.source, cfg.data.eval_split, cfg.data), 2)
        prompts, answers = zip(*(q.split_answer() for q in questions))
        stops = [tok.end_id, tok.eos_id]
        outs = generate(model, [tok.encode_prompt(p) for p in prompts], max_new=24, stop_ids=stops,
                        pad_id=tok.pad_id)
        for q, p, ref, out in zip(questions, prompts, answers, outs):
            got = tok.decode([t for t in out if t not in stops])
            mark = "ok" if " ".join(got.split()) == " ".join(ref.split()) else "--"
            print(f"[{q.domain}] {p.turns[-1][1]!r}\\n   {mark} model: {got!r}   reference: {ref!r}")
    '''),
    md(f"""
        ## Next

        - [Routing analysis notebook](routing_analysis.ipynb): which experts take which domains and tokens.
        - [Dense to MoE notebook](dense_to_moe.ipynb): upcycle or split a dense model into an MoE.
        - [Training guide]({DOCS}/training.md), [MoE concepts]({DOCS}/concepts.md),
          [TPU VM guide]({DOCS}/tpu.md), [troubleshooting]({DOCS}/troubleshooting.md).
    """),
]


# --------------------------------------------------------------------------------------------------
# dense_to_moe.ipynb

DENSE_CELLS = header("dense_to_moe", "From a dense model to a Mixture-of-Experts", f"""
    Two ways to start an MoE from a trained dense (Llama-style) model instead of from scratch:

    - **Sparse upcycling** (Komatsuzaki et al. 2023): every expert of a layer is a copy of that layer's
      dense FFN and the router starts small and random. With renormalised top-k weights the MoE computes
      exactly the dense function, for any k, until training moves the experts apart.
    - **Splitting** (LLaMA-MoE, Zhu et al. 2024): the FFN's hidden neurons are partitioned into E
      experts of d_ff / E neurons each. Only k = E experts together reproduce the dense FFN; k < E is a
      cheaper, different function that fine-tuning has to repair.

    This notebook trains a tiny dense model, converts it both ways, checks the logits against the
    dense model, fine-tunes each MoE briefly next to the dense model trained for as many more steps,
    and compares the losses. Measured on CPU: 9m45s on a 2-core VM shared with other jobs (load
    average about 5; 2026-11-23). With a Hugging Face Llama/Mistral checkpoint, start from
    `python -m moejax.convert import-hf HF_DIR RUN` instead ([interop]({DOCS}/interop.md),
    [dense-to-MoE guide]({DOCS}/dense_to_moe.md)).
""") + [
    md("""
        ## 1. A dense model

        The quickstart config with `model.moe.num_experts=0` is a dense Llama-style decoder (RMSNorm,
        RoPE, grouped-query attention, SwiGLU FFN of width `model.d_ff`).
    """),
    code('''
        from moejax import config
        from moejax.train import train

        E, K = 4, 2  # experts per layer and experts chosen per token of the converted models
        if SMOKE:
            DENSE_STEPS, FT_STEPS, LOG, sizes = 4, 2, 2, TINY
        elif BACKEND == "cpu":
            DENSE_STEPS, FT_STEPS, LOG, sizes = 200, 100, 10, ["data.eval_questions=16"]
        else:
            DENSE_STEPS, FT_STEPS, LOG, sizes = 600, 300, 20, ["train.batch_size=32", "data.eval_questions=16"]
        DENSE = os.path.join(RUNS, "notebook_dense")
        dense_cfg = config.load(QUICKSTART, overrides=[
            *sizes, "model.moe.num_experts=0", f"train.steps={DENSE_STEPS}", f"train.workdir={DENSE}",
            f"train.log_every={LOG}", f"train.eval_every={DENSE_STEPS}", f"train.save_every={DENSE_STEPS}"])
        print(f"dense: {dense_cfg.model.n_layers} layers, d_model {dense_cfg.model.d_model}, "
              f"FFN width {dense_cfg.model.d_ff}")
        _ = train(dense_cfg)
    '''),
    md("""
        ## 2. Convert: the pure functions

        `moejax.dense_to_moe.upcycle` and `split` take the dense config and parameters (nested dicts of
        arrays, as `nnx.split(model)[1].to_pure_dict()` gives them) and return the MoE config and
        parameters. `moejax.convert.load_run` reads a run directory's latest parameters.
    """),
    code('''
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from moejax import dense_to_moe
        from moejax.convert import load_run
        from moejax.model import Transformer

        dense_model, dense_cfg = load_run(DENSE)
        dense_params = jax.tree.map(np.asarray, nnx.split(dense_model)[1].to_pure_dict())


        def build(cfg, params):
            """A model of `cfg` holding `params` (no random init: the structure comes from eval_shape)."""
            graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
            state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
            return nnx.merge(graphdef, state)


        models = {"dense": (dense_cfg, dense_model)}
        up_cfg, up_params = dense_to_moe.upcycle(dense_cfg, dense_params, num_experts=E, top_k=K)
        models[f"upcycled, top-{K}"] = (up_cfg, build(up_cfg, up_params))
        for k in (E, K):
            c, p = dense_to_moe.split(dense_cfg, dense_params, num_experts=E, top_k=k)
            models[f"split, top-{k}"] = (c, build(c, p))
        for name, (c, _) in models.items():
            moe = c.model.moe
            width = moe.d_expert if moe.num_experts else c.model.d_ff
            print(f"{name:16s} experts {moe.num_experts}, width {width}, top-{moe.top_k}, "
                  f"routed scale {moe.routed_scaling_factor}")
    '''),
    md("""
        ## 3. Check the logits against the dense model

        One packed batch of validation data through every model. Upcycling keeps the dense function for
        any k; splitting keeps it only with k = E (the routed output is scaled by E, and a zero router
        gives every expert weight 1/E); split with k < E is a different model.
    """),
    code('''
        from moejax.data import open_source
        from moejax.data.packing import Packer
        from moejax.tokenizer import Tokenizer

        tok = Tokenizer.load(os.path.join(DENSE, "tokenizer.model"))
        val = open_source(dense_cfg.data.source, dense_cfg.data.eval_split, dense_cfg.data)
        batch = next(Packer(val, tok, dense_cfg.data.seq_len, 4, seed=0))


        @nnx.jit
        def logits_of(model, tokens, segment_ids, positions):
            return model(tokens, segment_ids=segment_ids, positions=positions)[0]


        args = [jnp.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions")]
        want = np.asarray(logits_of(dense_model, *args))
        mask = batch["segment_ids"] > 0  # real tokens, not padding
        for name, (_, model) in models.items():
            diff = np.abs(np.asarray(logits_of(model, *args)) - want)[mask].max()
            print(f"{name:16s} max |logits - dense logits| = {diff:.2e}")
    '''),
    md("""
        ## 4. Fine-tune

        The command-line converter writes each MoE as a new run directory (config, step-0 checkpoint,
        the dense run's tokenizer) that training resumes from: the same as
        `python -m moejax.convert upcycle DENSE_RUN OUT_RUN --experts 4 --top-k 2` in a shell. Each MoE
        then trains `FT_STEPS` steps, and the dense run as many more steps, for a fair comparison.
    """),
    code('''
        from moejax import convert
        from moejax.metrics import read_metrics

        ft = [f"train.steps={FT_STEPS}", f"train.warmup_steps={max(1, FT_STEPS // 10)}", "train.lr=1e-3",
              f"train.eval_every={FT_STEPS}", f"train.save_every={FT_STEPS}"]
        runs = {}
        for kind in ("upcycle", "split"):
            out = os.path.join(RUNS, f"notebook_{kind}")
            if not os.path.exists(os.path.join(out, "config.yaml")):  # converted already: resume it
                convert.main([kind, DENSE, out, "--experts", str(E), "--top-k", str(K)])
            train(config.load(os.path.join(out, "config.yaml"), overrides=ft))
            runs[f"{kind}, top-{K}"] = out
        dense_eval = [r for r in read_metrics(DENSE) if "eval_loss" in r][0]["eval_loss"]
        train(config.load(os.path.join(DENSE, "config.yaml"),
                          overrides=[f"train.steps={DENSE_STEPS + FT_STEPS}", f"train.eval_every={FT_STEPS}",
                                     f"train.save_every={FT_STEPS}"]))
        runs["dense, continued"] = DENSE
    '''),
    md("""
        ## 5. Compare

        Training loss over the fine-tuning steps, and the final validation loss of each model (lower is
        better). At these tiny sizes and few steps the differences are small and noisy; what the plot
        does show reliably is where each model starts: the upcycled one at the dense model's loss, the
        split top-2 one above it.
    """),
    code('''
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.8))
        print(f"dense model before fine-tuning: eval loss {dense_eval:.4f}")
        for name, run in runs.items():
            recs = read_metrics(run)
            start = DENSE_STEPS if name.startswith("dense") else 0
            pts = [(r["step"] - start, r["loss"]) for r in recs if "loss" in r and r["step"] > start]
            ax.plot(*zip(*pts), label=name)
            final = [r["eval_loss"] for r in recs if "eval_loss" in r][-1]
            print(f"{name:18s} eval loss after {FT_STEPS} more steps: {final:.4f}")
        ax.axhline(dense_eval, color="gray", ls=":", label="dense eval loss before")
        ax.set(xlabel="fine-tuning step", ylabel="train loss")
        ax.legend()
        plt.show()
    '''),
]


# --------------------------------------------------------------------------------------------------
# routing_analysis.ipynb

ROUTING_CELLS = header("routing_analysis", "Routing analysis: what did the experts learn?", f"""
    `python -m moejax.analyze` runs a trained MoE over data of several domains and measures which
    experts take which domains and tokens, how balanced the load is, and how much the routing knows
    about the domain (mutual information, against a shuffled-label chance level). This notebook runs it
    on the run of the [quickstart notebook](quickstart.ipynb) (or trains a small one here) and shows
    the plots (29 s on a shared 2-core CPU VM with the quickstart notebook's run; 2026-11-23). Every
    number and plot is explained in the [routing analysis guide]({DOCS}/analysis.md).
""") + [
    md("""
        ## A run to analyse

        The quickstart notebook's run when it has a checkpoint; otherwise a shorter quickstart run here.
    """),
    code('''
        from moejax import config
        from moejax.train import train

        RUN = os.path.join(RUNS, "notebook_quickstart")
        if not os.path.isdir(os.path.join(RUN, "checkpoints")):
            RUN = os.path.join(RUNS, "notebook_routing")
            if SMOKE:
                sizes = TINY + ["train.steps=4", "train.log_every=2"]
            elif BACKEND == "cpu":
                sizes = ["train.steps=300", "data.eval_questions=16"]
            else:
                sizes = ["train.steps=600", "train.batch_size=32", "data.eval_questions=16"]
            cfg = config.load(QUICKSTART, overrides=[f"train.workdir={RUN}", *sizes,
                                                     "train.eval_every=100000"])
            train(cfg)
        print("analysing", RUN)
    '''),
    md("""
        ## Run the analysis

        The same as `python -m moejax.analyze --workdir RUN --out REPORT` in a shell. It reads the run's
        latest parameters, runs them over the run's validation split (one domain per domain tag) and
        writes `REPORT/routing.json`, PNG plots and `REPORT/index.html`; the summary is printed.
    """),
    code('''
        from moejax.analyze.__main__ import main as analyze

        REPORT = os.path.join(RUN, "routing_report")
        _ = analyze(["--workdir", RUN, "--out", REPORT, "--max-tokens", "400" if SMOKE else "20000"])
    '''),
    md("""
        ## The plots
    """),
    code('''
        import glob
        from IPython.display import Image, Markdown, display

        for path in sorted(glob.glob(os.path.join(REPORT, "*.png"))):
            display(Markdown(f"**{os.path.basename(path)}**"), Image(filename=path))
    '''),
    md("""
        ## The numbers

        `routing.json` holds everything the plots show. Per layer: the balance (busiest expert over
        the mean, 1 = balanced) and I(domain; expert) in nats next to its chance level and its ceiling
        H(domain).
    """),
    code('''
        import json

        with open(os.path.join(REPORT, "routing.json"), encoding="utf-8") as f:
            report = json.load(f)
        print("tokens per domain:", report["tokens"])
        for layer, bal, mi in zip(report["layers"], report["balance"], report["mutual_information"]):
            print(f"{layer}: max/mean load {bal['max_over_mean']:.2f}, CV {bal['cv']:.2f} | "
                  f"I(domain; expert) {mi['mi']:.3f} nats (shuffled {mi['mi_shuffled']:.3f}, "
                  f"ceiling {mi['domain_entropy']:.3f})")
    '''),
]

NOTEBOOKS = {"quickstart": QUICKSTART_CELLS, "dense_to_moe": DENSE_CELLS,
             "routing_analysis": ROUTING_CELLS}


def build(name: str, cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": [], "toc_visible": True},
    })
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name}-{i}"  # stable ids: regenerating gives the same file
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(name, NOTEBOOKS[name])) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when a notebook is not current")
    args = p.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = os.path.join(HERE, f"{name}.ipynb")
        text = render(name)
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {path}")
    if stale:
        print("not current (run python notebooks/make_notebooks.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
