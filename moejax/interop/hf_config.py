"""Hugging Face config.json <-> the moejax `model` section, one small pair of functions per family.

`FAMILIES` maps a `model_type` to a `Family`: `read` (config.json dict -> nested moejax `model` dict),
`write` (moejax `ModelConfig` -> the family's config.json entries) and the names of its MoE tensors.
A family can export a moejax model when its write followed by its read gives the model's config
back (`misfit` lists what differs); `infer_model_type` takes the first such family of `EXPORT_ORDER`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

from moejax import config as config_lib
from moejax.config import Config, MLAConfig, ModelConfig, MoEConfig, RopeScalingConfig
from moejax.errors import ConfigError, UserError
from moejax.registry import Registry

# ----------------------------------------------------------------------------------------------
# Families: config.json <-> the moejax `model` section.


class MoENames(NamedTuple):
    """Where a family keeps its MoE block's tensors (relative to `model.layers.i.`)."""
    block: str = "mlp"                                   # Mixtral: block_sparse_moe
    experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # Mixtral: w1, w3, w2
    shared: str = "shared_experts"                       # Qwen2-MoE: shared_expert
    router_bias: bool = False                            # DeepSeek-V3: gate.e_score_correction_bias


class Family(NamedTuple):
    architecture: str                         # config.json "architectures"
    read: Callable[[dict], dict]              # HF config -> moejax `model` section (nested dict)
    write: Callable[[ModelConfig], dict]      # moejax model config -> family-specific HF entries
    moe: MoENames = MoENames()


FAMILIES: Registry[Callable[[], Family]] = Registry("Hugging Face model_type")

# MoE settings that change training, not the function the weights compute; ignored when deciding
# whether a Hugging Face family can represent a moejax model.
MOE_TRAINING_KEYS = ("dispatch", "capacity_factor", "aux_loss_coef", "z_loss_coef", "gmm", "tile_size",
                     "bias_update_rate", "seq_aux_loss_coef", "device_loss_coef", "device_groups",
                     "importance_loss_coef", "load_loss_coef")


def _need(hf: dict, key: str) -> Any:
    if hf.get(key) is None:
        raise UserError(f"config.json (model_type {hf.get('model_type')!r}) has no {key!r}")
    return hf[key]


def _refuse(hf: dict, key: str, ok: Callable[[Any], bool], why: str) -> None:
    if key in hf and not ok(hf[key]):
        raise UserError(f"config.json: {key} = {hf[key]!r} is not supported ({why})")


def _read_rope(hf: dict) -> dict:
    """RoPE base and scaling, from transformers 5's `rope_parameters` or the older `rope_theta` +
    `rope_scaling` (both filled in as transformers' standardize_rope_params does)."""
    from moejax.model.attention import ROPE_SCALINGS

    p = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = p.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise UserError(f"config.json: rope type {kind!r} is not supported; supported: "
                        f"{', '.join(ROPE_SCALINGS.names())}")
    if p.get("partial_rotary_factor", hf.get("partial_rotary_factor")) not in (None, 1, 1.0):
        raise UserError("config.json: partial_rotary_factor != 1 is not supported")
    out: dict[str, Any] = {"type": kind}
    if kind != "default":
        orig = (p.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                or hf.get("max_position_embeddings"))
        factor = p.get("factor") or _need(hf, "max_position_embeddings") / orig
        out.update(factor=float(factor), original_max_position_embeddings=orig)
        for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale",
                    "mscale_all_dim", "attention_factor", "truncate"):
            if p.get(key) is not None:
                out[key] = p[key]
    return {"rope_theta": float(theta), "rope_scaling": out}


def _write_rope(m: ModelConfig) -> dict:
    """The older `rope_theta` + `rope_scaling` keys, which transformers 4 and 5 both read."""
    rs = m.rope_scaling
    if rs.type == "default":
        return {"rope_theta": m.rope_theta, "rope_scaling": None,
                "max_position_embeddings": 4096}
    keys = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                     "mscale_all_dim", "attention_factor", "truncate")}[rs.type]
    scaling = {"rope_type": rs.type, **{k: getattr(rs, k) for k in keys if getattr(rs, k) is not None}}
    longest = int((rs.original_max_position_embeddings or 4096) * rs.factor)
    return {"rope_theta": m.rope_theta, "rope_scaling": scaling, "max_position_embeddings": longest}


