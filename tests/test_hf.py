"""Hugging Face interop against fixtures made by transformers (tests/make_hf_fixtures.py; no torch here).

Each fixture is a tiny random transformers model of one family with its input ids and transformers'
float32 logits. moejax must reproduce the logits, and export exactly the tensors transformers saved
(the fixture script checks that transformers reproduces its logits from moejax's export).
"""
import functools
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from moejax.errors import UserError
from moejax.interop import hf, safetensors_io
from moejax.model import Transformer
from tests.conftest import tiny_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ["llama", "mistral", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3"]
MOE = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"]


@functools.lru_cache(maxsize=None)
def load(family, *overrides):
    return hf.from_pretrained(os.path.join(FIXTURES, family), overrides)


def reference(family):
    d = os.path.join(FIXTURES, family)
    return np.load(os.path.join(d, "input_ids.npy")), np.load(os.path.join(d, "logits.npy"))


@jax.jit
def forward(model, ids):
    return model(ids)[0]


def flat_params(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_every_supported_family_has_a_fixture():
    assert hf.FAMILIES.names() == sorted(FAMILIES)
    versions = json.load(open(os.path.join(FIXTURES, "versions.json")))
    assert versions["transformers"]


@pytest.mark.parametrize("family, dispatch",
                         [(f, "dense") for f in FAMILIES] + [(f, "dropless") for f in MOE])
def test_logits_match_transformers(family, dispatch):
    model, cfg = load(family, f"model.moe.dispatch={dispatch}")
    ids, ref = reference(family)
    logits = np.asarray(forward(model, ids))
    assert ref.std() > 0.5  # the fixture's logits are far from flat
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, override", [
    ("llama", "model.rope_scaling.type=default"),        # llama3 rope scaling is in use
    ("mistral", "model.sliding_window=null"),            # the window is shorter than the inputs
    ("deepseek_v3", "model.rope_scaling.type=default"),  # yarn (frequencies and softmax mscale)
])
def test_each_family_option_changes_the_logits(family, override):
    model, _ = load(family, override)
    ids, ref = reference(family)
    assert np.max(np.abs(np.asarray(forward(model, ids)) - ref)) > 0.1


def test_config_mapping():
    m = load("deepseek_v3")[1].model
    assert (m.attention, m.moe.router, m.moe.n_group, m.moe.topk_group, m.moe.first_dense) == \
        ("mla", "deepseek", 2, 1, 1)
    assert (m.moe.routed_scaling_factor, m.mla.q_lora_rank, m.rope_scaling.type) == (2.5, 24, "yarn")
    q = load("qwen2_moe")[1].model
    assert (q.qkv_bias, q.moe.shared_gate, q.moe.d_shared, q.moe.every, q.moe.renormalize) == \
        (True, True, 48, 2, False)
    assert load("llama")[1].model.tie_embeddings and load("olmoe")[1].model.qk_norm
    assert load("mistral")[1].model.sliding_window == 5 and load("mistral")[1].model.head_dim == 24
    assert any(float(np.abs(b.ffn.router_bias[...]).max()) > 0 for b in load("deepseek_v3")[0].blocks
               if b.is_moe)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_exactly_the_fixture_tensors(family):
    model, cfg = load(family)
    assert hf.infer_model_type(cfg.model) == family
    ours = hf.hf_tensors(model, cfg.model, family)
    reader = safetensors_io.Reader(os.path.join(FIXTURES, family))
    try:
        assert sorted(ours) == sorted(reader.keys())
        for name, value in ours.items():
            theirs = reader.get(name)
            assert value.dtype == theirs.dtype and value.shape == theirs.shape, name
            np.testing.assert_array_equal(value, theirs, err_msg=name)
    finally:
        reader.close()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_round_trip_is_exact_and_writes_shards(family, tmp_path):
    model, cfg = load(family)
    assert hf.to_pretrained(model, cfg, tmp_path, max_shard_size="100KB") == family
    index = json.load(open(tmp_path / safetensors_io.INDEX))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / safetensors_io.SINGLE).exists()
    assert all(os.path.getsize(tmp_path / f) < 100_000 + 50_000 for f in files)
    back, cfg2 = hf.from_pretrained(tmp_path)
    assert cfg2 == cfg
    a, b = flat_params(model), flat_params(back)
    assert a.keys() == b.keys()
    for p in a:
        np.testing.assert_array_equal(a[p], b[p], err_msg=str(p))
    # A second export into the same directory, now as one file, leaves no stale shards behind.
    hf.to_pretrained(back, cfg2, tmp_path)
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == [safetensors_io.SINGLE]


