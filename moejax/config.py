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

from moejax import names
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
    capacity_factor: float = _f(1.25, "capacity dispatch: slots per expert = ceil(tokens*k/E*factor); "
                                "0 = dynamic (Tutel): the step's largest per-expert load, rounded up to "
                                "one of a few static buckets, so nothing is dropped.", min=0.0)
    ep_exchange: str = _f("padded", "Expert-parallel dropless exchange: padded (fixed-shape all_to_all "
                          "sized for the worst case) or ragged (counts first, then ragged_all_to_all of "
                          "the real rows; an exact emulation on CPU).", choices=("padded", "ragged"))
    ep_buffer_factor: Optional[float] = _f(None, "ragged exchange: receive buffer rows = factor x the "
                                           "average rows per device; overflow is dropped and counted "
                                           "(dropped_fraction). null = the worst case (never drops).",
                                           min=0.0, exclusive_min=True)
    a2a_local_size: int = _f(0, "Tutel's 2D hierarchical all-to-all: devices per node along mesh.expert "
                             "(an all-to-all inside each node, then one across nodes); 0 = flat.", min=0)
    drop_duplicate_tokens: bool = _f(False, "DeepSpeed-TED: with mesh.tensor > 1 each tensor rank sends "
                                     "1/tensor of the (identical) tokens through the expert all-to-all; "
                                     "the results are all-gathered after.")
    aux_loss_coef: float = _f(0.01, "Weight of the Switch load-balancing loss in the total loss.", min=0.0)
    z_loss_coef: float = _f(0.001, "Weight of the ST-MoE router z-loss in the total loss.", min=0.0)
    every: int = _f(1, "An MoE block replaces the FFN of every N-th layer (layers with (i+1) % N == 0).",
                    min=1)
    first_dense: int = _f(0, "The first K layers keep a dense FFN (DeepSeek's first_k_dense_replace).",
                          min=0)
    gmm: str = _f("auto", "How dropless runs the experts over expert-sorted rows: auto (megablox on "
                  "TPU, ragged_dot on GPU, tiled on CPU), ragged_dot (grouped matmuls), megablox (Pallas "
                  "TPU kernel; interpret mode elsewhere), tiled (a loop over the used tiles) or "
                  "tiled_static (over the worst-case tile count).")
    tile_size: int = _f(256, "Rows per tile of the tiled grouped expert FFN.", min=8)
    gmm_tiling: tuple[int, ...] = _f((128, 128, 128), "megablox tile sizes (tm, tk, tn): rows, "
                                     "contraction and output columns per kernel block (each clipped "
                                     "to its dimension).", min=1)
    layer_experts: tuple[int, ...] = _f((), "Routed experts of each MoE layer, in layer order (a pyramid, "
                                        "PR-MoE); empty = num_experts in every MoE layer.", min=1)
    shared_gate: bool = _f(False, "Scale the shared experts' output by sigmoid(x . w) (Qwen2-MoE).")
    routed_scaling_factor: float = _f(1.0, "Multiplies the routed experts' combine weights "
                                      "(DeepSeek-V2/V3 routed_scaling_factor).", min=0.0, exclusive_min=True)
    n_group: int = _f(1, "deepseek router: experts are split into this many groups ...", min=1)
    topk_group: int = _f(1, "deepseek router: ... and only the best topk_group groups may be chosen "
                         "(group-limited routing, DeepSeek-V3).", min=1)
    bias_update_rate: float = _f(0.0, "deepseek router: after each step the selection bias of an "
                                 "under-loaded expert rises, of an over-loaded one falls, by this much "
                                 "(aux-loss-free balancing; DeepSeek-V3 used 0.001).", min=0.0)
    seq_aux_loss_coef: float = _f(0.0, "Weight of the sequence-level balance loss (DeepSeek-V3).", min=0.0)
    device_loss_coef: float = _f(0.0, "Weight of the device-level balance loss over expert groups "
                                 "(DeepSeek-V2).", min=0.0)
    device_groups: int = _f(0, "Expert groups of the device-level loss; 0 = the mesh's expert axis size.",
                            min=0)
    importance_loss_coef: float = _f(0.0, "Weight of the importance loss, CV^2 of summed gates "
                                     "(Shazeer et al. 2017).", min=0.0)
    load_loss_coef: float = _f(0.0, "Weight of the smooth load loss of noisy top-k gating "
                               "(Shazeer et al. 2017).", min=0.0)

    def experts_of(self, moe_layer: int) -> int:
        """Routed experts of the `moe_layer`-th MoE layer (0-based among MoE layers)."""
        return self.layer_experts[moe_layer] if self.layer_experts else self.num_experts

    @property
    def max_experts(self) -> int:
        return max(self.layer_experts) if self.layer_experts else self.num_experts