def _read_common(hf: dict) -> dict:
    _refuse(hf, "hidden_act", lambda v: v == "silu", "moejax's FFNs are SwiGLU, hidden_act silu")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise UserError(f"config.json: quantized checkpoints ({method}) are not supported; use a "
                        "bfloat16/float32 checkpoint")
    d, h = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    return {"vocab_size": _need(hf, "vocab_size"), "d_model": d, "n_layers": _need(hf, "num_hidden_layers"),
            "n_heads": h, "n_kv_heads": hf.get("num_key_value_heads") or h,
            "head_dim": head_dim if head_dim and head_dim * h != d else None,
            "d_ff": _need(hf, "intermediate_size"), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), **_read_rope(hf),
            "moe": {"num_experts": 0}}


def _write_common(m: ModelConfig) -> dict:
    return {"vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
            "head_dim": m.resolved_head_dim, "intermediate_size": m.d_ff, "rms_norm_eps": m.norm_eps,
            "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", **_write_rope(m)}


def _no_attention_bias(hf: dict) -> None:
    _refuse(hf, "attention_bias", lambda v: not v, "biases on all four attention projections")
    _refuse(hf, "mlp_bias", lambda v: not v, "biases in the FFN")


@FAMILIES.register("llama")
def _llama() -> Family:
    def read(hf):
        _no_attention_bias(hf)
        return _read_common(hf)

    def write(m):
        return {**_write_common(m), "attention_bias": False, "mlp_bias": False}
    return Family("LlamaForCausalLM", read, write)


def _read_window(hf: dict) -> dict:
    return {"sliding_window": hf.get("sliding_window") or None}


@FAMILIES.register("mistral")
def _mistral() -> Family:
    def read(hf):
        return {**_read_common(hf), **_read_window(hf)}

    def write(m):
        return {**_write_common(m), "sliding_window": m.sliding_window}
    return Family("MistralForCausalLM", read, write)


@FAMILIES.register("mixtral")
def _mixtral() -> Family:
    def read(hf):
        moe = {"num_experts": _need(hf, "num_local_experts"), "top_k": _need(hf, "num_experts_per_tok"),
               "d_expert": _need(hf, "intermediate_size"), "router": "topk", "renormalize": True}
        return {**_read_common(hf), **_read_window(hf), "moe": moe}

    def write(m):
        e = m.moe
        return {**_write_common(m), "intermediate_size": e.d_expert, "num_local_experts": e.num_experts,
                "num_experts_per_tok": e.top_k, "sliding_window": m.sliding_window}
    return Family("MixtralForCausalLM", read, write, MoENames("block_sparse_moe", ("w1", "w3", "w2")))


@FAMILIES.register("qwen2_moe")
def _qwen2_moe() -> Family:
    def read(hf):
        _refuse(hf, "use_sliding_window", lambda v: not v, "per-layer sliding windows")
        dense_first = list(hf.get("mlp_only_layers") or [])
        if dense_first != list(range(len(dense_first))):
            raise UserError(f"config.json: mlp_only_layers = {dense_first} is not supported (only the "
                            "first K layers can be dense)")
        shared = hf.get("shared_expert_intermediate_size") or 0
        moe = {"num_experts": _need(hf, "num_experts"), "top_k": _need(hf, "num_experts_per_tok"),
               "d_expert": _need(hf, "moe_intermediate_size"), "router": "topk",
               "renormalize": bool(hf.get("norm_topk_prob", False)),
               "num_shared_experts": 1 if shared else 0, "d_shared": shared or None,
               "shared_gate": bool(shared), "every": hf.get("decoder_sparse_step", 1),
               "first_dense": len(dense_first)}
        # Qwen1.5-MoE configs predate the qkv_bias key; their attention always had the biases.
        return {**_read_common(hf), "qkv_bias": bool(hf.get("qkv_bias", True)), "moe": moe}

    def write(m):
        e = m.moe
        return {**_write_common(m), "num_experts": e.num_experts, "num_experts_per_tok": e.top_k,
                "moe_intermediate_size": e.d_expert,
                "shared_expert_intermediate_size": e.num_shared_experts * (e.d_shared or e.d_expert),
                "norm_topk_prob": e.renormalize, "decoder_sparse_step": e.every,
                "mlp_only_layers": list(range(e.first_dense)), "qkv_bias": m.qkv_bias,
                "use_sliding_window": False}
    return Family("Qwen2MoeForCausalLM", read, write, MoENames(shared="shared_expert"))


