"""Expert-parallel exchange variants (moejax.model.exchange): the ragged all-to-all emulation against
a numpy model of its spec, the 2D hierarchical all-to-all against the flat one, capped ragged buffers
against a simulation, DeepSpeed-TED's all-to-all bytes read from compiled HLO (8 simulated devices, one
subprocess: tests/exchange_check.py); dynamic capacity and the bad-input errors on one device."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config, parallel
from moejax.errors import ConfigError
from moejax.model import dispatch
from moejax.model.routing import Routing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checks():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "tests/exchange_check.py"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["check"]: r for r in rows}


def test_ragged_all_to_all_emulation_follows_the_spec(checks):
    ex = checks["docstring_example"]
    assert ex["got"] == ex["want"] == ex["documented"]
    assert checks["random_cases"]["cases"] == 6 and checks["random_cases"]["max_abs_diff"] == 0.0


def test_hierarchical_all_to_all_is_bitwise_flat(checks):
    res = checks["hierarchical"]["results"]
    assert res["4"]["bitwise_equal"] and res["2"]["bitwise_equal"]
    # expert 8 = 2 nodes x 4: intra-node groups, then same-local-rank groups across nodes.
    assert res["4"]["replica_groups"] == ["{{0,1,2,3},{4,5,6,7}}", "{{0,4},{1,5},{2,6},{3,7}}"]


def test_capped_ragged_buffer_drops_and_counts(checks):
    r = checks["ragged_buffer"]
    assert r["max_abs_diff"] == 0.0
    assert r["dropped"] == r["want_dropped"] and sum(r["dropped"]) > 0


def test_padded_exchange_drops_nothing_with_slots_sized_to_the_load(checks):
    r = checks["padded_slots"]
    for name, case in r["results"].items():
        assert case["max_abs_diff"] == 0.0 and case["dropped"] == [0] * 4, (name, case)
    assert r["buckets"] == [4, 6, 9, 13, 16]  # 16 rows over 4 devices: the average 4 grown by sqrt(2) to 16
    assert r["a2a_slot_sizes"] == r["buckets"]


def test_drop_duplicate_tokens_halves_all_to_all_bytes(checks):
    for dispatch_name, r in checks["ted_bytes"]["results"].items():
        assert r["False"]["a2a_bytes"] > 0, dispatch_name
        assert r["False"]["a2a_bytes"] == 2 * r["True"]["a2a_bytes"], (dispatch_name, r)  # tensor = 2
        assert r["max_abs_diff"] < 1e-6, (dispatch_name, r)


def test_dynamic_capacity_drops_nothing_and_equals_dense():
    cfg = config.load(None, ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_expert=8",
                             "model.moe.capacity_factor=0"]).model.moe
    t, d, e = 16, 8, 4
    ks = jax.random.split(jax.random.key(0), 4)
    experts = dispatch.ExpertWeights(*(0.3 * jax.random.normal(k, s) for k, s in
                                       zip(ks, [(e, d, 8), (e, d, 8), (e, 8, d)])))
    x = jax.random.normal(ks[3], (t, d))
    assert dispatch.dynamic_capacity_buckets(t, 2 * t, e) == (8, 16)  # few static sizes
    for skew in (0, 1):  # balanced, then every token on expert 0 (the largest bucket)
        first = np.arange(t) % e if not skew else np.zeros(t, int)
        second = (first + 1) % e
        r = Routing(token=jnp.repeat(jnp.arange(t), 2), expert=jnp.asarray(np.stack([first, second], 1).ravel()),
                    weight=jnp.full((2 * t,), 0.5), probs=jnp.zeros((t, e)), logits=jnp.zeros((t, e)))
        y, dropped = jax.jit(lambda x: dispatch.capacity_dispatch(x, experts, r, cfg))(x)
        ref, _ = dispatch.dense_dispatch(x, experts, r, cfg)
        assert int(dropped) == 0
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("sets, match", [
    (["mesh.expert=8", "mesh.data=1", "model.moe.a2a_local_size=3"],
     "model.moe.a2a_local_size = 3 must divide mesh.expert = 8"),
    (["model.moe.drop_duplicate_tokens=true"], "drop_duplicate_tokens = true needs tensor parallelism"),
    (["model.moe.ep_buffer_factor=0"], "model.moe.ep_buffer_factor = 0.0 is out of range: must be > 0"),
    (["model.moe.ep_buffer_factor=-1"], "ep_buffer_factor = -1.0 is out of range"),
    (["model.moe.ep_exchange=fancy"], "ep_exchange = 'fancy' is not allowed; allowed: padded, ragged"),
    (["model.moe.capacity_factor=-1"], "capacity_factor = -1.0 is out of range: must be >= 0"),
])
def test_bad_exchange_settings_are_config_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        config.load(None, sets)


def test_local_size_checked_against_the_resolved_expert_axis():
    cfg = config.load(None, ["mesh.expert=-1", "mesh.data=1", "model.moe.a2a_local_size=3"])
    with pytest.raises(ConfigError, match="a2a_local_size = 3 must divide mesh.expert = 8"):
        parallel.check_mesh_fits_model(cfg, {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1})
