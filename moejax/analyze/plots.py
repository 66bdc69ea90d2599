"""The report's figures, from `routing.json`'s summary (matplotlib, Agg backend: no display needed).

Every function writes one PNG into `out_dir` and returns its file name.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

DPI = 90
MAX_PANELS = 16          # layers drawn in a grid at most (evenly picked)
MAX_DETAIL_LAYERS = 4    # layers of the per-domain figures (position heatmaps, coloured text)


def pick_layers(n: int, k: int) -> list[int]:
    """`k` layer indices spread evenly over `n` layers (first and last included)."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return -(-n // cols), cols


def _save(fig, out_dir: str, name: str, **kw) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=DPI, **{"bbox_inches": "tight", **kw})
    plt.close(fig)
    # A 256-colour palette keeps the files small (a fraction of RGBA) with no visible loss here.
    from PIL import Image
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(256)
    small.save(path, optimize=True)
    return name


def _relative_heatmap(ax, rel, xlabels=None, ylabels=None, annotate=None):
    """Load relative to uniform (1 = its fair share) with a diverging map centred on 1."""
    vmax = max(2.0, float(np.nanmax(rel)) if np.isfinite(rel).any() else 2.0)
    im = ax.imshow(rel, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 0.0, vmax),
                   interpolation="nearest")
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    if xlabels is not None and len(xlabels) <= 32:
        ax.set_xticks(range(len(xlabels)), xlabels, fontsize=7)
    if annotate is not None and rel.shape[0] * rel.shape[1] <= 160:
        for (i, j), v in np.ndenumerate(annotate):
            if np.isfinite(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(rel[i, j] - 1) > 0.6 * (vmax - 1) else "black")
    return im


def expert_load_grid(summary: dict, out_dir: str) -> str:
    """Domain x expert load per MoE layer, each cell relative to a uniform share (numbers: % of the
    domain's routed slots)."""
    layers = pick_layers(len(summary["layers"]), MAX_PANELS)
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 0.8, 0.28 * len(summary["domains"]) * rows
                                                  + 1.1 * rows), squeeze=False)
    load = summary["expert_load"]
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, l in zip(axes.flat, layers):
        frac = np.array([load[d][l] for d in range(len(summary["domains"]))])
        e = frac.shape[1]
        im = _relative_heatmap(ax, frac * e, xlabels=[str(i) for i in range(e)],
                               ylabels=summary["domains"] if ax in axes[:, 0] else [""] * len(frac),
                               annotate=frac)
        ax.set_title(summary["layers"][l], fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="load / uniform share")
    return _save(fig, out_dir, "expert_load.png")


def load_over_layers(summary: dict, out_dir: str) -> str:
    """Overall load per expert by layer (left) and the balance measures by layer (right)."""
    nl, width = len(summary["layers"]), max(summary["num_experts"])
    rel = np.full((nl, width), np.nan)
    for l, f in enumerate(summary["expert_load_all"]):
        rel[l, :len(f)] = np.array(f) * len(f)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 0.3 * nl + 2.2),
                               gridspec_kw={"width_ratios": [1.4, 1]})
    im = _relative_heatmap(a, rel, xlabels=[str(i) for i in range(width)],
                           ylabels=summary["layers"] if nl <= 40 else None)
    a.set_xlabel("expert")
    a.set_title("load / uniform share, all domains", fontsize=9)
    fig.colorbar(im, ax=a, shrink=0.8)
    x = np.arange(nl)
    bal = summary["balance"]
    b.plot(x, [m["max_over_mean"] for m in bal], "o-", label="max / mean load")
    b.plot(x, [1 + m["cv"] for m in bal], "s-", label="1 + coefficient of variation")
    b.axhline(1.0, color="grey", lw=0.8, ls="--")
    b.set_xticks(x, summary["layers"] if nl <= 16 else [str(i) for i in x], rotation=45, fontsize=7)
    b.set_ylabel("1 = perfectly balanced")
    b.set_title("balance by layer", fontsize=9)
    b.set_xlim(-0.5, nl - 0.5)
    b.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, out_dir, "load_over_layers.png")