@FAMILIES.register("olmoe")
def _olmoe() -> Family:
    def read(hf):
        _no_attention_bias(hf)
        _refuse(hf, "clip_qkv", lambda v: v is None, "clipping of q, k, v")
        moe = {"num_experts": _need(hf, "num_experts"), "top_k": _need(hf, "num_experts_per_tok"),
               "d_expert": _need(hf, "intermediate_size"), "router": "topk",
               "renormalize": bool(hf.get("norm_topk_prob", False))}
        common = {**_read_common(hf), "head_dim": None}  # OLMoE's q/k norms assume d_model = H * hd
        return {**common, "qk_norm": True, "moe": moe}

    def write(m):
        e = m.moe
        out = {**_write_common(m), "intermediate_size": e.d_expert, "num_experts": e.num_experts,
               "num_experts_per_tok": e.top_k, "norm_topk_prob": e.renormalize, "attention_bias": False,
               "clip_qkv": None}
        out.pop("head_dim")
        return out
    return Family("OlmoeForCausalLM", read, write)


@FAMILIES.register("deepseek_v3")
def _deepseek_v3() -> Family:
    def read(hf):
        _refuse(hf, "attention_bias", lambda v: not v, "biases on the MLA projections")
        _refuse(hf, "topk_method", lambda v: v == "noaux_tc", "only noaux_tc routing")
        _refuse(hf, "scoring_func", lambda v: v == "sigmoid", "only sigmoid router scores")
        h = _need(hf, "num_attention_heads")
        mla = {k: _need(hf, k)
               for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")}
        mla.update(q_lora_rank=hf.get("q_lora_rank"), rope_interleave=bool(hf.get("rope_interleave", True)))
        moe = {"num_experts": _need(hf, "n_routed_experts"), "top_k": _need(hf, "num_experts_per_tok"),
               "d_expert": _need(hf, "moe_intermediate_size"), "router": "deepseek",
               "renormalize": bool(hf.get("norm_topk_prob", True)),
               "num_shared_experts": hf.get("n_shared_experts") or 0,
               "n_group": hf.get("n_group") or 1, "topk_group": hf.get("topk_group") or 1,
               "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
               "first_dense": hf.get("first_k_dense_replace", 0)}
        return {**_read_common(hf), "attention": "mla", "n_kv_heads": h, "head_dim": None, "mla": mla,
                "moe": moe}

    def write(m):
        e, a = m.moe, m.mla
        shared = e.num_shared_experts * (e.d_shared or e.d_expert)
        return {**_write_common(m), "num_key_value_heads": m.n_heads, "head_dim": a.qk_rope_head_dim,
                "q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank,
                "qk_rope_head_dim": a.qk_rope_head_dim, "qk_nope_head_dim": a.qk_nope_head_dim,
                "v_head_dim": a.v_head_dim, "rope_interleave": a.rope_interleave, "attention_bias": False,
                "n_routed_experts": e.num_experts, "num_experts_per_tok": e.top_k,
                "moe_intermediate_size": e.d_expert, "n_shared_experts": shared // e.d_expert,
                "n_group": e.n_group, "topk_group": e.topk_group,
                "routed_scaling_factor": e.routed_scaling_factor, "norm_topk_prob": e.renormalize,
                "first_k_dense_replace": e.first_dense, "topk_method": "noaux_tc",
                "scoring_func": "sigmoid"}
    return Family("DeepseekV3ForCausalLM", read, write, MoENames(router_bias=True))


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise UserError(f"model_type {model_type!r} is not supported; supported: "
                        f"{', '.join(FAMILIES.names())}")
    return FAMILIES.get(model_type)()


def read_config(hf: dict, overrides: Sequence[str] = (), base: dict | None = None) -> Config:
    """The moejax `Config` of a Hugging Face config.json dict, with the other sections from `base` (a
    nested dict; defaults when absent) and `--set` style overrides (e.g. `model.moe.dispatch=dense`)
    applied on top."""
    data = {**(base or {}), "model": family(hf.get("model_type")).read(hf)}
    for o in overrides:
        config_lib.apply_override(data, o)
    try:
        return config_lib.from_dict(data)
    except ConfigError as e:
        raise UserError(f"config.json maps to an invalid moejax config: {e}") from None


# ----------------------------------------------------------------------------------------------
# Which family can represent a moejax model: the one whose write -> read gives the model back.


def _canonical(m: ModelConfig) -> dict:
    """The model config with settings that do not change the computed function normalised: MoE
    training knobs, fields of unused parts, and n shared experts of width F as one of width n*F."""
    e = m.moe
    if e.num_experts == 0:
        e = MoEConfig(num_experts=0)
    else:
        e = dataclasses.replace(e, **{k: getattr(MoEConfig(), k) for k in MOE_TRAINING_KEYS})
        shared = e.num_shared_experts * (e.d_shared or e.d_expert)
        e = dataclasses.replace(e, num_shared_experts=int(shared > 0), d_shared=shared or None,
                                shared_gate=e.shared_gate and shared > 0)
        if e.router != "deepseek":
            e = dataclasses.replace(e, n_group=1, topk_group=1)
    mla = m.attention == "mla"
    m = dataclasses.replace(
        m, moe=e, init_std=ModelConfig().init_std,
        d_ff=m.d_ff if any(not m.is_moe_layer(i) for i in range(m.n_layers)) else 0,
        n_kv_heads=m.n_heads if mla else m.n_kv_heads, head_dim=None if mla else m.resolved_head_dim,
        mla=m.mla if mla else MLAConfig(),
        attn_expert_scale=m.attn_expert_scale if m.attn_experts else 1.0,
        attn_top_k=m.attn_top_k if m.attn_experts else 1,
        rope_scaling=m.rope_scaling if m.rope_scaling.type != "default" else RopeScalingConfig())
    return _flat(dataclasses.asdict(m))


def _flat(d: dict, prefix: str = "model.") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def misfit(m: ModelConfig, model_type: str) -> list[str]:
    """What `model_type` cannot represent of `m`: ["model.key = ours (model_type gives theirs)", ...]."""
    fam = family(model_type)
    try:
        back = config_lib.from_dict({"model": fam.read({"model_type": model_type, **fam.write(m)})}).model
    except (UserError, KeyError, ZeroDivisionError) as e:
        return [str(e)]
    ours, theirs = _canonical(m), _canonical(back)
    return [f"{k} = {ours[k]!r} ({model_type} gives {theirs.get(k)!r})" for k in ours
            if ours[k] != theirs.get(k)]


# Tried in this order: the first family that represents the model exactly is the export format.
EXPORT_ORDER = ("llama", "mistral", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3")


def infer_model_type(m: ModelConfig) -> str:
    fits = {name: misfit(m, name) for name in EXPORT_ORDER}
    for name in EXPORT_ORDER:
        if not fits[name]:
            return name
    near = min(EXPORT_ORDER, key=lambda n: len(fits[n]))
    raise UserError(f"no Hugging Face family ({', '.join(FAMILIES.names())}) represents this model; the "
                    f"nearest, {near}, differs in {'; '.join(fits[near][:3])}")
