"""Dispatch paths and grouped matmuls against a per-expert loop reference written here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import MoEConfig
from moejax.model import dispatch, routing
from moejax.model import gmm as gmm_lib

T, D, F, E, K = 24, 16, 12, 4, 2


def silu(x):
    return x / (1 + np.exp(-x))


def loop_reference(x, w, r: routing.Routing, keep=None):
    """y[t] = sum over kept assignments of weight * SwiGLU_e(x[t]): one expert at a time."""
    x = np.asarray(x, np.float64)
    y = np.zeros_like(x)
    token, expert, weight = (np.asarray(a) for a in (r.token, r.expert, r.weight))
    keep = np.ones(len(token), bool) if keep is None else keep
    for e in range(w.w_gate.shape[0]):
        sel = (expert == e) & keep
        xe = x[token[sel]]
        h = silu(xe @ np.asarray(w.w_gate[e], np.float64)) * (xe @ np.asarray(w.w_up[e], np.float64))
        np.add.at(y, token[sel], weight[sel, None] * (h @ np.asarray(w.w_down[e], np.float64)))
    return y


def jnp_loop_reference(x, w, r):
    """Differentiable twin of `loop_reference` (a Python loop over experts with masks)."""
    y = jnp.zeros_like(x)
    for e in range(w.w_gate.shape[0]):
        gate = jnp.where(r.expert == e, r.weight, 0.0)
        xe = x[r.token]
        h = jax.nn.silu(xe @ w.w_gate[e]) * (xe @ w.w_up[e])
        y = y.at[r.token].add(gate[:, None] * (h @ w.w_down[e]))
    return y


def make_case(seed=0, t=T, e=E, k=K):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(t, D)), jnp.float32)
    w = dispatch.ExpertWeights(*(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
                                 for s in ((e, D, F), (e, D, F), (e, F, D))))
    cfg = MoEConfig(num_experts=e, top_k=k, tile_size=8, capacity_factor=float(e))
    logits = jnp.asarray(rng.normal(size=(t, e)) * 2, jnp.float32)
    r = routing.topk_router(logits, cfg, routing.RouteContext())
    return x, w, r, cfg


PATHS = [("dense", "auto"), ("capacity", "auto"), ("dropless", "tiled"), ("dropless", "ragged_dot"),
         ("dropless", "megablox"), ("dropless", "tiled_static")]


@pytest.mark.parametrize("name,gmm", PATHS)
def test_paths_match_loop_reference(name, gmm):
    x, w, r, cfg = make_case()
    cfg = MoEConfig(**{**cfg.__dict__, "gmm": gmm})
    y, dropped = jax.jit(dispatch.DISPATCHERS.get(name), static_argnums=3)(x, w, r, cfg)
    np.testing.assert_allclose(y, loop_reference(x, w, r), rtol=1e-4, atol=1e-5)
    assert int(dropped) == 0


@pytest.mark.parametrize("name,gmm", PATHS)
def test_paths_gradients_match_reference(name, gmm):
    x, w, r, cfg = make_case(seed=1)
    cfg = MoEConfig(**{**cfg.__dict__, "gmm": gmm})
    fn = dispatch.DISPATCHERS.get(name)

    def loss(f, x, w, weight):
        y = f(x, w, r._replace(weight=weight))
        return jnp.sum(jnp.sin(y))

    got = jax.grad(loss, argnums=(1, 2, 3))(lambda *a: fn(*a, cfg)[0], x, w, r.weight)
    want = jax.grad(loss, argnums=(1, 2, 3))(jnp_loop_reference, x, w, r.weight)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


def test_capacity_drops_overflow_in_priority_order():
    # 8 tokens, top-1, 4 experts, factor 1: C = 2 slots per expert. Everyone wants expert 0.
    x, w, _, _ = make_case(t=8, k=1)
    r = routing.Routing(token=jnp.arange(8, dtype=jnp.int32), expert=jnp.zeros(8, jnp.int32),
                        weight=jnp.ones(8), probs=jnp.full((8, E), 0.25), logits=jnp.zeros((8, E)))
    cfg = MoEConfig(num_experts=E, top_k=1, capacity_factor=1.0)
    assert dispatch.capacity(8, E, 1.0) == 2
    y, dropped = dispatch.capacity_dispatch(x, w, r, cfg)
    keep = np.arange(8) < 2
    assert int(dropped) == 6
    np.testing.assert_allclose(y, loop_reference(x, w, r, keep), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.abs(np.asarray(y[2:])).sum(1), 0)


def test_capacity_serves_first_choices_before_second_choices():
    # 4 tokens, top-2, 2 experts, C = ceil(8 / 2 * 0.5) = 2. Tokens 2, 3 pick expert 1 first;
    # tokens 0, 1 pick it second. Their second choices must be the ones dropped.
    x, w, _, _ = make_case(t=4, e=2)
    first = jnp.array([0, 0, 1, 1])
    second = jnp.array([1, 1, 0, 0])
    token, expert, weight = routing.choice_major(jnp.stack([first, second], 1), jnp.full((4, 2), 0.5))
    r = routing.Routing(token, expert, weight, jnp.full((4, 2), 0.5), jnp.zeros((4, 2)))
    cfg = MoEConfig(num_experts=2, top_k=2, capacity_factor=0.5)
    y, dropped = dispatch.capacity_dispatch(x, w, r, cfg)
    assert int(dropped) == 4
    keep = np.array([True] * 4 + [False] * 4)
    np.testing.assert_allclose(y, loop_reference(x, w, r, keep), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
@pytest.mark.parametrize("sizes", [[5, 0, 17, 2], [0, 0, 24, 0], [8, 8, 8, 0], [1, 1, 1, 21]])
def test_grouped_ffn_matches_per_group_swiglu(impl, sizes):
    rng = np.random.default_rng(2)
    n = sum(sizes)
    x = rng.normal(size=(n, D))
    w = [rng.normal(size=(len(sizes),) + s) * 0.3 for s in ((D, F), (D, F), (F, D))]
    starts = np.cumsum([0] + sizes[:-1])
    want = np.concatenate([(silu(x[s:s + g] @ w[0][i]) * (x[s:s + g] @ w[1][i])) @ w[2][i]
                           for i, (s, g) in enumerate(zip(starts, sizes))])
    experts = dispatch.ExpertWeights(*(jnp.asarray(a, jnp.float32) for a in w))
    got = dispatch.GROUPED_FFNS.get(impl)(jnp.asarray(x, jnp.float32), experts, jnp.asarray(sizes), 8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tile_layout_starts_each_group_on_a_fresh_tile():
    dest, tile_expert, num_tiles = dispatch.tile_layout(jnp.array([3, 0, 5]), 8, 4)
    assert num_tiles == 2 + 3 - 1
    np.testing.assert_array_equal(dest, [0, 1, 2, 4, 5, 6, 7, 8])  # expert 0: tile 0; expert 2: tiles 1-2
    np.testing.assert_array_equal(tile_expert[:3], [0, 2, 2])
    # Rows beyond the groups (a fixed-size buffer's padding) land past the end, each on its own index.
    dest, _, num_tiles = dispatch.tile_layout(jnp.array([2, 1]), 5, 4)
    assert list(dest[:3]) == [0, 1, 4] and all(int(i) >= num_tiles * 4 for i in dest[3:])
    assert len(set(np.asarray(dest).tolist())) == 5


def test_tiled_ffn_compiles_once_for_any_group_sizes():
    f = jax.jit(dispatch.grouped_ffn_tiled, static_argnums=3)
    experts = dispatch.ExpertWeights(jnp.ones((3, 4, 2)), jnp.ones((3, 4, 2)), jnp.ones((3, 2, 4)))
    for sizes in ([16, 0, 0], [1, 7, 8], [5, 5, 6]):
        f(jnp.ones((16, 4)), experts, jnp.asarray(sizes), 4)
    assert f._cache_size() == 1


# ---------------------------------------------------------------------------------------------
# Every registered grouped FFN (moejax.model.gmm) that runs here, against an independent reference:
# rows past sum(group sizes) (a fixed-size buffer's padding), empty groups, group_offset.

# `auto` is one of the others (test_auto_choice_per_backend); megablox (interpret mode: slow) runs
# the first and the group_offset case only.
GMMS = [n for n in gmm_lib.GROUPED_FFNS.names()
        if n != "auto" and gmm_lib.GROUPED_FFNS.get(n).supports(jax.default_backend())]


def per_group_reference(x, w, sizes, offset=0):
    """numpy: rows of group offset + i through expert i, every other row 0."""
    x = np.asarray(x, np.float64)
    y = np.zeros((x.shape[0], w[2].shape[-1]))
    starts = np.cumsum([0] + list(sizes[:-1]))
    for i in range(w[0].shape[0]):
        s, g = starts[offset + i], sizes[offset + i]
        xe = x[s:s + g]
        y[s:s + g] = (silu(xe @ w[0][i]) * (xe @ w[1][i])) @ w[2][i]
    return y


def jnp_group_reference(x, experts, sizes, offset=0):
    """Differentiable twin: every row through every local expert, masked by group membership."""
    starts = np.cumsum([0] + list(sizes[:-1]))
    rows = jnp.arange(x.shape[0])
    y = 0
    for i in range(experts.w_gate.shape[0]):
        s, g = starts[offset + i], sizes[offset + i]
        m = ((rows >= s) & (rows < s + g)).astype(x.dtype)[:, None]
        y = y + m * gmm_lib.swiglu(x, experts.w_gate[i], experts.w_up[i], experts.w_down[i])
    return y


GMM_CASES = [([5, 0, 17, 2], 24, None), ([0, 0, 9, 0], 24, None), ([3, 4, 2, 6], 32, None),
             ([4, 6, 3, 5, 2, 1], 24, 2)]  # (group sizes, rows, group_offset with 2 local experts)


def gmm_case(sizes, n, offset, seed=3):
    rng = np.random.default_rng(seed)
    e_local = len(sizes) if offset is None else 2
    x = rng.normal(size=(n, D))
    w = [rng.normal(size=(e_local,) + s) * 0.3 for s in ((D, F), (D, F), (F, D))]
    return x, w


@pytest.mark.parametrize("impl,sizes,n,offset",
                         [(i, *c) for i in GMMS for c in GMM_CASES
                          if i != "megablox" or c in (GMM_CASES[0], GMM_CASES[-1])])
def test_every_grouped_ffn_forward_and_gradients(impl, sizes, n, offset):
    x, w = gmm_case(sizes, n, offset)
    experts = gmm_lib.ExpertWeights(*(jnp.asarray(a, jnp.float32) for a in w))
    xj, gs = jnp.asarray(x, jnp.float32), jnp.asarray(sizes, jnp.int32)
    off = None if offset is None else jnp.asarray(offset, jnp.int32)
    fn = gmm_lib.GROUPED_FFNS.get(impl)
    run = jax.jit(lambda x, w, gs: fn(x, w, gs, 8, tiling=(8, 128, 128), group_offset=off))
    got = run(xj, experts, gs)
    np.testing.assert_allclose(got, per_group_reference(x, w, sizes, offset or 0), rtol=1e-4, atol=1e-4)

    def loss(f, x, w):
        return jnp.sum(jnp.sin(f(x, w)))

    g_got = jax.grad(loss, argnums=(1, 2))(lambda x, w: run(x, w, gs), xj, experts)
    g_want = jax.grad(loss, argnums=(1, 2))(lambda x, w: jnp_group_reference(x, w, sizes, offset or 0),
                                            xj, experts)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_tile_map_pads_each_group_to_a_tail_tile_only():
    # tile 8, tail tiles of 2 rows: group 0 (3 rows) = 2 tails; group 2 (17) = 2 whole + 1 tail.
    tm = gmm_lib.tile_map(jnp.array([3, 0, 17, 9]), 32, 8)
    assert gmm_lib.tail_tile(8) == 2 and tm.rows == 32 + 4 * (2 - 1)  # N + E * (tail - 1), to a tail
    assert int(tm.big_count) == 3 and int(tm.tail_count) == 2 + 1 + 1
    np.testing.assert_array_equal(tm.big_start[:3], [4, 12, 22])      # group 2 from row 4, group 3 from 22
    np.testing.assert_array_equal(tm.big_expert[:3], [2, 2, 3])
    np.testing.assert_array_equal(tm.tail_start[:4], [0, 2, 20, 30])
    np.testing.assert_array_equal(tm.tail_expert[:4], [0, 0, 2, 3])
    want = list(range(3)) + list(range(4, 21)) + list(range(22, 31))
    np.testing.assert_array_equal(tm.dest[:29], want)
    # Rows beyond the groups (a fixed-size buffer's padding) land past the end, each on its own index.
    assert all(int(i) >= tm.rows for i in tm.dest[29:]) and len(set(np.asarray(tm.dest).tolist())) == 32
    # Padded rows: each group to a multiple of the tail, never to a whole tile.
    sizes = np.random.default_rng(0).integers(0, 40, size=8)
    tm = gmm_lib.tile_map(jnp.asarray(sizes), int(sizes.sum()), 16)
    used = 16 * int(tm.big_count) + 4 * int(tm.tail_count)
    assert used == int(np.sum(-(-sizes // 4) * 4)) <= tm.rows


def test_tile_loop_computes_only_the_used_tiles():
    # 3 used tiles of 4 rows (two whole, one of its 2-row tails); rows after them hold NaN: never
    # computed, so no NaN anywhere.
    rng = np.random.default_rng(4)
    x_pad = np.full((32, D), np.nan, np.float32)
    x_pad[:10] = rng.normal(size=(10, D))
    w = [jnp.asarray(rng.normal(size=(2,) + s) * 0.3, jnp.float32) for s in ((D, F), (D, F), (F, D))]
    whole = (jnp.array([0, 4, 28]), jnp.array([0, 1, 1]), jnp.int32(2))
    tail = (jnp.array([8, 30]), jnp.array([1, 1]), jnp.int32(1))
    sizes = (jnp.zeros((4,), jnp.int8), jnp.zeros((2,), jnp.int8))
    f = lambda x: gmm_lib.tile_loop(x, *w, (whole, tail), sizes)  # noqa: E731
    y = f(jnp.asarray(x_pad))
    assert np.all(np.isfinite(np.asarray(y))) and np.all(np.asarray(y[10:]) == 0)
    want = np.concatenate([np.asarray(gmm_lib.swiglu(x_pad[:4], w[0][0], w[1][0], w[2][0])),
                           np.asarray(gmm_lib.swiglu(x_pad[4:10], w[0][1], w[1][1], w[2][1]))])
    np.testing.assert_allclose(y[:10], want, rtol=1e-5, atol=1e-5)
    dx = jax.grad(lambda x: jnp.sum(f(x) ** 2))(jnp.asarray(np.nan_to_num(x_pad)))
    assert np.all(np.asarray(dx[10:]) == 0) and np.any(np.asarray(dx[:10]) != 0)
    assert int(gmm_lib.used_tiles(jnp.array([3, 0, 5]), 4)) == 3


def test_auto_choice_per_backend():
    assert [gmm_lib.auto_choice(b) for b in ("tpu", "gpu", "cpu")] == ["megablox", "ragged_dot", "tiled"]
    assert gmm_lib.GROUPED_FFNS.get("megablox").supports("cpu")  # interpret mode, so CI runs it
    assert not gmm_lib.GROUPED_FFNS.get("megablox").supports("gpu")
