"""The names of every registry-backed config value, below both `moejax.config` and the model.

`moejax.config` validates `model.attention`, `model.moe.router`, ... against these tuples without
importing the model (which imports the config: the import circle this module breaks). Each
implementation module keeps its own `Registry`; `tests/test_config.py` checks that every registry
holds exactly the names declared here, so a new implementation is declared here in one line too.
"""
from __future__ import annotations

ATTENTIONS = ("gqa", "mla")                                   # moejax.model.attention.ATTENTIONS
ATTENTION_IMPLS = ("auto", "chunked", "cudnn", "pallas_gpu", "splash", "xla")  # attention_impl (+ auto)
ROPE_SCALINGS = ("default", "linear", "llama3", "yarn")       # moejax.model.attention.ROPE_SCALINGS
# moejax.model.routing.ROUTERS: name -> the only top_k it is defined for (None = any).
ROUTERS: dict[str, int | None] = {"deepseek": None, "expert_choice": None, "gshard": 2, "hash": None,
                                  "noisy_topk": None, "switch": 1, "topk": None}
DISPATCHERS = ("capacity", "dense", "dropless")               # moejax.model.dispatch.DISPATCHERS
GROUPED_FFNS = ("auto", "megablox", "ragged_dot", "tiled", "tiled_static")  # moejax.model.gmm.GROUPED_FFNS
# moejax.optim: the parameter groups of train.freeze / train_only / lr_multipliers.
PARAM_GROUPS = ("embed", "attention", "router", "experts", "shared", "ffn", "norm", "head")
