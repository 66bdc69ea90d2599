"""Tests of the config loader: defaults, YAML files, overrides, type and range checks, error messages."""
import pytest

from moejax import config
from moejax.errors import ConfigError, UserError, run_cli


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(*overrides, path=None) -> str:
    """The message of the ConfigError that loading with these overrides raises."""
    with pytest.raises(ConfigError) as e:
        config.load(path, list(overrides))
    return str(e.value)


# ------------------------------------------------------------------------------------- loading


def test_load_none_gives_defaults():
    cfg = config.load(None)
    assert cfg == config.Config()
    assert (cfg.model.d_model, cfg.model.moe.num_experts, cfg.model.moe.top_k) == (256, 8, 2)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.dtype) == (1000, 3e-4, "float32")
    assert cfg.mesh.data == -1 and cfg.data.seq_len == 256


def test_yaml_file_fills_nested_dataclasses(tmp_path):
    path = write(tmp_path, "model:\n  d_model: 128\n  moe:\n    num_experts: 4\n    dispatch: capacity\n"
                           "train:\n  steps: 7\n  lr: 1e-3\n")
    cfg = config.load(path)
    assert isinstance(cfg.model.moe, config.MoEConfig)
    assert cfg.model.d_model == 128
    assert (cfg.model.moe.num_experts, cfg.model.moe.dispatch) == (4, "capacity")
    assert cfg.model.moe.top_k == 2  # untouched keys keep their defaults
    assert cfg.model.n_layers == 4
    assert cfg.train.steps == 7
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-3)


def test_overrides_apply_and_coerce_yaml11_float_string():
    cfg = config.load(None, ["model.moe.top_k=1", "train.lr=1e-3"])
    assert cfg.model.moe.top_k == 1
    assert type(cfg.train.lr) is float and cfg.train.lr == pytest.approx(0.001)


def test_override_wins_over_file(tmp_path):
    path = write(tmp_path, "model:\n  d_model: 128\ntrain:\n  steps: 7\n")
    cfg = config.load(path, ["model.d_model=64"])
    assert cfg.model.d_model == 64
    assert cfg.train.steps == 7


def test_round_trip_through_dump(tmp_path):
    cfg = config.load(None, ["model.moe.num_experts=4", "model.moe.first_dense=1", "model.head_dim=16",
                             "train.lr=1e-3", "train.dtype=bfloat16", "mesh.data=2", "mesh.expert=-1",
                             "data.source=jsonl:/tmp/x.jsonl"])
    path = tmp_path / "out.yaml"
    config.dump(cfg, str(path))
    assert config.load(path) == cfg
    assert config.load(path) != config.Config()


# --------------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("key, suggestion", [
    ("model.moe.num_expert", "model.moe.num_experts"),
    ("modle.d_model", "model.d_model"),
    ("train.stpes", "train.steps"),
])
def test_unknown_override_key_suggests_nearest(key, suggestion):
    msg = load_error(f"{key}=4")
    assert repr(key) in msg
    assert f"did you mean {suggestion!r}" in msg


@pytest.mark.parametrize("text, key, suggestion", [
    ("model:\n  moe:\n    num_expert: 4\n", "model.moe.num_expert", "model.moe.num_experts"),
    ("train:\n  stpes: 3\n", "train.stpes", "train.steps"),
    ("modle:\n  d_model: 64\n", "modle", "model"),
])
def test_unknown_file_key_suggests_nearest(tmp_path, text, key, suggestion):
    msg = load_error(path=write(tmp_path, text))
    assert repr(key) in msg
    assert f"did you mean {suggestion!r}" in msg


# ------------------------------------------------------------------------------ types and ranges


@pytest.mark.parametrize("override, expected", [
    ("model.d_model=abc", ["model.d_model", "int"]),
    ("model.d_model=true", ["model.d_model", "int"]),  # a bool is not an int
    ("train.lr=fast", ["train.lr", "float"]),
    ("model.tie_embeddings=1", ["model.tie_embeddings", "bool"]),
    ("model.n_layers=null", ["model.n_layers", "null"]),
])
def test_wrong_types_are_refused(override, expected):
    msg = load_error(override)
    assert "wrong type" in msg or "null" in msg
    for part in expected:
        assert part in msg


