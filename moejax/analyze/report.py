"""`index.html`: every plot, the tables, and a plain-language summary written from the numbers."""
from __future__ import annotations

import html
import os
from typing import Sequence

import numpy as np

CAPTIONS = {
    "expert_load.png": "Expert load per domain. Each row is a domain, each column an expert; the number "
                       "is the % of the domain's routed slots that went to the expert, the colour how "
                       "that compares with a uniform share (white = 1/E, red = more, blue = less).",
    "load_over_layers.png": "Left: each expert's share of all routed slots, by layer, relative to "
                            "uniform. Right: the balance measures by layer (1 = perfectly balanced).",
    "specialisation.png": "Mutual information between a token's domain and the experts it is routed "
                          "to, by layer, in nats (log scale). The grey line is the same measure with "
                          "the domain labels shuffled across sequences (what chance gives); the black "
                          "line is the ceiling H(domain), reached when every expert serves a single "
                          "domain.",
    "token_samples.png": "One sequence per domain; each token sits on the colour of its first-choice "
                         "expert (the expert with the largest gate) in the layer named above the column.",
    "position_importance.png": "Per domain (rows) and layer (columns): how the gate weight of tokens "
                               "at each group of positions (y axis: first position of the group) is "
                               "shared among the experts, relative to uniform. Vertical stripes mean "
                               "the routing does not change along the sequence.",
    "coselection.png": "Which experts are chosen together: P(expert j chosen | expert i chosen) over "
                       "the tokens (empty for top-1 routing).",
}

TITLES = {
    "expert_load.png": "Load per domain and expert",
    "load_over_layers.png": "Load and balance over layers",
    "specialisation.png": "Specialisation by layer",
    "token_samples.png": "Text coloured by first-choice expert",
    "position_importance.png": "Expert importance by token position",
    "coselection.png": "Expert co-selection",
}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def balance_word(max_over_mean: float) -> str:
    return ("well balanced" if max_over_mean <= 1.25 else "moderately balanced" if max_over_mean <= 2.0
            else "unbalanced")


def summary_text(s: dict) -> list[str]:
    """Plain-language sentences about balance and specialisation, from `routing.json`'s numbers."""
    out = []
    layers, bal, mi = s["layers"], s["balance"], s["mutual_information"]
    if not layers:
        return ["The model has no MoE layer: there is no routing to analyse."]
    tokens = s["tokens"]
    out.append(f"{sum(tokens.values()):,} tokens from {len(s['domains'])} domain(s) "
               f"({', '.join(f'{d}: {n:,}' for d, n in tokens.items())}) through {len(layers)} MoE "
               f"layer(s).")
    worst = int(np.argmax([m["max_over_mean"] for m in bal]))
    best = int(np.argmin([m["max_over_mean"] for m in bal]))
    busiest = int(np.argmax(s["expert_load_all"][worst]))
    idle = int(np.argmin(s["expert_load_all"][worst]))
    e = len(s["expert_load_all"][worst])
    text = (f"Balance: the load is {balance_word(bal[worst]['max_over_mean'])} "
            f"{'in the worst layer ' if len(layers) > 1 else ''}({layers[worst]}: expert {busiest} "
            f"takes {_pct(s['expert_load_all'][worst][busiest])} of the routed slots against a uniform "
            f"{_pct(1 / e)}, {bal[worst]['max_over_mean']:.2f}x the mean; the least used, expert {idle}, "
            f"takes {_pct(s['expert_load_all'][worst][idle])}; coefficient of variation "
            f"{bal[worst]['cv']:.2f})")
    if len(layers) > 1:
        text += (f" and {balance_word(bal[best]['max_over_mean'])} in the best ({layers[best]}: "
                 f"max/mean {bal[best]['max_over_mean']:.2f}, CV {bal[best]['cv']:.2f})")
    out.append(text + ".")
    if len(s["domains"]) < 2:
        out.append("Specialisation: only one domain was analysed, so there is nothing to compare; "
                   "add sources with --data to see which experts lean to which.")
        return out
    top = int(np.argmax([m["mi"] for m in mi]))
    m = mi[top]
    ratio = m["mi"] / m["domain_entropy"] if m["domain_entropy"] > 0 else 0.0
    strength = ("no more than chance" if m["mi"] <= 3 * m["mi_shuffled"] + 1e-6 else
                "weak" if ratio < 0.05 else "moderate" if ratio < 0.2 else "strong")
    out.append(
        f"Specialisation by domain is {strength}: the most domain-specific layer is {layers[top]}, "
        f"where the routed expert carries {m['mi']:.3f} nats of information about the domain "
        f"({_pct(ratio)} of the {m['domain_entropy']:.3f} nats that would identify it; shuffled "
        f"labels give {m['mi_shuffled']:.4f}; first choice alone {m['mi_first_choice']:.3f}). "
        f"Mean over layers: {np.mean([x['mi'] for x in mi]):.3f} nats.")
    lean = [r for r in s["leanings"] if r["layer"] == top][:6] or s["leanings"][:6]
    if lean:
        parts = [f"expert {r['expert']} ({layers[r['layer']]}) takes {_pct(r['share_of_expert'])} of its "
                 f"slots from {r['domain']} ({r['lift']:.1f}x its {_pct(r['domain_share'])} share)"
                 for r in lean]
        out.append("Experts that lean to a domain: " + "; ".join(parts) + ".")
    else:
        out.append("No expert takes markedly more of one domain than that domain's share of the data.")
    favourite = []
    for d, name in enumerate(s["domains"]):
        load = np.array(s["expert_load"][d][top])
        if load.sum():
            favourite.append(f"{name} -> expert {int(load.argmax())} ({_pct(load.max())})")
    out.append(f"Each domain's most used expert in {layers[top]}: " + ", ".join(favourite) + ".")
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def visible(piece: str) -> str:
    """A token piece with its spaces and newlines made visible, HTML-escaped."""
    return html.escape(piece.replace(" ", "\u2423").replace("\n", "\u21b5"))


