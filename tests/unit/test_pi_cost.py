"""Tests for harness.pi_cost: op counts and FLOPs against the published tables, and the fitted cost model.

Published values (Jha and Reagen 2025): Table 3 (T=128), Table 7 (T=256), Table 8 (18 layers). The
published baseline counts 24 LayerNorms, i.e. no final LayerNorm, so those rows use model.final_ln=false.
"""

import pytest

from harness import pi_cost
from harness.config import ModelConfig, load_config

GPT2_SMALL_T128 = ["model.size=gpt2-small", "data.context_length=128", "model.final_ln=false"]


def gpt2_config(preset, size="gpt2-small", context_length=128, final_ln=False, vocab_size=50000):
    overrides = [f"model.size={size}", f"data.context_length={context_length}",
                 f"model.final_ln={str(final_ln).lower()}", f"data.vocab_size={vocab_size}"]
    return load_config(preset, overrides)


def test_ops_baseline_t128():
    ops = pi_cost.nonlinear_ops(load_config("sm_ln_g", GPT2_SMALL_T128))
    assert ops == [
        pi_cost.NonlinearOp("softmax", 144, (128, 128)),
        pi_cost.NonlinearOp("layernorm", 24, (128, 768)),
        pi_cost.NonlinearOp("gelu", 12, (128, 3072)),
    ]
    assert pi_cost.format_ops(ops) == "144 softmax of 128x128, 24 LN of 128x768, 12 GELU of 128x3072"


def test_ops_relu_and_softmax_only():
    relu = pi_cost.nonlinear_ops(load_config("sm_ln_r", GPT2_SMALL_T128))
    fused = pi_cost.nonlinear_ops(load_config("sm_scfuffn", GPT2_SMALL_T128))
    assert pi_cost.format_ops(relu) == "144 softmax of 128x128, 24 LN of 128x768, 12 ReLU of 128x3072"
    assert pi_cost.format_ops(fused) == "144 softmax of 128x128"


def test_ops_t256_and_18_layers():
    t256 = pi_cost.nonlinear_ops(gpt2_config("sm_ln_g", context_length=256))
    deep = pi_cost.nonlinear_ops(gpt2_config("sm_ln_g", size="gpt2-small-18l"))
    assert pi_cost.format_ops(t256) == "144 softmax of 256x256, 24 LN of 256x768, 12 GELU of 256x3072"
    assert pi_cost.format_ops(deep) == "216 softmax of 128x128, 36 LN of 128x768, 18 GELU of 128x3072"


def test_ops_final_ln_counted():
    ops = pi_cost.nonlinear_ops(gpt2_config("sm_ln_g", final_ln=True))
    assert ops[1] == pi_cost.NonlinearOp("layernorm", 25, (128, 768))


def test_ops_fused_ffn_has_no_activation():
    model = ModelConfig(size="gpt2-small", block_ln=False, final_ln=False, ffn_act="gelu", ffn_fused=True)
    assert [op.op for op in pi_cost.nonlinear_ops(model, 128)] == ["softmax"]


def test_ops_weight_norm_adds_no_runtime_op():
    ops = pi_cost.nonlinear_ops(gpt2_config("sm_snorm_ffn"))
    assert [op.op for op in ops] == ["softmax"]


@pytest.mark.parametrize(
    "size, context_length, ffn, fused, attention",
    [
        ("gpt2-small", 128, "14.5B", "1.8B", "7.7B"),  # Table 3
        ("gpt2-small", 256, "29.0B", "3.6B", "16.3B"),  # Table 7
        ("gpt2-small-18l", 128, "21.7B", "2.7B", "11.6B"),  # Table 8 layout, values from the formulas
    ],
)
def test_flops_match_published_rounding(size, context_length, ffn, fused, attention):
    baseline = gpt2_config("sm_ln_g", size=size, context_length=context_length)
    softmax_only = gpt2_config("sm_scfuffn", size=size, context_length=context_length)
    assert pi_cost.format_flops(pi_cost.ffn_flops(baseline)) == ffn
    assert pi_cost.format_flops(pi_cost.ffn_flops(softmax_only)) == fused
    assert pi_cost.format_flops(pi_cost.attention_flops(baseline)) == attention
    assert pi_cost.format_flops(pi_cost.attention_flops(softmax_only)) == attention


