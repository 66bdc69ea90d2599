"""Hugging Face checkpoints <-> moejax models, without torch.

    model, cfg = from_pretrained("path/to/hf_dir")            # config.json + *.safetensors
    to_pretrained(model, cfg, "path/to/out")                  # loads in transformers' AutoModelForCausalLM

Supported `model_type`s are the entries of `FAMILIES` (moejax.interop.hf_config): each is a `Family`
with two small functions, `read` (config.json -> the moejax `model` section) and `write` (the
reverse), and the tensor names of its MoE block. The tensor mapping (`tensor_map`, here) is shared by
all families:

    HF (nn.Linear weight [out, in])          moejax (x @ W, [in, out], heads split out)
    model.embed_tokens.weight [V, D]         embed [V, D]
    lm_head.weight [V, D]                    head [D, V]               (absent when tied)
    model.norm.weight                        final_norm/scale
    layers.i.input_layernorm / post_attention_layernorm   blocks/i/attn_norm, ffn_norm /scale
    self_attn.{q,k,v}_proj [H*hd, D]         attn/wq [D, H, hd], wk / wv [D, KV, hd]; .bias -> bq/bk/bv
    self_attn.o_proj [D, H*hd]               attn/wo [H, hd, D]
    self_attn.{q,k}_norm                     attn/q_norm, k_norm /scale            (OLMoE)
    MLA: q_proj | q_a_proj, q_a_layernorm, q_b_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
                                             attn/wq | wq_a, q_a_norm, wq_b; wkv_a, kv_a_norm, wkv_b
    mlp.{gate,up,down}_proj                  ffn/w_gate, w_up [D, F], w_down [F, D]
    <moe>.gate.weight [E, D]                 ffn/router [D, E]
    <moe>.gate.e_score_correction_bias       ffn/router_bias [E]                   (DeepSeek-V3)
    <moe>.experts.j.<gate|up|down>           ffn/w_gate, w_up [E, D, F], w_down [E, F, D] (stacked)
    <moe>.<shared>.{gate,up,down}_proj       ffn/shared/w_gate, w_up, w_down
    <moe>.shared_expert_gate.weight [1, D]   ffn/shared_gate [D, 1]                (Qwen2-MoE)

Every step is a transpose and a reshape, so export(import(x)) gives back x bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from moejax.config import Config, ModelConfig
from moejax.errors import UserError
from moejax.interop import safetensors_io
# The config side, re-exported: families, read_config, export-family choice.
from moejax.interop.hf_config import (EXPORT_ORDER, FAMILIES, Family, MoENames, family,
                                      infer_model_type, misfit, read_config)
from moejax.registry import Registry

# ----------------------------------------------------------------------------------------------
# Tensor names and layouts.

COPY, FLAT = "copy", "flat"


class Tensor(NamedTuple):
    """One moejax variable and the HF tensor(s) holding it. layout: COPY (same array), FLAT (HF keeps
    it as a vector), or an int n: a linear weight whose first n moejax dims are its input (HF [out,
    in]). `stacked`: one HF tensor per expert, stacked on the first moejax dim."""
    path: tuple
    hf: tuple[str, ...]
    layout: str | int
    stacked: bool = False


def _row(path: str, hf: str, layout: str | int) -> Tensor:
    return Tensor(tuple(path.split("/")), (hf,), layout)


ATTENTION_TENSORS: Registry[Callable[[ModelConfig], list[Tensor]]] = Registry("attention mapping")


@ATTENTION_TENSORS.register("gqa")
def _gqa_tensors(m: ModelConfig) -> list[Tensor]:
    a = "self_attn."
    rows = [_row("attn/wq", a + "q_proj.weight", 1), _row("attn/wk", a + "k_proj.weight", 1),
            _row("attn/wv", a + "v_proj.weight", 1), _row("attn/wo", a + "o_proj.weight", 2)]
    if m.qkv_bias:
        rows += [_row(f"attn/b{x}", f"{a}{x}_proj.bias", FLAT) for x in "qkv"]
    if m.qk_norm:
        rows += [_row(f"attn/{x}_norm/scale", f"{a}{x}_norm.weight", COPY) for x in "qk"]
    return rows


@ATTENTION_TENSORS.register("mla")
def _mla_tensors(m: ModelConfig) -> list[Tensor]:
    a = "self_attn."
    if m.mla.q_lora_rank is None:
        rows = [_row("attn/wq", a + "q_proj.weight", 1)]
    else:
        rows = [_row("attn/wq_a", a + "q_a_proj.weight", 1),
                _row("attn/q_a_norm/scale", a + "q_a_layernorm.weight", COPY),
                _row("attn/wq_b", a + "q_b_proj.weight", 1)]
    return rows + [_row("attn/wkv_a", a + "kv_a_proj_with_mqa.weight", 1),
                   _row("attn/kv_a_norm/scale", a + "kv_a_layernorm.weight", COPY),
                   _row("attn/wkv_b", a + "kv_b_proj.weight", 1), _row("attn/wo", a + "o_proj.weight", 2)]


def _swiglu_tensors(path: str, hf: str) -> list[Tensor]:
    return [_row(f"{path}/w_gate", f"{hf}.gate_proj.weight", 1),
            _row(f"{path}/w_up", f"{hf}.up_proj.weight", 1),
            _row(f"{path}/w_down", f"{hf}.down_proj.weight", 1)]


def _moe_tensors(m: ModelConfig, names: MoENames, num_experts: int) -> list[Tensor]:
    b = names.block
    rows = [_row("ffn/router", f"{b}.gate.weight", 1)]
    if names.router_bias:
        rows.append(_row("ffn/router_bias", f"{b}.gate.e_score_correction_bias", COPY))
    for ours, theirs in zip(("w_gate", "w_up", "w_down"), names.experts):
        hf = tuple(f"{b}.experts.{j}.{theirs}.weight" for j in range(num_experts))
        rows.append(Tensor(("ffn", ours), hf, 1, stacked=True))
    if m.moe.num_shared_experts:
        rows += _swiglu_tensors("ffn/shared", f"{b}.{names.shared}")
        if m.moe.shared_gate:
            rows.append(_row("ffn/shared_gate", f"{b}.shared_expert_gate.weight", 1))
    return rows


def tensor_map(m: ModelConfig, names: MoENames) -> list[Tensor]:
    """Every moejax variable that a Hugging Face checkpoint holds, with its HF names and layout."""
    rows = [_row("embed", "model.embed_tokens.weight", COPY),
            _row("final_norm/scale", "model.norm.weight", COPY)]
    if not m.tie_embeddings:
        rows.append(_row("head", "lm_head.weight", 1))
    if m.attention not in ATTENTION_TENSORS:
        raise UserError(f"model.attention = {m.attention!r} has no Hugging Face layout")
    moe_index = 0
    for i in range(m.n_layers):
        block = [_row("attn_norm/scale", "input_layernorm.weight", COPY),
                 _row("ffn_norm/scale", "post_attention_layernorm.weight", COPY)]
        block += ATTENTION_TENSORS.get(m.attention)(m)
        if m.is_moe_layer(i):
            block += _moe_tensors(m, names, m.moe.experts_of(moe_index))
            moe_index += 1
        else:
            block += _swiglu_tensors("ffn", "mlp")
        rows += [Tensor(("blocks", i) + t.path, tuple(f"model.layers.{i}.{n}" for n in t.hf), t.layout,
                        t.stacked) for t in block]
    return rows


def _from_hf(t: Tensor, name: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if t.layout == COPY:
        want = shape
    elif t.layout == FLAT:
        want = (math.prod(shape),)
    else:
        want = (math.prod(shape[t.layout:]), math.prod(shape[:t.layout]))
    if tuple(a.shape) != want:
        raise UserError(f"tensor {name!r} has shape {list(a.shape)} but config.json implies {list(want)}")
    a = a.astype(np.float32)
    return a.T.reshape(shape) if isinstance(t.layout, int) else a.reshape(shape)


def _to_hf(t: Tensor, v: np.ndarray) -> np.ndarray:
    if t.layout == COPY:
        return v
    if t.layout == FLAT:
        return v.reshape(-1)
    return v.reshape(math.prod(v.shape[:t.layout]), -1).T


# ----------------------------------------------------------------------------------------------
# Loading and saving.


def _ignorable(name: str, n_layers: int) -> bool:
    """Tensors a checkpoint may hold that the model does not use: cached RoPE tables, and layers past
    num_hidden_layers (DeepSeek-V3's multi-token-prediction layer, as transformers skips it)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    return layer is not None and int(layer.group(1)) >= n_layers


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; a Hugging Face checkpoint directory has a config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def from_pretrained(path: str | os.PathLike, overrides: Sequence[str] = (), *,
                    base: dict | None = None) -> tuple[Any, Config]:
    """Load a Hugging Face checkpoint directory (config.json + safetensors, single or sharded) as a
    moejax `Transformer` with float32 parameters. `overrides` are `--set` style settings applied to
    the mapped config (e.g. `model.moe.dispatch=dense`, `train.dtype=bfloat16`); `base` gives the
    config's other sections (data, train, mesh) as a nested dict."""
    from moejax.model import Transformer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UserError(f"{path!r} is not a directory (a Hugging Face checkpoint directory is needed)")
    hf = _read_json(os.path.join(path, "config.json"))
    cfg = read_config(hf, overrides, base)
    names = family(hf.get("model_type")).moe
    reader = safetensors_io.Reader(path)
    try:
        abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0),
                                                      dtype=jnp.dtype(cfg.train.dtype)))
        graphdef, state = nnx.split(abstract)
        flat = dict(nnx.to_flat_state(state))
        used = set()
        for t in tensor_map(cfg.model, names):
            if t.path not in flat:
                raise UserError(f"the model has no parameter {'/'.join(map(str, t.path))} for {t.hf[0]!r} "
                                "(did an override change the architecture?)")
            var = flat[t.path]
            shape = var.shape
            arrays = [_from_hf(t, n, reader.get(n), shape[1:] if t.stacked else shape) for n in t.hf]
            value = np.stack(arrays) if t.stacked else arrays[0]
            flat[t.path] = var.replace(jnp.asarray(value))
            used.update(t.hf)
        extra = [k for k in reader.keys() if k not in used and not _ignorable(k, cfg.model.n_layers)]
    finally:
        reader.close()
    if extra:
        raise UserError(f"{path!r} holds tensors that a {hf['model_type']} model of this config.json does "
                        f"not have: {', '.join(sorted(extra)[:5])}{' ...' if len(extra) > 5 else ''}")
    for p, var in flat.items():
        if isinstance(var.get_value(), jax.ShapeDtypeStruct):
            if p[-1] != "router_bias":
                raise UserError(f"the checkpoint has nothing for parameter {'/'.join(map(str, p))} "
                                "(added by an override?)")
            flat[p] = var.replace(jnp.zeros(var.shape, var.dtype))
    model = nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))
    return model, cfg


EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def hf_tensors(model: Any, m: ModelConfig, model_type: str, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The Hugging Face tensors of `model` (a moejax Transformer) for `model_type`."""
    names = family(model_type).moe
    flat = {p: v for p, v in nnx.to_flat_state(nnx.state(model))}
    out: dict[str, np.ndarray] = {}
    covered = set()
    for t in tensor_map(m, names):
        value = np.asarray(jax.device_get(flat[t.path].get_value()), np.float32)
        parts = list(value) if t.stacked else [value]
        for name, part in zip(t.hf, parts):
            out[name] = np.ascontiguousarray(_to_hf(t, part)).astype(EXPORT_DTYPES[dtype])
        covered.add(t.path)
    for p, var in flat.items():
        if p in covered:
            continue
        if p[-1] == "router_bias" and not np.any(np.asarray(var.get_value())):
            continue  # an unused (all-zero) selection bias: the family's router has none
        raise UserError(f"parameter {'/'.join(map(str, p))} has no {model_type} equivalent")
    return out


def to_pretrained(model: Any, cfg: Config | ModelConfig, path: str | os.PathLike, *,
                  model_type: str | None = None, dtype: str = "float32",
                  max_shard_size: int | str = "5GB", extra: dict | None = None) -> str:
    """Write `model` as a Hugging Face checkpoint directory: config.json and model.safetensors, or
    shards of at most `max_shard_size` plus model.safetensors.index.json. The family is the first of
    `EXPORT_ORDER` that represents the model exactly, unless `model_type` names one. `extra` adds
    config.json entries (e.g. bos_token_id, eos_token_id). Returns the model_type written."""
    m = cfg.model if isinstance(cfg, Config) else cfg
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"export dtype {dtype!r} is not allowed; allowed: {', '.join(EXPORT_DTYPES)}")
    if model_type is None:
        model_type = infer_model_type(m)
    else:
        bad = misfit(m, model_type)
        if bad:
            raise UserError(f"model_type {model_type!r} cannot represent this model: {'; '.join(bad[:3])}")
    fam = family(model_type)
    tensors = hf_tensors(model, m, model_type, dtype)
    path = os.fspath(path)
    safetensors_io.write(path, tensors, max_shard_size)
    hf = {"architectures": [fam.architecture], "model_type": model_type, **fam.write(m),
          "torch_dtype": dtype, "use_cache": True, **(extra or {})}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    return model_type


__all__ = ["EXPORT_DTYPES", "EXPORT_ORDER", "FAMILIES", "Family", "MoENames", "Tensor", "family",
           "from_pretrained", "hf_tensors", "infer_model_type", "misfit", "read_config", "tensor_map",
           "to_pretrained"]