def write_html(s: dict, plots: Sequence[str], out_dir: str, meta: dict) -> str:
    """Write `out_dir/index.html` and return its path."""
    layers = s["layers"]
    parts = [f"<h1>Routing report: {html.escape(meta.get('workdir', ''))}</h1>",
             "<p class=meta>" + " &middot; ".join(html.escape(f"{k}: {v}") for k, v in meta.items()
                                                  if k != "workdir") + "</p>",
             "<h2>Summary</h2>", "".join(f"<p>{html.escape(p)}</p>" for p in summary_text(s))]
    for name in plots:
        parts.append(f"<h2>{html.escape(TITLES.get(name, name))}</h2>"
                     f"<figure><img src=\"{html.escape(name)}\" alt=\"{html.escape(name)}\">"
                     f"<figcaption>{html.escape(CAPTIONS.get(name, ''))}</figcaption></figure>")
    rows = [[html.escape(layers[l]), s["num_experts"][l], f"{b['cv']:.3f}", f"{b['max_over_mean']:.2f}",
             f"{b['entropy']:.3f} ({b['entropy_norm']:.3f})", f"{m['mi']:.4f}", f"{m['mi_shuffled']:.4f}",
             f"{m['mi_first_choice']:.4f}", f"{m['domain_entropy']:.3f}"]
            for l, (b, m) in enumerate(zip(s["balance"], s["mutual_information"]))]
    parts += ["<h2>Balance and specialisation by layer</h2>",
              _table(["layer", "experts", "CV", "max/mean", "entropy nats (normalised)", "MI nats",
                      "MI shuffled", "MI first choice", "H(domain)"], rows)]
    if s["leanings"]:
        rows = [[html.escape(layers[r["layer"]]), r["expert"], html.escape(r["domain"]),
                 _pct(r["share_of_expert"]), _pct(r["domain_share"]), f"{r['lift']:.2f}"]
                for r in s["leanings"][:30]]
        parts += ["<h2>Experts leaning to a domain</h2>",
                  "<p>Experts whose slots come from one domain at least 1.5 times more often than that "
                  "domain's share of all slots (top 30).</p>",
                  _table(["layer", "expert", "domain", "of the expert's slots", "of all slots", "lift"],
                         rows)]
    parts.append("<h2>Top tokens per expert</h2><p>The tokens each expert receives most often; in "
                 "brackets the share of that token's occurrences routed to the expert (with top-k "
                 "routing a token's shares add up to k). \u2423 is a space, \u21b5 a newline.</p>")
    for l, per_expert in enumerate(s["top_tokens"]):
        rows = [[e, " ".join(f"<code>{visible(t['token'])}</code>&nbsp;{t['count']}"
                             f"&nbsp;({_pct(t['share'])})" for t in toks)]
                for e, toks in enumerate(per_expert)]
        parts.append(f"<details{' open' if l == 0 else ''}><summary>{html.escape(layers[l])}</summary>"
                     + _table(["expert", "tokens (count, share)"], rows) + "</details>")
    parts.append("<p>All numbers: <a href=\"routing.json\">routing.json</a>.</p>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moejax routing report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 1.5em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
.meta {{ color: #666; font-size: 0.9em; }}
img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }}
td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }} code {{ background: #f2f2f2; padding: 0 2px; }}
</style></head><body>
{chr(10).join(parts)}
</body></html>
"""
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
