"""Dense -> MoE conversions keep the dense model's function where the papers say they do."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config
from moejax.dense_to_moe import neuron_partition, split, split_attention, upcycle
from moejax.errors import UserError
from moejax.model import Transformer

DENSE = ["model.moe.num_experts=0", "model.n_layers=2", "model.vocab_size=48", "model.d_model=32",
         "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64", "model.init_std=0.2"]


@pytest.fixture(scope="module")
def dense():
    cfg = config.load(None, DENSE)
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    return cfg, nnx.split(model)[1].to_pure_dict()


def logits(cfg, params, toks):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
    return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, toks)


TOKS = jnp.asarray(np.random.default_rng(0).integers(0, 48, (2, 12)), jnp.int32)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_upcycled_model_reproduces_dense_logits_for_any_k(dense, k):
    cfg, params = dense
    want = logits(cfg, params, TOKS)
    moe_cfg, moe_params = upcycle(cfg, params, num_experts=4, top_k=k, router_std=0.5, seed=1)
    assert moe_cfg.model.moe.d_expert == cfg.model.d_ff and moe_cfg.model.moe.renormalize
    got = logits(moe_cfg, moe_params, TOKS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_upcycle_noise_makes_experts_differ(dense):
    cfg, params = dense
    _, p = upcycle(cfg, params, num_experts=4, top_k=2, noise_std=0.01)
    w = np.asarray(p["blocks"][0]["ffn"]["w_up"])
    assert not np.allclose(w[0], w[1])
    np.testing.assert_allclose(w[0], params["blocks"][0]["ffn"]["w_up"], atol=0.05 * np.abs(w).max())


@pytest.mark.parametrize("method", ["random", "cluster"])
def test_split_with_all_experts_zero_router_and_scale_e_reproduces_dense(dense, method):
    cfg, params = dense
    want = logits(cfg, params, TOKS)
    moe_cfg, moe_params = split(cfg, params, num_experts=4, top_k=4, method=method)
    assert moe_cfg.model.moe.d_expert == 16 and moe_cfg.model.moe.routed_scaling_factor == 4.0
    got = logits(moe_cfg, moe_params, TOKS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and with k < E the model is a different (sparser) function
    part_cfg, part_params = split(cfg, params, num_experts=4, top_k=2, method=method)
    assert not np.allclose(logits(part_cfg, part_params, TOKS), want, atol=1e-3)


def test_neuron_partitions_are_balanced_and_cover_every_neuron():
    w = np.random.default_rng(0).normal(size=(16, 64))
    for method in ["random", "cluster"]:
        idx = neuron_partition(w, 8, method)
        assert idx.shape == (8, 8)
        np.testing.assert_array_equal(np.sort(idx.reshape(-1)), np.arange(64))


def test_clustering_groups_similar_neurons():
    # Neurons made of 4 tight clusters: balanced k-means must recover them as experts.
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 16)) * 5
    members = np.repeat(np.arange(4), 8)
    w = (centers[members] + 0.1 * rng.normal(size=(32, 16))).T  # [d, d_ff]
    idx = neuron_partition(w, 4, "cluster", seed=3)
    for expert in idx:
        assert len(set(members[expert])) == 1


def test_split_attention_with_all_experts_reproduces_dense(dense):
    cfg, params = dense
    want = logits(cfg, params, TOKS)
    att_cfg, att_params = split_attention(cfg, params, num_experts=2, top_k=2)
    assert att_cfg.model.attn_experts == 2
    np.testing.assert_allclose(logits(att_cfg, att_params, TOKS), want, rtol=1e-5, atol=1e-5)


def test_bad_conversions_are_clear_errors(dense):
    cfg, params = dense
    with pytest.raises(UserError, match="not divisible"):
        split(cfg, params, num_experts=5, top_k=1)
    moe_cfg, moe_params = upcycle(cfg, params, num_experts=4, top_k=2)
    with pytest.raises(UserError, match="already an MoE"):
        upcycle(moe_cfg, moe_params, num_experts=4, top_k=2)
    with pytest.raises(UserError, match="allowed: random, cluster"):
        neuron_partition(np.ones((4, 8)), 2, "kmeans")


def test_convert_cli_upcycle_and_split_write_runs_with_the_dense_function(dense, tmp_path, capsys):
    import json

    from moejax import convert

    cfg, params = dense
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"example {i}"}) for i in range(20)) + "\n")
    cfg = config.load(None, DENSE + [f"data.source=jsonl:{data}", "data.seq_len=16"])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
    convert.save_run(nnx.merge(graphdef, state), cfg, str(tmp_path / "dense"))
    want = logits(cfg, params, TOKS)

    assert convert.main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "up"), "--experts", "4",
                         "--top-k", "2"]) == 0
    model, up_cfg = convert.load_run(str(tmp_path / "up"))
    assert up_cfg.model.moe.num_experts == 4 and up_cfg.train.workdir == str(tmp_path / "up")
    np.testing.assert_allclose(model(TOKS)[0], want, rtol=1e-5, atol=1e-5)

    assert convert.main(["split", str(tmp_path / "dense"), str(tmp_path / "split"), "--experts", "4",
                         "--top-k", "4", "--method", "cluster", "--set", "model.moe.every=2"]) == 0
    model, split_cfg = convert.load_run(str(tmp_path / "split"))
    assert split_cfg.model.moe.every == 2 and split_cfg.model.is_moe_layer(1)
    assert not split_cfg.model.is_moe_layer(0)
    np.testing.assert_allclose(model(TOKS)[0], want, rtol=1e-5, atol=1e-5)
    assert "fine-tune with: python -m moejax.train" in capsys.readouterr().out


def test_convert_cli_bad_source_is_one_clear_line(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "moejax.convert", "upcycle", str(tmp_path / "nope"),
                          str(tmp_path / "out"), "--experts", "4", "--top-k", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not a moejax run directory" in out.stderr