@dataclass(frozen=True)
class MLAConfig:
    q_lora_rank: Optional[int] = _f(None, "Rank of the query down-projection; null = a full query "
                                    "projection (DeepSeek-V2-Lite).", min=1)
    kv_lora_rank: int = _f(512, "Rank of the compressed key/value latent.", min=1)
    qk_rope_head_dim: int = _f(64, "Per-head query/key width that carries RoPE (shared key part).", min=2)
    qk_nope_head_dim: int = _f(128, "Per-head query/key width without RoPE.", min=1)
    v_head_dim: int = _f(128, "Per-head value width.", min=1)
    rope_interleave: bool = _f(True, "The rope part of queries/keys is stored as interleaved pairs "
                               "(x0, x1), (x2, x3), ... (Hugging Face DeepseekV3 rope_interleave).")


@dataclass(frozen=True)
class RopeScalingConfig:
    type: str = _f("default", "RoPE frequency scaling, from the registry in moejax.model.attention: "
                   "default (none), linear, llama3 (Llama 3.1) or yarn (DeepSeek-V3).")
    factor: float = _f(1.0, "Context extension factor.", min=0.0, exclusive_min=True)
    original_max_position_embeddings: Optional[int] = _f(None, "Pre-training context length (llama3, "
                                                         "yarn).", min=1)
    low_freq_factor: float = _f(1.0, "llama3: wavelengths above original/low_freq_factor are scaled.",
                                min=0.0, exclusive_min=True)
    high_freq_factor: float = _f(4.0, "llama3: wavelengths below original/high_freq_factor are kept.",
                                 min=0.0, exclusive_min=True)
    beta_fast: float = _f(32.0, "yarn: rotations above which frequencies are kept.", min=0.0)
    beta_slow: float = _f(1.0, "yarn: rotations below which frequencies are interpolated.", min=0.0)
    mscale: float = _f(0.0, "yarn: mscale (0 = unset).", min=0.0)
    mscale_all_dim: float = _f(0.0, "yarn: mscale_all_dim (0 = unset); DeepSeek also scales the "
                               "softmax by its square.", min=0.0)
    attention_factor: Optional[float] = _f(None, "yarn: cos/sin scale; null = derived from factor and "
                                           "mscale.", min=0.0)
    truncate: bool = _f(True, "yarn: round the correction range to whole dimensions.")


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
    attention: str = _f("gqa", "Attention, from the attention registry: gqa (grouped-query, Llama) or "
                        "mla (multi-head latent attention, DeepSeek-V2/V3).")
    attention_impl: str = _f("auto", "How softmax(q k^T) v is computed (moejax.model.attention_impl): "
                             "auto (TPU splash; GPU cudnn, else pallas_gpu; CPU xla below 1024 tokens, "
                             "chunked from there), xla (dense), chunked (blockwise, every backend), "
                             "splash (Pallas TPU), pallas_gpu (Pallas Triton) or cudnn (GPU, bf16).")
    attention_block_q: int = _f(512, "Query rows per block of the chunked / splash / pallas_gpu "
                                "attention (splash and pallas_gpu: must divide data.seq_len when "
                                "smaller).", min=8)
    attention_block_kv: int = _f(512, "Key rows per block of the chunked / splash / pallas_gpu "
                                 "attention.", min=8)
    qkv_bias: bool = _f(False, "Biases on the query/key/value projections (Qwen2).")
    qk_norm: bool = _f(False, "RMSNorm on the projected queries and keys (OLMoE).")
    sliding_window: Optional[int] = _f(None, "Each query sees at most this many latest keys (Mistral); "
                                       "null = full causal attention.", min=1)
    attn_experts: int = _f(0, "Attention experts (LLaMA-MoE-v2): the KV head groups are split into this "
                           "many experts, top attn_top_k chosen per token by a router; 0 = off.", min=0)
    attn_top_k: int = _f(2, "Attention experts chosen per token.", min=1)
    attn_expert_scale: float = _f(1.0, "The attention experts' combined output is multiplied by this "
                                  "(LLaMA-MoE-v2 scale factor; attn_experts after a split).", min=0.0)
    rope_scaling: RopeScalingConfig = _f(RopeScalingConfig(), "RoPE frequency scaling (long context).")
    mla: MLAConfig = _f(MLAConfig(), "Multi-head latent attention sizes (used when attention = mla).")
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
    source: str = _f("tfds:moejax_tasks", "Where examples come from: tfds:NAME, jsonl:PATH, json:PATH "
                     "(one JSON array), parquet:PATH_OR_GLOB or hf:ORG/NAME (local hub cache).")
    seq_len: int = _f(256, "Tokens per packed training sequence.", min=2)
    format: str = _f("auto", "Record format of file sources (auto = inferred from the first record).")
    tokenizer: str = _f("", "Tokenizer: a Hugging Face tokenizer directory (tokenizer.json / tokenizer.model "
                        "+ tokenizer_config.json), a SentencePiece .model file, or a moejax-trained model; "
                        "empty = train one from the data into WORKDIR/tokenizer.model on first use.")
    chat_template: str = _f("", "Chat template override: a Jinja file or a built-in name (moejax, chatml); "
                            "empty = the tokenizer's own.")
    skip_bad_lines: bool = _f(False, "Skip (and count) malformed records instead of stopping.")
    cache_dir: str = _f("", "Where indexes of json/parquet files are cached; empty = $MOEJAX_CACHE, "
                        "else ~/.cache/moejax.")
    workers: int = _f(2, "Background threads that read and tokenize examples ahead of packing "
                      "(0 = none, in the training loop).", min=0)
    prefetch: int = _f(256, "Examples read and tokenized ahead of the packer (bounds memory).", min=1)
    tfds_dir: str = _f("", "TFDS data dir; empty = $TFDS_DATA_DIR or ~/tensorflow_datasets.")
    eval_split: str = _f("validation", "Split used for validation loss and exact-match accuracy.")
    eval_questions: int = _f(32, "Held-out questions per domain for exact-match accuracy.", min=0)


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = _f("", "Run directory of a frozen teacher for knowledge distillation; empty = off.")
    alpha: float = _f(0.5, "Loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher || student).", min=0.0, max=1.0)
    temperature: float = _f(1.0, "Softmax temperature T of the distillation term.", min=0.0,
                            exclusive_min=True)
    stop_step: int = _f(0, "Distil only for steps below this, then train plainly (staged KD, "
                        "Mixture-of-Students); 0 = the whole run.", min=0)


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
    freeze: tuple[str, ...] = _f((), "Parameter groups left untouched by the optimizer (embed, attention, "
                                 "router, experts, shared, norm, head).")
    train_only: tuple[str, ...] = _f((), "If set, only these parameter groups train; all others are frozen.")
    lr_multipliers: tuple[str, ...] = _f((), "Per-group learning-rate factors, as GROUP=FACTOR items "
                                         "(e.g. [router=0.1, experts=2]).")
    peak_tflops: float = _f(0.0, "Peak TFLOP/s per device for MFU; 0 = look up the device kind "
                            "(measured by a matmul probe on CPU).", min=0.0)
    log_every: int = _f(10, "Steps between metric lines.", min=1)
    eval_every: int = _f(100, "Steps between evaluations.", min=1)
    save_every: int = _f(500, "Steps between checkpoints.", min=1)
    distill: DistillConfig = _f(DistillConfig(), "Knowledge distillation from a teacher run (docs/compression.md).")


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
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value))
        raise ConfigError(f"{path} = {value!r} has the wrong type: expected a list of {item.__name__}")
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
    """Plain nested dicts (tuples as lists), as written to config.yaml."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x
    return plain(dataclasses.asdict(cfg))


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
        for i, item in enumerate(value if isinstance(value, tuple) else (value,)):
            _check_value(f"{path}[{i}]" if isinstance(value, tuple) else path, item, f.metadata)


def _check_value(path: str, value: Any, m: Any) -> None:
    if value is None:
        return
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
    _check_attention(m)
    e = m.moe
    if e.num_experts == 0:
        return
    if e.top_k > e.num_experts:
        raise ConfigError(f"model.moe.top_k = {e.top_k} is out of range: must be in "
                          f"[1, model.moe.num_experts = {e.num_experts}]")
    for key, value, allowed in (("router", e.router, tuple(names.ROUTERS)),
                                ("dispatch", e.dispatch, names.DISPATCHERS),
                                ("gmm", e.gmm, names.GROUPED_FFNS)):
        _check_name(f"model.moe.{key}", value, allowed)
    n_moe = sum(m.is_moe_layer(i) for i in range(m.n_layers))
    if len(e.gmm_tiling) != 3:
        raise ConfigError(f"model.moe.gmm_tiling = {list(e.gmm_tiling)} must be 3 positive ints "
                          "[tm, tk, tn] (megablox's row, contraction and output tile sizes)")
    if e.layer_experts and len(e.layer_experts) != n_moe:
        raise ConfigError(f"model.moe.layer_experts has {len(e.layer_experts)} entries but the model has "
                          f"{n_moe} MoE layers; give one expert count per MoE layer")
    if e.layer_experts and e.top_k > min(e.layer_experts):
        raise ConfigError(f"model.moe.top_k = {e.top_k} is more than the {min(e.layer_experts)} experts "
                          "of a layer in model.moe.layer_experts")
    if e.max_experts % e.n_group or e.topk_group > e.n_group:
        raise ConfigError(f"model.moe.n_group = {e.n_group} must divide the experts ({e.max_experts}) and "
                          f"be >= model.moe.topk_group = {e.topk_group}")
    fixed = names.ROUTERS[e.router]
    if fixed is not None and e.top_k != fixed:
        raise ConfigError(f"model.moe.router = {e.router!r} routes to exactly {fixed} expert(s); set "
                          f"model.moe.top_k = {fixed} (got {e.top_k})")
    if not any(m.is_moe_layer(i) for i in range(m.n_layers)):
        raise ConfigError(f"no layer is an MoE layer with model.moe.first_dense = {e.first_dense} and "
                          f"model.moe.every = {e.every} over model.n_layers = {m.n_layers}; set "
                          "model.moe.num_experts = 0 for a dense model")


def _check_name(key: str, value: str, allowed: Sequence[str]) -> None:
    """A registry-backed value: one of `allowed` (moejax.names), else the nearest name as a hint."""
    if value in allowed:
        return
    near = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ConfigError(f"{key} = {value!r} is not allowed; allowed: {', '.join(sorted(allowed))}{hint}")


def _check_attention(m: ModelConfig) -> None:
    for key, value, allowed in (("attention", m.attention, names.ATTENTIONS),
                                ("attention_impl", m.attention_impl, names.ATTENTION_IMPLS),
                                ("rope_scaling.type", m.rope_scaling.type, names.ROPE_SCALINGS)):
        _check_name(f"model.{key}", value, allowed)
    rs = m.rope_scaling
    if rs.type in ("llama3", "yarn") and rs.original_max_position_embeddings is None:
        raise ConfigError(f"model.rope_scaling.type = {rs.type!r} needs "
                          "model.rope_scaling.original_max_position_embeddings")
    if m.attention == "mla":
        extras = [k for k in ("qkv_bias", "qk_norm", "attn_experts") if getattr(m, k)]
        if extras:
            raise ConfigError(f"model.{extras[0]} is for gqa attention; model.attention = 'mla' has no "
                              "such option")
        if m.mla.qk_rope_head_dim % 2:
            raise ConfigError(f"model.mla.qk_rope_head_dim = {m.mla.qk_rope_head_dim} must be even for "
                              "RoPE")
    if m.attn_experts:
        if m.n_kv_heads % m.attn_experts:
            raise ConfigError(f"model.attn_experts = {m.attn_experts} must divide model.n_kv_heads = "
                              f"{m.n_kv_heads} (each attention expert owns whole KV head groups)")
        if m.attn_top_k > m.attn_experts:
            raise ConfigError(f"model.attn_top_k = {m.attn_top_k} is out of range: must be in "
                              f"[1, model.attn_experts = {m.attn_experts}]")


def _check_mesh(mesh: MeshConfig) -> None:
    sizes = dataclasses.asdict(mesh)
    for k, v in sizes.items():
        if v == 0:
            raise ConfigError(f"mesh.{k} = 0 is out of range: must be >= 1, or -1 for the remaining devices")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {sizes}")


def _check_train(t: TrainConfig) -> None:
    PARAM_GROUPS = names.PARAM_GROUPS

    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size = {t.batch_size} is not divisible by train.grad_accum = "
                          f"{t.grad_accum}")
    allowed = ", ".join(PARAM_GROUPS)
    for key in ("freeze", "train_only"):
        for g in getattr(t, key):
            if g not in PARAM_GROUPS:
                raise ConfigError(f"train.{key} names an unknown parameter group {g!r}; allowed: {allowed}")
    for item in t.lr_multipliers:
        group, _, value = item.partition("=")
        try:
            ok = group.strip() in PARAM_GROUPS and math.isfinite(float(value)) and float(value) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"train.lr_multipliers item {item!r} must be GROUP=FACTOR with a factor >= 0 "
                              f"and GROUP one of: {allowed}")


def check_expert_parallel(e: MoEConfig, expert: int, tensor: int) -> None:
    """Expert-parallel exchange options against the mesh's expert and tensor axis sizes (-1 =
    not known before the devices are counted: checked again on the resolved mesh)."""
    g = e.a2a_local_size
    if g and expert > 0 and expert % g:
        raise ConfigError(f"model.moe.a2a_local_size = {g} must divide mesh.expert = {expert} "
                          "(devices per node along the expert axis; 0 = flat all-to-all)")
    if e.drop_duplicate_tokens and tensor == 1:
        raise ConfigError("model.moe.drop_duplicate_tokens = true needs tensor parallelism (mesh.tensor > 1): "
                          "without it no token is duplicated")


def validate(cfg: Config) -> None:
    """Raise `ConfigError` naming the first bad setting."""
    _check_fields(cfg, "")
    _check_model(cfg.model)
    _check_train(cfg.train)
    _check_mesh(cfg.mesh)
    check_expert_parallel(cfg.model.moe, cfg.mesh.expert, cfg.mesh.tensor)