def position_importance(summary: dict, out_dir: str) -> str:
    """Per domain (rows) and layer (columns): each position group's share of gate weight per expert,
    relative to uniform (does routing drift along a sequence?)."""
    layers = pick_layers(len(summary["layers"]), MAX_DETAIL_LAYERS)
    doms = summary["domains"]
    starts = summary["position_group_starts"]
    fig, axes = plt.subplots(len(doms), len(layers), squeeze=False,
                             figsize=(2.9 * len(layers) + 1.0, 1.55 * len(doms) + 0.6))
    for d, name in enumerate(doms):
        for c, l in enumerate(layers):
            ax = axes[d, c]
            imp = np.array(summary["position_importance"][d][l])
            e = imp.shape[1]
            empty = imp.sum(1) == 0
            rel = imp * e
            rel[empty] = np.nan
            im = _relative_heatmap(ax, rel, xlabels=[str(i) for i in range(e)] if d == len(doms) - 1
                                   else None, ylabels=[f"{s}-" for s in starts])
            ax.tick_params(labelsize=6)
            if d != len(doms) - 1:
                ax.set_xticks([])
            if d == 0:
                ax.set_title(summary["layers"][l], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{name}\nposition", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="gate weight / uniform share")
    return _save(fig, out_dir, "position_importance.png")


def specialisation(summary: dict, out_dir: str) -> str:
    """Mutual information between domain and expert by layer, with its chance level and ceiling."""
    mi = summary["mutual_information"]
    x = np.arange(len(mi))
    floor = 1e-5  # log axis: chance, the measure and its ceiling differ by orders of magnitude
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    lines = (("mi", "o-", "I(domain; routed expert)", {}),
             ("mi_first_choice", "s--", "I(domain; first-choice expert)", {}),
             ("mi_shuffled", "x:", "same, shuffled domain labels", {"color": "grey"}),
             ("domain_entropy", "-", "ceiling H(domain)", {"color": "black", "lw": 0.8}))
    for key, style, label, kw in lines:
        ax.plot(x, [max(m[key], floor) for m in mi], style, label=label, **kw)
    ax.set_yscale("log")
    ax.set_xticks(x, summary["layers"] if len(x) <= 16 else [str(i) for i in x], rotation=45, fontsize=7)
    ax.set_ylabel("nats (log scale)")
    ax.set_xlim(-0.5, len(x) - 0.5)
    ax.set_title("Specialisation by layer", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out_dir, "specialisation.png")


def coselection(summary: dict, out_dir: str) -> str:
    """P(expert j chosen | expert i chosen), per layer (which experts are picked together)."""
    layers = pick_layers(len(summary["layers"]), MAX_PANELS)
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols + 0.8, 2.7 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, l in zip(axes.flat, layers):
        c = np.array(summary["coselection"][l], np.float64)
        diag = np.diag(c).copy()
        cond = np.divide(c, diag[:, None], out=np.zeros_like(c), where=diag[:, None] > 0)
        np.fill_diagonal(cond, np.nan)
        im = ax.imshow(cond, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(summary["layers"][l], fontsize=9)
        ax.set_xlabel("with expert j", fontsize=7)
        ax.set_ylabel("expert i", fontsize=7)
        ax.tick_params(labelsize=6)
        if len(c) <= 32:
            ax.set_xticks(range(len(c)))
            ax.set_yticks(range(len(c)))
    fig.colorbar(im, ax=axes, shrink=0.8, label="P(j chosen | i chosen)")
    return _save(fig, out_dir, "coselection.png")


def expert_colours(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "hsv")
    return [cmap(i if n <= 20 else i / n) for i in range(n)]


def _wrap(toks, width: int) -> list[list[tuple[int, str, int]]]:
    """(text, expert) tokens -> lines of (column, text, expert); a newline token ends its line."""
    out, line, col = [], [], 0
    for text, e in toks:
        newline = "\n" in text
        text = text.replace("\n", "\u21b5") or " "
        if col + len(text) > width and line:
            out.append(line)
            line, col = [], 0
        line.append((col, text, e))
        col += len(text)
        if newline:
            out.append(line)
            line, col = [], 0
    return out + [line] if line else out


def token_samples(summary: dict, samples: Sequence[dict[str, Any]], piece: Callable[[int], str],
                  out_dir: str, width_chars: int = 52, max_tokens: int = 160) -> str:
    """A few sequences per domain (rows), each token on the colour of its first-choice expert, for
    up to three layers (columns), as in the Mixtral paper's figure 8."""
    layers = pick_layers(len(summary["layers"]), 3)
    font = 8.0
    cw, lh = 0.602 * font / 72, font * 1.9 / 72  # monospace char width, line height (inches)
    col_w = width_chars * cw + 0.3
    cells = [[_wrap([(piece(t), e) for t, e in zip(s["ids"][:max_tokens],
                                                    s["first_choice"][l][:max_tokens])], width_chars)
              for l in layers] for s in samples]
    heights = [max(len(c) for c in row) + 1.5 for row in cells]
    w_in, h_in = col_w * len(layers) + 0.3, (sum(heights) + 2.5) * lh + 0.5
    fig = plt.figure(figsize=(w_in, h_in))
    colours = expert_colours(max(summary["num_experts"]))
    for c, l in enumerate(layers):
        fig.text((0.2 + c * col_w) / w_in, (h_in - 0.15 - lh) / h_in, summary["layers"][l],
                 fontsize=font + 1, weight="bold", va="baseline")
    y0 = h_in - 0.15 - 2.2 * lh
    for s, row, height in zip(samples, cells, heights):
        for c, lines in enumerate(row):
            x0 = 0.2 + c * col_w
            fig.text(x0 / w_in, y0 / h_in, s["domain"], fontsize=font, style="italic", va="baseline")
            y = y0 - lh
            for line in lines:
                for col, text, e in line:
                    x = (x0 + col * cw) / w_in
                    if e >= 0:
                        fig.patches.append(Rectangle(
                            (x, (y - 0.28 * lh) / h_in), len(text) * cw / w_in, lh * 0.92 / h_in,
                            transform=fig.transFigure, color=colours[e], alpha=0.5, lw=0))
                    fig.text(x, y / h_in, text, fontsize=font, family="monospace", va="baseline")
                y -= lh
        y0 -= height * lh
    handles = [Rectangle((0, 0), 1, 1, color=c, alpha=0.5) for c in colours[:32]]
    fig.legend(handles, [f"expert {i}" for i in range(len(handles))], loc="lower center",
               ncol=min(len(handles), 8), fontsize=7, frameon=False)
    return _save(fig, out_dir, "token_samples.png", bbox_inches=None)


PLOTS = {
    "expert_load.png": expert_load_grid,
    "load_over_layers.png": load_over_layers,
    "specialisation.png": specialisation,
    "position_importance.png": position_importance,
    "coselection.png": coselection,
}


def write_all(summary: dict, samples, piece, out_dir: str) -> list[str]:
    """Every figure; returns the file names (in the report's order)."""
    names = [fn(summary, out_dir) for fn in PLOTS.values()]
    if samples:
        names.insert(3, token_samples(summary, samples, piece, out_dir))
    return names
