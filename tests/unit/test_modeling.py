"""Unit tests for harness/modeling.py and the attention paths it calls.

Every preset in models/ builds, trains a few AdamW steps without NaN and round-trips through
save_pretrained / from_pretrained. Other tests cover gradients to the entropy thresholds, temperatures and
FFN scales, the optimizer groups, bf16 autocast and invalid model configs.

All models are tiny (2 layers, 2 heads, d=32, T=16, vocab 64). Run with `pytest tests/unit/test_modeling.py`.
"""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from harness.attention import explicit_attention
from harness.config import PRESET_DIR, load_config
from harness.entropy import entropy_regularization_loss
from harness.modeling import EntropyGPTConfig, EntropyGPTForCausalLM, model_config_from_run

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
NO_DECAY_KEYS = ("reg_threshold_weights", "log_temperature", "ffn_alpha", "ffn_beta")


def train_steps(model, tokens, steps, lr=1e-3):
    """Run AdamW steps on CE + L_ent (lambda = 1, so the entropy path is exercised).

    Returns the (cross-entropy, total) losses of every step.
    """
    optimizer = torch.optim.AdamW(model.optim_groups(weight_decay=0.1), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(tokens, labels=tokens)
        total = out.loss + out.entropy_loss
        losses.append((out.loss.item(), total.item()))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return losses


def sharpen_attention(model):
    """Draw Q and K weights from N(0, 1): the N(0, 0.02) init gives near-uniform attention at any temperature."""
    for block in model.transformer.h:
        block.attn.q_proj.weight.data.normal_(0.0, 1.0)
        block.attn.k_proj.weight.data.normal_(0.0, 1.0)


def test_presets_found():
    assert "sm_t_scfuffn" in PRESETS
    assert "sm_ln_g" in PRESETS


# -----------------------------------------------------------------------------
# Every preset: build, train, save and load

@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_without_nan(preset, tiny_model, random_tokens):
    model = tiny_model(preset)
    tokens = random_tokens(4, 16)
    losses = train_steps(model, tokens, steps=5)
    assert all(math.isfinite(ce) and math.isfinite(total) for ce, total in losses), losses
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name

    # on one fixed batch, both the total and the cross-entropy go down
    assert losses[-1][1] < losses[0][1], losses
    assert model(tokens, labels=tokens).loss.item() < losses[0][0], losses


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_round_trips_save_pretrained(preset, tiny_model, random_tokens, tmp_path):
    model = tiny_model(preset)
    train_steps(model, random_tokens(2, 16), steps=2)
    model.save_pretrained(tmp_path)

    # saved as safetensors only, with the entropy thresholds in it
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in saved
    assert not [name for name in saved if name.endswith((".bin", ".pt", ".pth"))]
    assert "transformer.h.0.attn.reg_threshold_weights" in load_file(tmp_path / "model.safetensors")

    # same class, same trained values, same logits in eval mode
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is EntropyGPTForCausalLM
    assert loaded.config.to_diff_dict() == model.config.to_diff_dict()
    assert torch.equal(loaded.entropy_thresholds(), model.entropy_thresholds())
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    model.eval()
    loaded.eval()
    tokens = random_tokens(2, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=1e-6)


def test_gpt2_small_dims():
    cfg = load_config("sm_t_scfuffn", ["model.size=gpt2-small"])
    assert cfg.model.dims() == (12, 12, 768)
    model_cfg = model_config_from_run(cfg)
    assert (model_cfg.n_layer, model_cfg.n_head, model_cfg.n_embd) == (12, 12, 768)
    assert model_cfg.n_positions == cfg.data.context_length
    assert model_cfg.temperature_mode == "head_query"


def test_model_config_from_run_copies_switches(tiny_config):
    cfg = tiny_config("sm_t_scfuffn", ["entropy.reduction=head_mean", "entropy.max_entropy=causal"])
    model_cfg = model_config_from_run(cfg)
    assert (model_cfg.n_layer, model_cfg.n_head, model_cfg.n_embd) == (2, 2, 32)
    assert (model_cfg.vocab_size, model_cfg.n_positions) == (64, 16)
    assert (model_cfg.block_ln, model_cfg.final_ln, model_cfg.ffn_act) == (False, False, "none")
    assert (model_cfg.ffn_scale, model_cfg.ffn_fused) == (True, True)
    assert model_cfg.entropy_reduction == "head_mean"
    assert model_cfg.entropy_max_entropy == "causal"
    assert model_config_from_run(cfg, vocab_size=100).vocab_size == 100


# -----------------------------------------------------------------------------
# Forward outputs and gradients

def test_entropy_outputs_follow_mode(tiny_model, random_tokens):
    model = tiny_model("sm_t_scfuffn")
    tokens = random_tokens(2, 16)
    out = model(tokens, labels=tokens)
    assert out.head_entropy.shape == (2, 2)
    assert len(out.row_entropy) == 2
    assert out.row_entropy[0].shape == (2, 2, 16)

    # the model's entropy loss is entropy_regularization_loss with its own thresholds
    cfg = model.config
    expected = entropy_regularization_loss(
        list(out.row_entropy), model.entropy_thresholds(), cfg.n_positions,
        cfg.entropy_tolerance, cfg.entropy_reduction, cfg.entropy_max_entropy,
    )
    assert torch.allclose(out.entropy_loss, expected)

    # eval mode skips the entropy unless asked for
    model.eval()
    assert model(tokens).entropy_loss is None
    assert model(tokens, return_entropy=True).entropy_loss is not None


@pytest.mark.parametrize("mode", ["head_query", "head"])
def test_gradients_reach_entropy_parameters(mode, tiny_model, random_tokens):
    model = tiny_model("sm_t_scfuffn", [f"model.temperature.mode={mode}"])
    sharpen_attention(model)
    tokens = random_tokens(2, 16)
    out = model(tokens, labels=tokens)
    (out.loss + out.entropy_loss).backward()

    for i, block in enumerate(model.transformer.h):
        params = {
            "reg_threshold_weights": block.attn.reg_threshold_weights,
            "log_temperature": block.attn.log_temperature,
            "ffn_alpha": block.ffn_alpha,
            "ffn_beta": block.ffn_beta,
        }
        for name, param in params.items():
            assert param.grad is not None, f"layer {i}: {name} has no gradient"
            assert torch.isfinite(param.grad).all(), f"layer {i}: {name}"
            assert param.grad.abs().sum() > 0, f"layer {i}: {name} has a zero gradient"

    # Query row 0 attends to one key, so its temperature has no effect (up to rounding). Later rows get a gradient.
    if mode == "head_query":
        grad = model.transformer.h[0].attn.log_temperature.grad  # (H, T)
        assert grad.shape == (2, 16)
        assert grad[:, 0].abs().max() < 1e-6 * grad.abs().max()
        assert (grad[:, 1:].abs().mean(dim=1) > 1e-4).all()


def test_higher_temperature_raises_entropy(tiny_model, random_tokens):
    model = tiny_model("sm_t_scfuffn", ["model.temperature.mode=head"]).eval()
    sharpen_attention(model)
    tokens = random_tokens(2, 16)
    entropies = []
    for t in (0.1, 1.0, 10.0):
        for block in model.transformer.h:
            block.attn.log_temperature.data.fill_(math.log(t))
        with torch.no_grad():
            entropies.append(model(tokens, return_entropy=True).head_entropy.mean().item())
    assert entropies[0] < entropies[1] < entropies[2]


def test_ffn_scaling_formula(tiny_model):
    block = tiny_model("sm_scffn").transformer.h[0]
    block.ffn_alpha.data.fill_(2.0)
    block.ffn_beta.data.fill_(3.0)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        out, _, _ = block(x, need_entropy=False)
        x_sa = x + block.attn(x, need_entropy=False)[0]
        expected = 3.0 * x_sa + block.mlp(x_sa) / 2.0
    assert torch.allclose(out, expected, atol=1e-6)


def test_explicit_and_fused_attention_agree(tiny_model, random_tokens):
    explicit = tiny_model("sm_t_scfuffn", ["model.attn_impl=explicit"])
    fused = tiny_model("sm_t_scfuffn", ["model.attn_impl=fused"])
    fused.load_state_dict(explicit.state_dict())
    tokens = random_tokens(2, 16)
    out_explicit = explicit(tokens, labels=tokens)
    out_fused = fused(tokens, labels=tokens)
    assert torch.allclose(out_fused.logits, out_explicit.logits, atol=1e-5)
    for a, b in zip(out_fused.row_entropy, out_explicit.row_entropy):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(out_fused.entropy_loss, out_explicit.entropy_loss, rtol=1e-4)


# -----------------------------------------------------------------------------
# bf16 autocast

@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_bf16_autocast_entropy_and_loss_finite(impl, tiny_model, random_tokens):
    model = tiny_model("sm_t_scfuffn", [f"model.attn_impl={impl}"])
    tokens = random_tokens(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, labels=tokens)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(out.entropy_loss)
    assert torch.isfinite(out.head_entropy).all()
    assert all(torch.isfinite(h).all() for h in out.row_entropy)

    (out.loss + out.entropy_loss).backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


def test_explicit_entropy_under_autocast_matches_fp32():
    q, k, v = (torch.randn(2, 2, 16, 8) * 3 for _ in range(3))
    _, reference = explicit_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, entropy = explicit_attention(q, k, v)
    assert entropy.dtype == torch.float32
    assert torch.allclose(entropy, reference, atol=1e-5)


# -----------------------------------------------------------------------------
# Optimizer groups

def expect_no_decay(name: str) -> bool:
    """Thresholds, temperatures, alpha, beta, biases, LayerNorm gains and weight-norm magnitudes."""
    is_layer_norm = ".ln_1." in name or ".ln_2." in name or name.startswith("transformer.ln_f.")
    special = any(key in name for key in NO_DECAY_KEYS)
    return special or is_layer_norm or name.endswith(".bias") or name.endswith("original0")


@pytest.mark.parametrize("preset", ["sm_t_scfuffn", "sm_ln_g", "sm_wnorm_ffn", "sm_snorm_ffn"])
def test_optim_groups_split(preset, tiny_model):
    model = tiny_model(preset)
    decay_group, no_decay_group = model.optim_groups(weight_decay=0.1)
    assert decay_group["weight_decay"] == 0.1
    assert no_decay_group["weight_decay"] == 0.0

    decay = {id(p) for p in decay_group["params"]}
    no_decay = {id(p) for p in no_decay_group["params"]}
    assert not decay & no_decay
    for name, param in model.named_parameters():
        group = no_decay if expect_no_decay(name) else decay
        assert id(param) in group, f"{name} is in the wrong group"
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_optim_groups_cover_every_kind(tiny_model):
    model = tiny_model("sm_t_scfuffn", ["model.block_ln=true"])
    names = {id(p): n for n, p in model.named_parameters()}
    decay_group, no_decay_group = model.optim_groups(weight_decay=0.1)
    no_decay = {names[id(p)] for p in no_decay_group["params"]}
    decay = {names[id(p)] for p in decay_group["params"]}
    for name in [
        "transformer.h.0.attn.reg_threshold_weights",
        "transformer.h.0.attn.log_temperature",
        "transformer.h.0.ffn_alpha",
        "transformer.h.0.ffn_beta",
        "transformer.h.0.attn.q_proj.bias",
        "transformer.h.0.ln_1.weight",
    ]:
        assert name in no_decay, name
    for name in ["transformer.wte.weight", "transformer.h.0.attn.q_proj.weight", "transformer.h.0.mlp.c_fused.weight"]:
        assert name in decay, name


# -----------------------------------------------------------------------------
# Bad input

def test_sequence_longer_than_context_rejected(tiny_model, random_tokens):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"sequence length 17 .*n_positions=16"):
        model(random_tokens(1, 17))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"ffn_act": "swish"}, r"ffn_act='swish'"),
        ({"attn_impl": "flash"}, r"attn_impl='flash'"),
        ({"temperature_mode": "layer"}, r"temperature_mode='layer'"),
        ({"n_embd": 30, "n_head": 4}, r"n_embd=30"),
        ({"temperature_init": 0.0}, r"temperature_init=0\.0"),
        ({"entropy_tolerance": 1.5}, r"gamma=1\.5"),
    ],
)
def test_invalid_model_config_rejected(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        EntropyGPTConfig(**kwargs)


def test_output_attentions_match_released_loss(tiny_model, random_tokens):
    """output_attentions gives (B, H, T, T) probabilities whose released-style loss equals entropy_loss."""
    from harness.entropy import EntropyRegularization

    model = tiny_model("sm_t_scfuffn")
    x = random_tokens(2, 16)
    out = model(x, labels=x, return_entropy=True, output_attentions=True)
    cfg = model.config
    assert len(out.attentions) == cfg.n_layer
    assert out.attentions[0].shape == (2, cfg.n_head, 16, 16)
    thresholds = [block.attn.reg_threshold_weights for block in model.transformer.h]
    reg = EntropyRegularization(loss_coeff=1.0, tolerance_margin_factor=cfg.entropy_tolerance, context_size=cfg.n_positions)
    released = reg.compute_loss(out.attentions, thresholds, cfg.n_head, cfg.n_layer)
    torch.testing.assert_close(released, out.entropy_loss, rtol=1e-5, atol=1e-6)
