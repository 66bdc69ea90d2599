"""Typed configuration: dataclasses for every setting, YAML loading, `--set` overrides, validation.

Every field carries its help text and bounds as metadata, so one generic validator checks them and the
configuration reference in the docs is generated from the same source. Cross-field rules (top_k <=
num_experts, heads divisible by KV heads, names present in a registry) live in `_check_*` below.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

from moejax.errors import ConfigError


def _f(default: Any, help: str, *, min: float | None = None, max: float | None = None,
       choices: Sequence[str] | None = None, exclusive_min: bool = False) -> Any:
    meta = {"help": help, "min": min, "max": max, "choices": choices, "exclusive_min": exclusive_min}
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = _f(8, "Routed experts per MoE layer; 0 builds a dense (Llama-style) model.", min=0)
    top_k: int = _f(2, "Experts chosen per token.", min=1)
    d_expert: int = _f(512, "Hidden width of each routed expert's SwiGLU.", min=1)
    num_shared_experts: int = _f(0, "Always-on experts added to the routed output (DeepSeekMoE).", min=0)
    d_shared: Optional[int] = _f(None, "Hidden width of each shared expert; null = d_expert.", min=1)
    router: str = _f("topk", "Router name, from the router registry (moejax.model.routing).")
    renormalize: bool = _f(True, "Renormalise the k chosen softmax weights to sum to 1 (Mixtral).")
    dispatch: str = _f("dropless", "dense (reference), capacity (fixed buffers, drops overflow) or "
                       "dropless (sort + grouped matmul).")
    capacity_factor: float = _f(1.25, "capacity dispatch: slots per expert = ceil(tokens*k/E*factor).",
                                min=0.0, exclusive_min=True)
    aux_loss_coef: float = _f(0.01, "Weight of the Switch load-balancing loss in the total loss.", min=0.0)
    z_loss_coef: float = _f(0.001, "Weight of the ST-MoE router z-loss in the total loss.", min=0.0)
    every: int = _f(1, "An MoE block replaces the FFN of every N-th layer (layers with (i+1) % N == 0).",
                    min=1)
    first_dense: int = _f(0, "The first K layers keep a dense FFN (DeepSeek's first_k_dense_replace).",
                          min=0)
    gmm: str = _f("auto", "How dropless runs the experts over expert-sorted rows: auto (tiled on CPU, "
                  "ragged_dot elsewhere), ragged_dot (grouped matmuls) or tiled (a loop over tiles).")
    tile_size: int = _f(256, "Rows per tile of the tiled grouped expert FFN.", min=8)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = _f(4096, "Vocabulary size.", min=1)
    d_model: int = _f(256, "Residual stream width.", min=1)
    n_layers: int = _f(4, "Decoder layers.", min=1)
    n_heads: int = _f(8, "Query heads.", min=1)
    n_kv_heads: int = _f(4, "Key/value heads (grouped-query attention); must divide n_heads.", min=1)
    head_dim: Optional[int] = _f(None, "Per-head width; null = d_model / n_heads.", min=1)
    d_ff: int = _f(1024, "Hidden width of the dense SwiGLU FFN (layers without MoE).", min=1)
    norm_eps: float = _f(1e-5, "RMSNorm epsilon.", min=0.0, exclusive_min=True)
    rope_theta: float = _f(10000.0, "RoPE base frequency.", min=0.0, exclusive_min=True)
    tie_embeddings: bool = _f(False, "Share the input embedding with the output head.")
    init_std: float = _f(0.02, "Standard deviation of the normal initialiser.", min=0.0, exclusive_min=True)
    moe: MoEConfig = _f(MoEConfig(), "Mixture-of-Experts block settings.")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        m = self.moe
        return m.num_experts > 0 and i >= m.first_dense and (i + 1) % m.every == 0


@dataclass(frozen=True)
class MeshConfig:
    data: int = _f(-1, "Data-parallel axis size (-1: all remaining devices).", min=-1)
    fsdp: int = _f(1, "Fully-sharded data-parallel axis size (-1: all remaining devices).", min=-1)
    expert: int = _f(1, "Expert-parallel axis size (-1: all remaining devices).", min=-1)
    tensor: int = _f(1, "Tensor-parallel axis size (-1: all remaining devices).", min=-1)


@dataclass(frozen=True)
class DataConfig:
    source: str = _f("tfds:moejax_tasks", "Where examples come from: tfds:NAME or jsonl:PATH.")
    seq_len: int = _f(256, "Tokens per packed training sequence.", min=2)
    format: str = _f("auto", "Record format of jsonl sources (auto = inferred from the first line).")
    tokenizer: str = _f("", "SentencePiece model file; empty = train one from the data into "
                        "WORKDIR/tokenizer.model on first use.")
    skip_bad_lines: bool = _f(False, "Skip (and count) malformed jsonl lines instead of stopping.")
    tfds_dir: str = _f("", "TFDS data dir; empty = $TFDS_DATA_DIR or ~/tensorflow_datasets.")
    eval_split: str = _f("validation", "Split used for validation loss and exact-match accuracy.")
    eval_questions: int = _f(32, "Held-out questions per domain for exact-match accuracy.", min=0)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _f(1000, "Optimizer steps.", min=1)
    batch_size: int = _f(8, "Sequences per optimizer step (global, over all devices).", min=1)
    lr: float = _f(3e-4, "Peak learning rate.", min=0.0)
    seed: int = _f(0, "Seed of parameter init and data shuffling.")
    dtype: str = _f("float32", "Compute dtype; parameters and router math stay float32.",
                    choices=("float32", "bfloat16"))
    workdir: str = _f("runs/default", "Directory of the run: metrics, checkpoints, resolved config.")
    warmup_steps: int = _f(100, "Linear warm-up steps before the cosine decay.", min=0)
    min_lr_ratio: float = _f(0.1, "Final learning rate as a fraction of train.lr.", min=0.0, max=1.0)
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (matrices only; not norms).", min=0.0)
    b1: float = _f(0.9, "Adam beta1.", min=0.0, max=1.0)
    b2: float = _f(0.95, "Adam beta2.", min=0.0, max=1.0)
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 = no clipping).", min=0.0)
    grad_accum: int = _f(1, "Micro-batches per optimizer step (batch_size must divide by it).", min=1)
    remat: bool = _f(False, "Recompute each block's activations in the backward pass (saves memory).")
    skip_nonfinite: bool = _f(False, "Skip the update of a step whose loss or gradients are not finite "
                              "(instead of stopping the run).")
    keep_checkpoints: int = _f(3, "Checkpoints kept (the latest N).", min=1)
    peak_tflops: float = _f(0.0, "Peak TFLOP/s per device for MFU; 0 = look up the device kind "
                            "(measured by a matmul probe on CPU).", min=0.0)
    log_every: int = _f(10, "Steps between metric lines.", min=1)
    eval_every: int = _f(100, "Steps between evaluations.", min=1)
    save_every: int = _f(500, "Steps between checkpoints.", min=1)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = _f(ModelConfig(), "The model architecture.")
    mesh: MeshConfig = _f(MeshConfig(), "Device mesh axis sizes; their product is the device count.")
    data: DataConfig = _f(DataConfig(), "Training data.")
    train: TrainConfig = _f(TrainConfig(), "The training loop.")


# ----------------------------------------------------------------------------------------------
# Building dataclasses from nested dicts, with type checks and nearest-key suggestions.


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, prefix + name + ".")
    return keys


def _unknown_key(path: str) -> ConfigError:
    valid = _all_keys(Config)
    near = difflib.get_close_matches(path, valid, n=1, cutoff=0.5)
    if not near:  # a misspelled leaf under a right section: compare leaf names
        leaf = path.rsplit(".", 1)[-1]
        near = [k for k in valid if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [v.rsplit(".", 1)[-1] for v in valid], n=1, cutoff=0.6)][:1]
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ConfigError(f"unknown config key {path!r}{hint}")


def _coerce(path: str, value: Any, tp: Any) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path} must not be null (expected {tp.__name__})")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{path} = {value!r} must be a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path} = {value!r} has the wrong type: expected {tp.__name__}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    hints = _hints(cls)
    for key in data:
        if key not in hints:
            raise _unknown_key(prefix + str(key))
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        path = prefix + key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, path + ".")
        else:
            kwargs[key] = _coerce(path, value, tp)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a `Config` from a nested dict (missing keys take their defaults)."""
    cfg = _build(Config, data or {}, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as a YAML scalar."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    path, raw = override.split("=", 1)
    path = path.strip()
    valid = _all_keys(Config)
    if path not in valid:
        raise _unknown_key(path)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not a YAML scalar ({e.problem})") from None
    node = data
    *parents, leaf = path.split(".")
    for p in parents:
        if node.get(p) is None:  # an absent or empty (`model:`) section
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    node[leaf] = value


def load(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or start from defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {str(path)!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    for o in overrides:
        apply_override(data, o)
    return from_dict(data)


# ----------------------------------------------------------------------------------------------
# Validation.


def _check_fields(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_fields(value, path + ".")
            continue
        m = f.metadata
        if value is None:
            continue
        if m.get("choices") and value not in m["choices"]:
            raise ConfigError(f"{path} = {value!r} is not allowed; allowed: {', '.join(m['choices'])}")
        lo, hi = m.get("min"), m.get("max")
        if lo is not None:
            bad = value <= lo if m.get("exclusive_min") else value < lo
            if bad:
                op = ">" if m.get("exclusive_min") else ">="
                raise ConfigError(f"{path} = {value!r} is out of range: must be {op} {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"{path} = {value!r} is out of range: must be <= {hi}")


def _check_model(m: ModelConfig) -> None:
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads = {m.n_heads} must be a multiple of model.n_kv_heads = "
                          f"{m.n_kv_heads}")
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model = {m.d_model} is not divisible by model.n_heads = {m.n_heads}; "
                          "set model.head_dim or change either")
    if m.resolved_head_dim % 2:
        raise ConfigError(f"head dim {m.resolved_head_dim} must be even for RoPE")
    e = m.moe
    if e.num_experts == 0:
        return
    if e.top_k > e.num_experts:
        raise ConfigError(f"model.moe.top_k = {e.top_k} is out of range: must be in "
                          f"[1, model.moe.num_experts = {e.num_experts}]")
    from moejax.model import dispatch, routing  # registries; imported late to keep config light

    for key, value, reg in (("router", e.router, routing.ROUTERS),
                            ("dispatch", e.dispatch, dispatch.DISPATCHERS),
                            ("gmm", e.gmm, dispatch.GROUPED_FFNS)):
        if value not in reg:
            raise ConfigError(f"model.moe.{key} = {value!r} is not allowed; allowed: "
                              f"{', '.join(reg.names())}")
    if not any(m.is_moe_layer(i) for i in range(m.n_layers)):
        raise ConfigError(f"no layer is an MoE layer with model.moe.first_dense = {e.first_dense} and "
                          f"model.moe.every = {e.every} over model.n_layers = {m.n_layers}; set "
                          "model.moe.num_experts = 0 for a dense model")


def _check_mesh(mesh: MeshConfig) -> None:
    sizes = dataclasses.asdict(mesh)
    for k, v in sizes.items():
        if v == 0:
            raise ConfigError(f"mesh.{k} = 0 is out of range: must be >= 1, or -1 for the remaining devices")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {sizes}")


def validate(cfg: Config) -> None:
    """Raise `ConfigError` naming the first bad setting."""
    _check_fields(cfg, "")
    _check_model(cfg.model)
    _check_mesh(cfg.mesh)
