"""Unit tests for harness/config.py: presets, `key.sub=value` overrides parsed as YAML scalars, the
precedence defaults < preset < overrides, YAML round trips, flatten(), and ValueErrors that name the value.

Run with `pytest tests/unit/test_config.py`.
"""

import pytest
import yaml

from harness.config import (
    PRESET_DIR,
    RunConfig,
    dump_yaml,
    flatten,
    load_config,
    parse_override,
    resolve_preset,
    to_dict,
)

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


# -----------------------------------------------------------------------------
# Presets and precedence

@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.name == preset
    assert isinstance(cfg, RunConfig)


def test_defaults_without_preset():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.model.dims() == (4, 4, 128)


def test_preset_overrides_defaults_and_overrides_win(tmp_path):
    path = tmp_path / "variant.yaml"
    path.write_text("model:\n  block_ln: false\n  temperature:\n    mode: head_query\nentropy:\n  loss_coeff: 1.0e-5\n")
    cfg = load_config(path)
    assert cfg.model.block_ln is False
    assert cfg.model.temperature.mode == "head_query"
    assert cfg.entropy.loss_coeff == 1e-5
    assert cfg.model.temperature.init == RunConfig().model.temperature.init
    assert cfg.optim.lr == RunConfig().optim.lr

    cfg = load_config(path, ["model.block_ln=true", "entropy.loss_coeff=0"])
    assert cfg.model.block_ln is True
    assert cfg.entropy.loss_coeff == 0.0