def test_bfloat16_export_is_the_rounded_weights(tmp_path):
    model, cfg = load("olmoe")
    hf.to_pretrained(model, cfg, tmp_path, dtype="bfloat16")
    r = safetensors_io.Reader(str(tmp_path))
    assert str(r.get("model.embed_tokens.weight").dtype) == "bfloat16"
    r.close()
    assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"
    back, _ = hf.from_pretrained(tmp_path)
    a, b = flat_params(model), flat_params(back)
    for p in a:
        np.testing.assert_array_equal(a[p].astype(ml_dtypes.bfloat16).astype(np.float32), b[p])


def test_export_picks_the_family_or_refuses():
    dense = tiny_config("model.moe.num_experts=0").model
    assert hf.infer_model_type(dense) == "llama"
    windowed = tiny_config("model.moe.num_experts=0", "model.sliding_window=8").model
    assert hf.infer_model_type(windowed) == "mistral"
    assert hf.infer_model_type(tiny_config().model) == "mixtral"
    olmoe_like = tiny_config("model.moe.renormalize=false", "model.qk_norm=true").model
    assert hf.infer_model_type(olmoe_like) == "olmoe"
    with pytest.raises(UserError, match="model_type 'mixtral' cannot represent this model: model.d_ff"):
        hf.to_pretrained(None, dense, "/nonexistent", model_type="mixtral")
    experts = tiny_config("model.attn_experts=2").model
    with pytest.raises(UserError, match="no Hugging Face family.*attn_experts"):
        hf.infer_model_type(experts)


def test_unrepresentable_parameter_is_refused(tmp_path):
    cfg = tiny_config().model  # a Mixtral-like model whose (ones-filled) selection bias is in use
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, jax.tree.map(lambda x: np.ones(x.shape, np.float32), state))
    with pytest.raises(UserError, match="parameter blocks/0/ffn/router_bias has no mixtral equivalent"):
        hf.to_pretrained(model, tiny_config().model, tmp_path)


def copy_fixture(family, dst):
    shutil.copytree(os.path.join(FIXTURES, family), dst)
    return dst


def edit_config(d, **changes):
    cfg = json.load(open(d / "config.json"))
    cfg.update(changes)
    json.dump(cfg, open(d / "config.json", "w"))


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        hf.from_pretrained(tmp_path / "missing")
    with pytest.raises(UserError, match="config.json does not exist"):
        hf.from_pretrained(tmp_path)
    d = copy_fixture("llama", tmp_path / "gpt2")
    edit_config(d, model_type="gpt2")
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported; supported: deepseek_v3, "
                                        "llama, mistral, mixtral, olmoe, qwen2_moe"):
        hf.from_pretrained(d)
    d = copy_fixture("llama", tmp_path / "act")
    edit_config(d, hidden_act="gelu")
    with pytest.raises(UserError, match="hidden_act = 'gelu' is not supported"):
        hf.from_pretrained(d)
    d = copy_fixture("llama", tmp_path / "noweights")
    os.remove(d / "model.safetensors")
    with pytest.raises(UserError, match="has neither model.safetensors nor model.safetensors.index.json"):
        hf.from_pretrained(d)
    d = copy_fixture("llama", tmp_path / "shape")
    edit_config(d, intermediate_size=80)
    with pytest.raises(UserError, match="gate_proj.weight' has shape \\[96, 64\\] but config.json implies "
                                        "\\[80, 64\\]"):
        hf.from_pretrained(d)
    d = copy_fixture("llama", tmp_path / "untied")
    edit_config(d, tie_word_embeddings=False)
    with pytest.raises(UserError, match="tensor 'lm_head.weight' is missing"):
        hf.from_pretrained(d)
    d = copy_fixture("mixtral", tmp_path / "shard")
    os.remove(d / "model-00002-of-00004.safetensors")
    with pytest.raises(UserError, match="names 'model-00002-of-00004.safetensors', which does not exist"):
        hf.from_pretrained(d)
    d = copy_fixture("qwen2_moe", tmp_path / "nobias")
    edit_config(d, qkv_bias=False)
    with pytest.raises(UserError, match="holds tensors that a qwen2_moe model of this config.json does not "
                                        "have: model.layers.0.self_attn.k_proj.bias"):
        hf.from_pretrained(d)
    with pytest.raises(UserError, match="shard size 'lots'"):
        safetensors_io.parse_size("lots")
    assert safetensors_io.parse_size("1.5MB") == 1_500_000 and safetensors_io.parse_size("2KiB") == 2048
