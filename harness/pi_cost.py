"""Nonlinear operations, FLOPs and an estimated private-inference cost of one forward pass over T tokens.

Source of the conventions and of the measurements the cost model is fitted to: Jha and Reagen,
"Entropy-Guided Attention for Private LLMs" (arXiv 2501.03489), Tables 2-4, 7 and 8.

- Nonlinear operations: one T x T softmax per head and layer, and T x d LayerNorms (two per block when
  block_ln is on, plus one when final_ln is on). GELU or ReLU runs once per layer on T x 4d, except in
  a fused FFN, which has no activation. Weight and spectral normalization act on the weights, so at
  inference the normalized matrix is a constant and they add no runtime nonlinearity and no row here.
  The learnable temperature and the FFN scales alpha and beta multiply by constants, which is linear.
- FLOPs are 2 x multiply-accumulates of the linear layers. FFN: 2*T*d*4d*2*L, fused FFN: 2*T*d*d*L.
  Attention: the four d x d projections (2*T*d*d*4*L) plus 3*T*T*d*L for QK^T and AV, i.e. QK^T counted
  in full and AV over the causal lower triangle. That is the convention that reproduces the published
  7.7B (T=128) and 16.3B (T=256). Embedding and LM head FLOPs are excluded, as in the published tables.
- Communication (GB) and latency (minutes) come from a linear model over per-operation features, fitted
  by non-negative least squares to the 12 published SecretFlow measurements (2PC, semi-honest, WAN of
  100 Mbps and 80 ms). It is an estimate: 6 coefficients fitted to 12 rows, all at d=768 and 12 heads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from harness.config import ModelConfig, RunConfig

GPT2_VOCAB_SIZE = 50257
CODEPARROT_VOCAB_SIZE = 50000  # the published CodeParrot runs use "a 50K code tokenizer"
LANGUINI_VOCAB_SIZE = 16384

# Names of the operations in the published op counts, e.g. "24 LN of 128x768".
OP_LABELS = {"softmax": "softmax", "layernorm": "LN", "gelu": "GELU", "relu": "ReLU"}

# Features of the cost model, with the unit of each coefficient's feature value.
FEATURES = ("softmax", "layernorm_relu", "gelu", "linear", "embedding", "constant")
FEATURE_UNITS = {
    "softmax": "1e6 softmax input elements (L*H*T*T)",
    "layernorm_relu": "1e6 LayerNorm plus ReLU input elements",
    "gelu": "1e6 GELU input elements",
    "linear": "1e9 linear-layer FLOPs (FFN plus attention)",
    "embedding": "1e6 token x vocabulary entries (T*V)",
    "constant": "one forward pass",
}


# -----------------------------------------------------------------------------
# Config resolution

def _resolve(cfg, context_length: int | None, vocab_size: int | None = None) -> tuple[ModelConfig, int, int]:
    """Return (model config, T, vocabulary size) for a RunConfig, or a ModelConfig plus T."""
    if isinstance(cfg, RunConfig):
        model = cfg.model
        T = context_length or cfg.data.context_length
        default_vocab = GPT2_VOCAB_SIZE if cfg.data.tokenizer == "gpt2" else cfg.data.vocab_size
    elif isinstance(cfg, ModelConfig):
        if context_length is None:
            raise ValueError("missing context_length: a ModelConfig has no context length, pass T explicitly")
        model, T = cfg, context_length
        default_vocab = CODEPARROT_VOCAB_SIZE
    else:
        raise ValueError(f"invalid config of type {type(cfg).__name__}: expected a RunConfig or a ModelConfig")
    V = vocab_size or default_vocab
    if T < 1 or V < 1:
        raise ValueError(f"invalid context_length={T} or vocab_size={V}: both must be >= 1")
    if model.ffn_act not in ("gelu", "relu", "none"):
        raise ValueError(f"invalid model.ffn_act={model.ffn_act!r}: accepted values are ['gelu', 'relu', 'none']")
    return model, T, V


# -----------------------------------------------------------------------------
# Nonlinear operations

@dataclass(frozen=True)
class NonlinearOp:
    """One kind of nonlinear operation in a forward pass: `count` invocations, each on a `shape` input."""

    op: str  # softmax, layernorm, gelu or relu
    count: int
    shape: tuple[int, int]

    @property
    def elements(self) -> int:
        return self.count * self.shape[0] * self.shape[1]


def nonlinear_ops(cfg: RunConfig | ModelConfig, context_length: int | None = None) -> list[NonlinearOp]:
    """Return the runtime nonlinear operations of one forward pass over T tokens (embedding and LM head excluded).

    Weight and spectral normalization, the attention temperature and the FFN scales give no row, as the
    module docstring explains. A fused FFN has no activation even when ffn_act is gelu or relu, as in
    harness.modeling.
    """
    model, T, _ = _resolve(cfg, context_length)
    n_layer, n_head, n_embd = model.dims()

    # one softmax per head and layer over the T x T scores
    ops = [NonlinearOp("softmax", n_layer * n_head, (T, T))]

    # LayerNorm: ln_1 and ln_2 in each block, ln_f before the LM head
    n_layernorm = 0
    if model.block_ln:
        n_layernorm += 2 * n_layer
    if model.final_ln:
        n_layernorm += 1
    if n_layernorm:
        ops.append(NonlinearOp("layernorm", n_layernorm, (T, n_embd)))

    # FFN activation on the T x 4d hidden layer
    if not model.ffn_fused and model.ffn_act != "none":
        ops.append(NonlinearOp(model.ffn_act, n_layer, (T, 4 * n_embd)))
    return ops


def op_elements(ops: list[NonlinearOp]) -> dict[str, int]:
    """Return the input elements processed by each op kind (zero for kinds that are absent)."""
    totals = dict.fromkeys(OP_LABELS, 0)
    for op in ops:
        totals[op.op] += op.elements
    return totals


def format_ops(ops: list[NonlinearOp]) -> str:
    """Format ops as in the published tables: "144 softmax of 128x128, 24 LN of 128x768, 12 GELU of 128x3072"."""
    return ", ".join(f"{op.count} {OP_LABELS[op.op]} of {op.shape[0]}x{op.shape[1]}" for op in ops)


# -----------------------------------------------------------------------------
# FLOPs (2 x multiply-accumulates, one forward pass over T tokens)

def ffn_flops(cfg: RunConfig | ModelConfig, context_length: int | None = None) -> int:
    """Return the FFN FLOPs: 2*T*d*4d*2*L for d -> 4d -> d, 2*T*d*d*L for the fused d x d FFN."""
    model, T, _ = _resolve(cfg, context_length)
    n_layer, _, d = model.dims()
    if model.ffn_fused:
        return 2 * T * d * d * n_layer
    return 2 * T * d * 4 * d * 2 * n_layer


def attention_flops(cfg: RunConfig | ModelConfig, context_length: int | None = None) -> int:
    """Return the attention FLOPs: Q, K, V, O projections (2*T*d*d*4*L) plus QK^T and AV (3*T*T*d*L).

    QK^T is counted in full (2*T*T*d per layer) and AV over the causal lower triangle (T*T*d per layer).
    This reproduces the published 7.7B at T=128 and 16.3B at T=256 for L=12, d=768. Counting both
    products in full (4*T*T*d*L) gives 7.9B and 16.9B, and both over the causal triangle gives 7.5B and 15.7B.
    """
    model, T, _ = _resolve(cfg, context_length)
    n_layer, _, d = model.dims()
    projections = 2 * T * d * d * 4 * n_layer
    scores_and_values = 3 * T * T * d * n_layer
    return projections + scores_and_values


def format_flops(flops: float) -> str:
    """Format FLOPs in billions with one decimal, as the published tables print them: "14.5B"."""
    return f"{flops / 1e9:.1f}B"


# -----------------------------------------------------------------------------
# Cost model features and the published measurements

def cost_features(cfg: RunConfig | ModelConfig, context_length: int | None = None,
                  vocab_size: int | None = None) -> dict[str, float]:
    """Return the cost-model features of one forward pass, in the units of FEATURE_UNITS.

    LayerNorm and ReLU elements share one feature. In every published row the LayerNorm elements are half
    the GELU plus ReLU elements, so the measurements cannot separate the two per-element costs.
    """
    model, T, V = _resolve(cfg, context_length, vocab_size)
    elements = op_elements(nonlinear_ops(model, T))
    return {
        "softmax": elements["softmax"] / 1e6,
        "layernorm_relu": (elements["layernorm"] + elements["relu"]) / 1e6,
        "gelu": elements["gelu"] / 1e6,
        "linear": (ffn_flops(model, T) + attention_flops(model, T)) / 1e9,
        "embedding": T * V / 1e6,
        "constant": 1.0,
    }


# The three architectures with published PI costs. Their op counts leave out the final LayerNorm.
PUBLISHED_VARIANTS = {
    "SM+LN+G": {"block_ln": True, "final_ln": False, "ffn_act": "gelu"},
    "SM+LN+R": {"block_ln": True, "final_ln": False, "ffn_act": "relu"},
    "SM+ScFuFFN": {"block_ln": False, "final_ln": False, "ffn_act": "none", "ffn_scale": True, "ffn_fused": True},
}


@dataclass(frozen=True)
class PublishedCost:
    """One published SecretFlow measurement: one output token over T input tokens, GPT-2 small width."""

    variant: str  # a key of PUBLISHED_VARIANTS
    n_layer: int
    context_length: int
    vocab_size: int
    comm_gb: float
    latency_min: float

    def model_config(self) -> ModelConfig:
        return ModelConfig(size="gpt2-small", n_layer=self.n_layer, **PUBLISHED_VARIANTS[self.variant])


# CodeParrot at T=128 (Table 3), at T=256 (Table 7) and with 18 layers (Table 8), Languini books at T=512 (Table 4).
PUBLISHED_COSTS = (
    PublishedCost("SM+LN+G", 12, 128, CODEPARROT_VOCAB_SIZE, 25.32, 8.21),
    PublishedCost("SM+LN+R", 12, 128, CODEPARROT_VOCAB_SIZE, 9.44, 6.06),
    PublishedCost("SM+ScFuFFN", 12, 128, CODEPARROT_VOCAB_SIZE, 6.43, 4.76),
    PublishedCost("SM+LN+G", 12, 256, CODEPARROT_VOCAB_SIZE, 58.51, 16.57),
    PublishedCost("SM+LN+R", 12, 256, CODEPARROT_VOCAB_SIZE, 26.73, 12.59),
    PublishedCost("SM+ScFuFFN", 12, 256, CODEPARROT_VOCAB_SIZE, 20.72, 10.45),
    PublishedCost("SM+LN+G", 18, 128, CODEPARROT_VOCAB_SIZE, 37.17, 10.77),
    PublishedCost("SM+LN+R", 18, 128, CODEPARROT_VOCAB_SIZE, 13.34, 8.04),
    PublishedCost("SM+ScFuFFN", 18, 128, CODEPARROT_VOCAB_SIZE, 8.83, 6.07),
    PublishedCost("SM+LN+G", 12, 512, LANGUINI_VOCAB_SIZE, 145.24, 30.74),
    PublishedCost("SM+LN+R", 12, 512, LANGUINI_VOCAB_SIZE, 81.71, 23.54),
    PublishedCost("SM+ScFuFFN", 12, 512, LANGUINI_VOCAB_SIZE, 69.68, 19.44),
)
TARGETS = ("comm_gb", "latency_min")


def _design_matrix(rows) -> np.ndarray:
    """Return the (rows, features) matrix of cost features for published measurements."""
    table = [cost_features(row.model_config(), row.context_length, row.vocab_size) for row in rows]
    return np.array([[features[name] for name in FEATURES] for features in table])  # (n_rows, n_features)


def _targets(rows, target: str) -> np.ndarray:
    return np.array([getattr(row, target) for row in rows])


# -----------------------------------------------------------------------------
# Fit, leave-one-out check and estimates

@dataclass(frozen=True)
class CostModel:
    """Non-negative coefficients per feature (keys of FEATURES), one set per target."""

    comm_gb: dict[str, float]
    latency_min: dict[str, float]

    def predict(self, features: dict[str, float], target: str) -> float:
        coefficients = getattr(self, target)
        return sum(coefficients[name] * features[name] for name in FEATURES)


@functools.lru_cache(maxsize=1)
def fit_cost_model() -> CostModel:
    """Fit comm and latency separately by non-negative least squares on all published rows."""
    X = _design_matrix(PUBLISHED_COSTS)
    coefficients = {}
    for target in TARGETS:
        solution, _ = nnls(X, _targets(PUBLISHED_COSTS, target))
        coefficients[target] = dict(zip(FEATURES, solution.tolist()))
    return CostModel(**coefficients)


@dataclass(frozen=True)
class LooErrors:
    """Leave-one-out relative errors |predicted - published| / published, in PUBLISHED_COSTS order."""

    target: str
    per_row: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_row))

    @property
    def max(self) -> float:
        return float(np.max(self.per_row))


@functools.lru_cache(maxsize=1)
def loo_errors() -> dict[str, LooErrors]:
    """Refit without each published row in turn and return its relative prediction error, per target."""
    X = _design_matrix(PUBLISHED_COSTS)
    errors = {}
    for target in TARGETS:
        y = _targets(PUBLISHED_COSTS, target)
        per_row = []
        for held_out in range(len(y)):
            keep = np.arange(len(y)) != held_out
            solution, _ = nnls(X[keep], y[keep])
            predicted, published = float(X[held_out] @ solution), float(y[held_out])
            per_row.append(abs(predicted - published) / published)
        errors[target] = LooErrors(target, tuple(per_row))
    return errors


@dataclass(frozen=True)
class PiCost:
    """Estimated private-inference cost of one output token over T input tokens."""

    comm_gb: float
    latency_min: float


def estimate_cost(cfg: RunConfig | ModelConfig, context_length: int | None = None,
                  vocab_size: int | None = None) -> PiCost:
    """Estimate communication (GB) and latency (minutes) with the fitted cost model.

    vocab_size defaults to the config's tokenizer (50257 for gpt2) for a RunConfig, and to the CodeParrot
    tokenizer's 50K for a ModelConfig.
    NOTE: the fit saw only d=768 with 12 heads, L of 12 or 18 and T of 128, 256 or 512, so other sizes
    extrapolate. LayerNorm and ReLU share one coefficient, which the latency fit sets to zero.
    """
    features = cost_features(cfg, context_length, vocab_size)
    model = fit_cost_model()
    return PiCost(model.predict(features, "comm_gb"), model.predict(features, "latency_min"))


# -----------------------------------------------------------------------------
# Tables

def _metrics(cfg, context_length: int | None, vocab_size: int | None) -> dict[str, float]:
    cost = estimate_cost(cfg, context_length, vocab_size)
    return {
        "comm_gb": cost.comm_gb,
        "latency_min": cost.latency_min,
        "ffn_flops": ffn_flops(cfg, context_length),
        "attention_flops": attention_flops(cfg, context_length),
        "nonlinear_elements": sum(op_elements(nonlinear_ops(cfg, context_length)).values()),
    }


def savings(model_cfg: RunConfig | ModelConfig, baseline_cfg: RunConfig | ModelConfig,
            context_length: int | None = None, vocab_size: int | None = None) -> dict[str, float]:
    """Return the relative reductions of model_cfg against baseline_cfg.

    `<metric>_reduction` is 1 - model / baseline (0.75 means 75% less) for comm_gb, latency_min,
    ffn_flops, attention_flops and nonlinear_elements. `comm_factor` and `latency_factor` are
    baseline / model, the "3.94x less communication" form.
    """
    model = _metrics(model_cfg, context_length, vocab_size)
    baseline = _metrics(baseline_cfg, context_length, vocab_size)
    result = {f"{name}_reduction": 1.0 - model[name] / baseline[name] for name in model if baseline[name]}
    result["comm_factor"] = baseline["comm_gb"] / model["comm_gb"]
    result["latency_factor"] = baseline["latency_min"] / model["latency_min"]
    return result


def cost_row(cfg: RunConfig | ModelConfig, name: str | None = None, context_length: int | None = None,
             vocab_size: int | None = None) -> dict:
    """Return one table row: name, nonlinear ops in the published style, FLOPs, comm (GB), latency (min).

    FLOPs are ints, and format_flops prints them as "14.5B". name defaults to a RunConfig's name.
    """
    cost = estimate_cost(cfg, context_length, vocab_size)
    if name is None:
        name = cfg.name if isinstance(cfg, RunConfig) else ""
    return {
        "name": name,
        "nonlinear_ops": format_ops(nonlinear_ops(cfg, context_length)),
        "ffn_flops": ffn_flops(cfg, context_length),
        "attention_flops": attention_flops(cfg, context_length),
        "comm_gb": cost.comm_gb,
        "latency_min": cost.latency_min,
    }