def test_preset_by_path(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text("model:\n  size: tiny\n  ffn_act: relu\n")
    cfg = load_config(path)
    assert cfg.name == "custom"
    assert cfg.model.ffn_act == "relu"
    assert resolve_preset(path) == path


def test_preset_by_file_name():
    assert resolve_preset("sm_ln_g.yaml") == PRESET_DIR / "sm_ln_g.yaml"


# -----------------------------------------------------------------------------
# Overrides

@pytest.mark.parametrize(
    "override,section,field,expected,kind",
    [
        ("entropy.loss_coeff=1e-5", "entropy", "loss_coeff", 1e-5, float),
        ("optim.lr=3E-4", "optim", "lr", 3e-4, float),
        ("optim.lr=1.0e-3", "optim", "lr", 1e-3, float),
        ("optim.lr=1", "optim", "lr", 1.0, float),
        ("train.compile=true", "train", "compile", True, bool),
        ("model.block_ln=false", "model", "block_ln", False, bool),
        ("train.max_steps=200", "train", "max_steps", 200, int),
        ("model.n_layer=3", "model", "n_layer", 3, int),
        ("model.n_layer=null", "model", "n_layer", None, type(None)),
        ("data.corpus=shakespeare", "data", "corpus", "shakespeare", str),
        ("data.cache_dir=123", "data", "cache_dir", "123", str),
    ],
)
def test_override_parses_yaml_scalar(override, section, field, expected, kind):
    cfg = load_config(None, [override])
    value = getattr(getattr(cfg, section), field)
    assert value == expected
    assert type(value) is kind


def test_nested_override():
    cfg = load_config(None, ["model.temperature.mode=head", "model.temperature.init=0.1"])
    assert cfg.model.temperature.mode == "head"
    assert cfg.model.temperature.init == 0.1


def test_float_in_preset_without_dot(tmp_path):
    # PyYAML reads `1e-5` (no dot) as a string; the config still takes it as a float
    path = tmp_path / "coeff.yaml"
    path.write_text("entropy:\n  loss_coeff: 1e-5\n")
    assert load_config(path).entropy.loss_coeff == 1e-5


def test_override_value_may_contain_equals():
    assert parse_override("data.corpus=a=b") == ("data.corpus", "a=b")
    assert load_config(None, ["data.corpus=a=b"]).data.corpus == "a=b"


def test_size_override_sets_dims():
    cfg = load_config(None, ["model.size=gpt2-small"])
    assert cfg.model.dims() == (12, 12, 768)
    cfg = load_config(None, ["model.size=gpt2-small", "model.n_layer=18"])
    assert cfg.model.dims() == (18, 12, 768)


# -----------------------------------------------------------------------------
# Dump, reload, flatten

@pytest.mark.parametrize("preset", ["sm_t_scfuffn", "tiny", None])
def test_dump_and_reload_equal(preset, tmp_path):
    cfg = load_config(preset, ["entropy.loss_coeff=1e-5", "model.temperature.mode=head", "train.compile=true"])
    text = dump_yaml(cfg)
    assert yaml.safe_load(text) == to_dict(cfg)

    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    reloaded = load_config(path)
    assert reloaded == cfg


def test_flatten_keys():
    flat = flatten(to_dict(load_config("tiny", ["model.temperature.mode=head_query"])))
    for key in ["name", "model.size", "model.temperature.mode", "model.temperature.init", "entropy.loss_coeff",
                "data.context_length", "optim.lr", "train.max_steps", "tracking.experiment"]:
        assert key in flat, key
    assert flat["model.temperature.mode"] == "head_query"
    assert not [key for key, value in flat.items() if isinstance(value, dict)]


def test_flatten_nested_dict():
    assert flatten({"a": {"b": {"c": 1}, "d": 2}, "e": None}) == {"a.b.c": 1, "a.d": 2, "e": None}


# -----------------------------------------------------------------------------
# Bad input: each error names the offending value

def test_unknown_preset_rejected():
    with pytest.raises(ValueError, match=r"unknown preset 'nope'.*sm_t_scfuffn"):
        load_config("nope")


def test_negative_loss_coeff_rejected():
    with pytest.raises(ValueError, match=r"entropy\.loss_coeff=-1"):
        load_config(None, ["entropy.loss_coeff=-1"])


def test_tolerance_outside_unit_interval_rejected():
    with pytest.raises(ValueError, match=r"entropy\.tolerance=1\.5.*\[0\.0, 1\.0\]"):
        load_config(None, ["entropy.tolerance=1.5"])


def test_unknown_key_rejected_with_suggestion():
    with pytest.raises(ValueError, match=r"'train\.max_step'.*did you mean 'max_steps'"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(ValueError, match=r"'modle\.size'.*did you mean 'model'"):
        load_config(None, ["modle.size=tiny"])


def test_unknown_key_in_preset_rejected(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  ffn_actt: relu\n")
    with pytest.raises(ValueError, match=r"'model\.ffn_actt'.*did you mean 'ffn_act'"):
        load_config(path)


def test_invalid_choice_rejected():
    with pytest.raises(ValueError, match=r"model\.ffn_act='swish'.*'gelu', 'relu', 'none'"):
        load_config(None, ["model.ffn_act=swish"])
    with pytest.raises(ValueError, match=r"entropy\.reduction='mean'"):
        load_config(None, ["entropy.reduction=mean"])


def test_wrong_type_rejected():
    with pytest.raises(ValueError, match=r"train\.max_steps: 'abc'"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(ValueError, match=r"train\.max_steps: 1\.5"):
        load_config(None, ["train.max_steps=1.5"])
    with pytest.raises(ValueError, match=r"model\.block_ln: 'maybe'"):
        load_config(None, ["model.block_ln=maybe"])
    with pytest.raises(ValueError, match=r"optim\.lr: 'fast'"):
        load_config(None, ["optim.lr=fast"])


def test_override_without_equals_rejected():
    with pytest.raises(ValueError, match=r"'train\.max_steps'.*key\.sub=value"):
        load_config(None, ["train.max_steps"])


def test_section_set_to_scalar_rejected():
    with pytest.raises(ValueError, match=r"'model' is a section"):
        load_config(None, ["model=3"])


def test_sub_key_of_scalar_rejected():
    with pytest.raises(ValueError, match=r"'train\.max_steps\.x'"):
        load_config(None, ["train.max_steps.x=1"])


def test_preset_not_a_mapping_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- entropy\n")
    with pytest.raises(ValueError, match=r"list\.yaml: expected a mapping"):
        load_config(path)


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("model.n_head=3", r"n_embd=128 .*n_head=3"),
        ("model.temperature.init=0", r"temperature\.init=0"),
        ("data.context_length=0", r"data\.context_length=0"),
        ("train.batch_size=-2", r"train\.batch_size=-2"),
        ("optim.warmup_fraction=2", r"optim\.warmup_fraction=2"),
        ("data.val_fraction=0.96", r"data\.val_fraction=0\.96"),
        ("model.size=huge", r"model\.size='huge'"),
        ("model.temperature.mode=query", r"model\.temperature\.mode='query'"),
    ],
)
def test_invalid_value_rejected(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(None, [override])