@pytest.mark.parametrize("overrides, expected", [
    (["model.moe.top_k=9"], ["model.moe.top_k", "[1, model.moe.num_experts = 8]"]),
    (["model.n_kv_heads=3"], ["model.n_heads", "multiple of model.n_kv_heads"]),
    (["model.d_model=100"], ["model.d_model", "not divisible by model.n_heads", "head_dim"]),
    (["model.d_model=-4"], ["model.d_model", "must be >= 1"]),
    (["model.moe.num_experts=-1"], ["model.moe.num_experts", "must be >= 0"]),
    (["model.moe.capacity_factor=-0.5"], ["model.moe.capacity_factor", ">= 0"]),  # 0 = dynamic (issue 16)
    (["train.dtype=float16"], ["train.dtype", "float16", "float32", "bfloat16"]),
    (["model.moe.router=sinkhorn"], ["model.moe.router", "topk", "expert_choice", "deepseek"]),
    (["model.moe.dispatch=scatter"], ["model.moe.dispatch", "dense", "capacity", "dropless"]),
    (["model.moe.gmm=cuda"], ["model.moe.gmm", "ragged_dot", "tiled"]),
    (["mesh.fsdp=-1"], ["at most one mesh axis may be -1"]),
    (["mesh.tensor=0"], ["mesh.tensor", ">= 1"]),
    (["model.moe.first_dense=4"], ["no layer is an MoE layer", "model.moe.num_experts = 0"]),
    (["model.moe.every=5"], ["no layer is an MoE layer"]),
])
def test_out_of_range_values_name_key_and_allowed_range(overrides, expected):
    msg = load_error(*overrides)
    for part in expected:
        assert part in msg


def test_dense_model_is_accepted():
    cfg = config.load(None, ["model.moe.num_experts=0", "model.moe.first_dense=4"])
    assert cfg.model.moe.num_experts == 0
    assert not any(cfg.model.is_moe_layer(i) for i in range(cfg.model.n_layers))


def test_head_dim_allows_indivisible_d_model():
    cfg = config.load(None, ["model.d_model=100", "model.head_dim=16"])
    assert cfg.model.resolved_head_dim == 16


@pytest.mark.parametrize("every, first_dense, layers", [(2, 0, [1, 3]), (1, 1, [1, 2, 3]), (1, 0, [0, 1, 2, 3])])
def test_is_moe_layer(every, first_dense, layers):
    cfg = config.load(None, [f"model.moe.every={every}", f"model.moe.first_dense={first_dense}",
                             "model.n_layers=4"])
    assert [i for i in range(4) if cfg.model.is_moe_layer(i)] == layers


def test_override_without_equals_is_refused():
    assert "key.path=value" in load_error("model.d_model")


# ------------------------------------------------------------------------------------- bad files


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = load_error(path=path)
    assert str(path) in msg and "does not exist" in msg


@pytest.mark.parametrize("text, expected", [
    ("model: [1, 2\n", "not valid YAML"),
    ("- model\n- train\n", "must hold a mapping"),
    ("just a string\n", "must hold a mapping"),
])
def test_bad_file_contents_name_path(tmp_path, text, expected):
    path = write(tmp_path, text)
    msg = load_error(path=path)
    assert str(path) in msg and expected in msg


def test_section_that_is_not_a_mapping(tmp_path):
    msg = load_error(path=write(tmp_path, "model: 3\n"))
    assert "model must be a mapping" in msg


# ------------------------------------------------------------------------------------ errors / CLI


def test_config_error_is_user_error():
    assert issubclass(ConfigError, UserError)
    with pytest.raises(UserError):
        config.load(None, ["model.d_model=-4"])


def test_run_cli_turns_user_error_into_exit_2(capsys):
    def main():
        config.load(None, ["model.d_model=abc"])

    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "model.d_model" in lines[0]


@pytest.mark.parametrize("returned, code", [(None, 0), (0, 0), (3, 3)])
def test_run_cli_passes_main_exit_code(returned, code):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: returned)
    assert e.value.code == code


def test_run_cli_does_not_swallow_other_errors():
    def main():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_cli(main)


def test_override_under_empty_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\ntrain:\n  steps: 5\n")
    cfg = config.load(path, ["model.d_model=128"])
    assert cfg.model.d_model == 128 and cfg.train.steps == 5


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf"])
def test_non_finite_floats_are_refused(value):
    with pytest.raises(ConfigError, match="train.lr.*finite"):
        config.load(None, [f"train.lr={value}"])


def test_batch_must_split_into_the_accumulation_micro_batches():
    assert config.load(None, ["train.batch_size=8", "train.grad_accum=4"]).train.grad_accum == 4
    with pytest.raises(ConfigError, match=r"train.batch_size = 8 is not divisible by train.grad_accum = 3"):
        config.load(None, ["train.batch_size=8", "train.grad_accum=3"])