def test_flops_formulas_18_layers():
    T, d, L = 128, 768, 18
    baseline = gpt2_config("sm_ln_g", size="gpt2-small-18l")
    softmax_only = gpt2_config("sm_scfuffn", size="gpt2-small-18l")
    assert pi_cost.ffn_flops(baseline) == 2 * T * d * 4 * d * 2 * L
    assert pi_cost.ffn_flops(softmax_only) == 2 * T * d * d * L
    assert pi_cost.attention_flops(baseline) == 2 * T * d * d * 4 * L + 3 * T * T * d * L


def test_flops_model_config_needs_context_length():
    with pytest.raises(ValueError, match="context_length"):
        pi_cost.ffn_flops(ModelConfig(size="gpt2-small"))


def test_invalid_config_type_rejected():
    with pytest.raises(ValueError, match="RunConfig or a ModelConfig"):
        pi_cost.nonlinear_ops({"n_layer": 12}, 128)


def test_invalid_ffn_act_rejected():
    with pytest.raises(ValueError, match="ffn_act"):
        pi_cost.nonlinear_ops(ModelConfig(ffn_act="swish"), 128)


def test_cost_coefficients_non_negative():
    model = pi_cost.fit_cost_model()
    for target in pi_cost.TARGETS:
        coefficients = getattr(model, target)
        assert set(coefficients) == set(pi_cost.FEATURES)
        assert all(value >= 0 for value in coefficients.values()), (target, coefficients)


def test_cost_fit_within_loo_bound():
    errors = pi_cost.loo_errors()
    for row in pi_cost.PUBLISHED_COSTS:
        cost = pi_cost.estimate_cost(row.model_config(), row.context_length, row.vocab_size)
        assert abs(cost.comm_gb - row.comm_gb) / row.comm_gb <= errors["comm_gb"].max, row
        assert abs(cost.latency_min - row.latency_min) / row.latency_min <= errors["latency_min"].max, row


def test_cost_loo_errors_bounded():
    errors = pi_cost.loo_errors()
    assert len(errors["comm_gb"].per_row) == len(pi_cost.PUBLISHED_COSTS)
    assert errors["comm_gb"].max < 0.01
    assert errors["latency_min"].mean < 0.06
    assert errors["latency_min"].max < 0.15


def test_cost_removing_nonlinearities_monotonic():
    presets = ("sm_ln_g", "sm_ln_r", "sm_ln", "sm")
    costs = [pi_cost.estimate_cost(gpt2_config(preset)) for preset in presets]
    comm = [cost.comm_gb for cost in costs]
    latency = [cost.latency_min for cost in costs]
    assert comm[0] > comm[1] > comm[2] > comm[3]
    assert latency[0] > latency[1] >= latency[2] >= latency[3]
    assert pi_cost.estimate_cost(gpt2_config("sm_g")).comm_gb < comm[0]


def test_cost_vocab_from_tokenizer():
    bpe = load_config("sm_ln_g", GPT2_SMALL_T128 + ["data.vocab_size=8192"])
    gpt2 = load_config("sm_ln_g", GPT2_SMALL_T128 + ["data.tokenizer=gpt2"])
    assert pi_cost.cost_features(bpe)["embedding"] == pytest.approx(128 * 8192 / 1e6)
    assert pi_cost.cost_features(gpt2)["embedding"] == pytest.approx(128 * 50257 / 1e6)


def test_savings_proposed_vs_baseline():
    result = pi_cost.savings(gpt2_config("sm_t_scfuffn"), gpt2_config("sm_ln_g"))
    assert result["comm_factor"] == pytest.approx(25.32 / 6.43, rel=0.01)
    assert result["ffn_flops_reduction"] == pytest.approx(0.875)
    assert result["attention_flops_reduction"] == pytest.approx(0.0)
    assert result["nonlinear_elements_reduction"] == pytest.approx(0.75)
    assert 0 < result["latency_min_reduction"] < 1


def test_cost_row_contents():
    row = pi_cost.cost_row(gpt2_config("sm_ln_g"))
    assert set(row) == {"name", "nonlinear_ops", "ffn_flops", "attention_flops", "comm_gb", "latency_min"}
    assert row["name"] == "sm_ln_g"
    assert row["nonlinear_ops"] == "144 softmax of 128x128, 24 LN of 128x768, 12 GELU of 128x3072"
    assert pi_cost.format_flops(row["ffn_flops"]) == "14.5B"
    assert row["comm_gb"] == pytest.approx(25.32, rel=0.01)
    assert row["latency_min"] == pytest.approx(8.21, rel=0.05)
