"""Unit tests for the fused attention entropy (harness/fused_entropy.py, `causal_attention(impl="fused")`).

The fused path must match the explicit reference path in the output, the row entropy and the gradients
to q, k and v. It does so in fp32 (atol 1e-5) and under bf16 autocast, for context lengths from 1 to a
few query blocks. A whole tiny model with either path must give the same loss, entropy loss, head entropy and
parameter gradients (thresholds, temperatures, alpha and beta included). gradcheck runs in float64, and
a check on saved tensors shows that no (B, nh, T, T) tensor is kept for the backward pass. CUDA variants
run only where a GPU is present. Run with `pytest tests/unit/test_fused_entropy.py`.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import harness.fused_entropy as fused_entropy
from harness.attention import causal_attention
from harness.config import load_config
from harness.fused_entropy import BlockwiseAttention, fused_attention_entropy
from harness.modeling import EntropyGPTForCausalLM, model_config_from_run

LENGTHS = [1, 2, 7, 64, 65, 130]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_qkv(batch=2, n_head=3, length=16, head_size=8, device="cpu", dtype=torch.float32, spread=1.0):
    """Return q, k, v (B, nh, T, hs) that require grad. A larger spread gives more peaked attention, and k has an offset."""
    q = torch.randn(batch, n_head, length, head_size) * spread
    k = torch.randn(batch, n_head, length, head_size) * spread + 0.5
    v = torch.randn(batch, n_head, length, head_size)
    return [x.to(device, dtype).requires_grad_() for x in (q, k, v)]


def outputs_and_grads(q, k, v, impl):
    """Return (y, entropy, (dq, dk, dv)) for a random linear function of both outputs."""
    y, entropy = causal_attention(q, k, v, need_entropy=True, impl=impl)
    generator = torch.Generator(device="cpu").manual_seed(7)
    weight_y = torch.randn(y.shape, generator=generator).to(y.device)
    weight_entropy = torch.randn(entropy.shape, generator=generator).to(y.device)
    objective = (y.float() * weight_y).sum() + (entropy * weight_entropy).sum()
    grads = torch.autograd.grad(objective, [q, k, v])
    return y, entropy, grads


def assert_paths_agree(q, k, v, atol, rtol=0.0):
    y_ref, entropy_ref, grads_ref = outputs_and_grads(q, k, v, "explicit")
    y, entropy, grads = outputs_and_grads(q, k, v, "fused")
    assert entropy.dtype == torch.float32
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(entropy, entropy_ref, atol=atol, rtol=rtol)
    for name, grad, grad_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(grad.float(), grad_ref.float(), atol=atol, rtol=rtol, msg=f"gradient to {name}")


def small_blocks(monkeypatch):
    """Use 4-row blocks of 2 heads, so short sequences cross several block and head-chunk borders."""
    monkeypatch.setattr(fused_entropy, "BLOCK_ROWS", 4)
    monkeypatch.setattr(fused_entropy, "BLOCK_ELEMENTS", 2 * 4 * 4)


# -----------------------------------------------------------------------------
# Attention level: fused vs explicit

@pytest.mark.parametrize("length", LENGTHS)
def test_fused_matches_explicit_fp32(length):
    q, k, v = make_qkv(length=length)
    assert_paths_agree(q, k, v, atol=1e-5)


def float64_reference(q, k, v):
    """Return (y, entropy) of causal attention computed in float64 with the T x T probabilities."""
    q, k, v = (x.double() for x in (q, k, v))
    length = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, nh, T, T)
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    masked = scores.masked_fill(future, float("-inf"))
    probs = masked.softmax(dim=-1)
    entropy = masked.logsumexp(dim=-1) - (probs * scores.masked_fill(future, 0.0)).sum(dim=-1)
    return probs @ v, entropy


@pytest.mark.parametrize("length", [7, 130, 300])
def test_fused_matches_float64_with_peaked_attention(length):
    # scores up to ~30 lose ~1e-5 to fp32 rounding (the explicit path's entropy gradient up to 8e-4), so
    # compare with a float64 reference
    q, k, v = make_qkv(length=length, spread=3.0)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    y_ref, entropy_ref = float64_reference(q64, k64, v64)
    y, entropy = causal_attention(q, k, v, need_entropy=True, impl="fused")
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), entropy_ref, atol=5e-5, rtol=0.0)

    # gradients of the same random linear function of both outputs
    weight_y, weight_entropy = torch.randn(y.shape).double(), torch.randn(entropy.shape).double()
    grads_ref = torch.autograd.grad((y_ref * weight_y).sum() + (entropy_ref * weight_entropy).sum(), [q64, k64, v64])
    grads = torch.autograd.grad((y * weight_y).sum() + (entropy * weight_entropy).sum(), [q, k, v])
    for name, grad, grad_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(grad.double(), grad_ref, atol=2e-4, rtol=0.0, msg=f"gradient to {name}")


@pytest.mark.parametrize("length", [1, 3, 9, 16])
def test_fused_matches_explicit_small_blocks(length, monkeypatch):
    small_blocks(monkeypatch)
    q, k, v = make_qkv(batch=3, length=length)
    assert_paths_agree(q, k, v, atol=1e-5)


@pytest.mark.parametrize("length", [1, 33, 130])
def test_fused_matches_explicit_bf16(length):
    # both paths compute scores in fp32 from the same bf16 q and k; y differs by bf16 rounding of P @ v
    q, k, v = make_qkv(length=length, dtype=torch.bfloat16)
    y_ref, entropy_ref, grads_ref = outputs_and_grads(q, k, v, "explicit")
    y, entropy, grads = outputs_and_grads(q, k, v, "fused")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(entropy, entropy_ref, atol=1e-5, rtol=0.0)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=1e-2)
    for name, grad, grad_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(grad.float(), grad_ref.float(), atol=5e-2, rtol=2e-2, msg=f"gradient to {name}")


def test_fused_entropy_of_one_token_is_zero():
    q, k, v = make_qkv(length=1)
    y, entropy = causal_attention(q, k, v, need_entropy=True, impl="fused")
    torch.testing.assert_close(y, v.detach())
    assert entropy.abs().max() < 1e-5


def test_fused_without_entropy_returns_none():
    q, k, v = make_qkv(length=9)
    y, entropy = causal_attention(q, k, v, need_entropy=False, impl="fused")
    y_ref, _ = causal_attention(q, k, v, need_entropy=True, impl="explicit")
    assert entropy is None
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0.0)


def test_causal_attention_rejects_unknown_impl():
    q, k, v = make_qkv(length=4)
    with pytest.raises(ValueError, match="invalid attention implementation 'flash'"):
        causal_attention(q, k, v, need_entropy=True, impl="flash")


def test_fused_entropy_gradcheck_float64(monkeypatch):
    small_blocks(monkeypatch)
    q, k, v = make_qkv(batch=1, n_head=3, length=9, head_size=4, dtype=torch.float64, spread=1.0)
    assert torch.autograd.gradcheck(lambda *x: fused_attention_entropy(*x), (q, k, v))


def test_blockwise_attention_gradcheck_float64(monkeypatch):
    small_blocks(monkeypatch)
    q, k, v = make_qkv(batch=1, n_head=2, length=6, head_size=3, dtype=torch.float64, spread=1.0)
    q, k, v = (x.detach().flatten(0, 1).requires_grad_() for x in (q, k, v))
    extra = torch.randn_like(k)

    # lse is not differentiable, so gradcheck checks the output only
    def output(q, k, v):
        return BlockwiseAttention.apply(q, k, v, extra, 0.5)[0]

    assert torch.autograd.gradcheck(output, (q, k, v))


# -----------------------------------------------------------------------------
# Memory: nothing of size T x T

class MaxNumel(TorchDispatchMode):
    """Record the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(item, torch.Tensor):
                self.max_numel = max(self.max_numel, item.numel())
        return out


def test_fused_keeps_no_square_tensor_for_backward():
    batch, n_head, length = 2, 2, 160
    q, k, v = make_qkv(batch=batch, n_head=n_head, length=length)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y, entropy = causal_attention(q, k, v, need_entropy=True, impl="fused")
    assert saved
    assert all(shape[-2:] != (length, length) for shape in saved), saved

    # the explicit path keeps the probabilities, so the check can fail
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        causal_attention(q, k, v, need_entropy=True, impl="explicit")
    assert any(shape[-2:] == (length, length) for shape in saved)


def test_fused_builds_no_square_tensor():
    batch, n_head, length = 2, 2, 160
    q, k, v = make_qkv(batch=batch, n_head=n_head, length=length)
    with MaxNumel() as mode:
        y, entropy = causal_attention(q, k, v, need_entropy=True, impl="fused")
        (y.sum() + entropy.sum()).backward()
    assert mode.max_numel < batch * n_head * length * length


# -----------------------------------------------------------------------------
# Whole model: fused vs explicit with the same weights

def model_pair(temperature_mode, length=24, device="cpu"):
    """Return (explicit, fused) tiny sm_t_scfuffn models with the same weights and peaked attention."""
    overrides = [
        "model.size=tiny", f"data.context_length={length}", "data.vocab_size=64",
        f"model.temperature.mode={temperature_mode}", "model.temperature.init=0.7",
        "model.alpha_init=1.3", "model.beta_init=0.8", "entropy.threshold_init=0.3",
    ]
    models = []
    for impl in ("explicit", "fused"):
        cfg = load_config("sm_t_scfuffn", [*overrides, f"model.attn_impl={impl}"])
        models.append(EntropyGPTForCausalLM(model_config_from_run(cfg)).to(device).train())
    explicit, fused = models

    # sharper attention than the N(0, 0.02) init, so the entropy penalty is active on some rows
    with torch.no_grad():
        for block in explicit.transformer.h:
            block.attn.q_proj.weight.normal_(0.0, 0.5)
            block.attn.k_proj.weight.normal_(0.0, 0.5)
            if block.attn.log_temperature is not None:
                block.attn.log_temperature.uniform_(-0.5, 0.5)
    fused.load_state_dict(explicit.state_dict())
    return explicit, fused


def model_outputs_and_grads(model, tokens, autocast_dtype=None):
    """Return (output, {parameter name: gradient}) for CE + L_ent (lambda = 1, so the entropy path counts).

    One token has no next-token target, so there the mean squared logit replaces the cross-entropy.
    """
    device = tokens.device.type
    labels = tokens if tokens.shape[1] > 1 else None
    with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(tokens, labels=labels)
    task_loss = out.loss if labels is not None else out.logits.float().square().mean()
    (task_loss + out.entropy_loss).backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
    return out, grads


def assert_close_to_max(actual, expected, tol, name):
    """Assert max |actual - expected| <= tol * max |expected| + 1e-7: gradients differ in scale by 1e6 here."""
    error = (actual.float() - expected.float()).abs().max().item()
    bound = tol * expected.float().abs().max().item() + 1e-7
    assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


def assert_models_agree(explicit, fused, tokens, tol, autocast_dtype=None):
    out_ref, grads_ref = model_outputs_and_grads(explicit, tokens, autocast_dtype)
    out, grads = model_outputs_and_grads(fused, tokens, autocast_dtype)
    if tokens.shape[1] > 1:
        assert out_ref.entropy_loss > 0
        torch.testing.assert_close(out.loss, out_ref.loss, atol=0.0, rtol=tol)
    torch.testing.assert_close(out.entropy_loss, out_ref.entropy_loss, atol=0.0, rtol=tol)
    assert_close_to_max(out.head_entropy, out_ref.head_entropy, tol, "head entropy")
    assert grads.keys() == grads_ref.keys()
    for name in ("reg_threshold_weights", "log_temperature", "ffn_alpha", "ffn_beta"):
        assert any(name in key for key in grads), name
    for name, grad_ref in grads_ref.items():
        if name.endswith("k_proj.bias"):
            # a key bias adds q_i.b to every score of row i, which softmax ignores: both gradients are rounding noise
            assert grads[name].abs().max() < 1e-5, name
            continue
        assert_close_to_max(grads[name], grad_ref, tol, f"gradient to {name}")


@pytest.mark.parametrize("temperature_mode", ["head_query", "head"])
@pytest.mark.parametrize("length", [1, 24])
def test_model_fused_matches_explicit_fp32(temperature_mode, length):
    explicit, fused = model_pair(temperature_mode, length=24)
    tokens = torch.randint(0, 64, (2, length))
    assert_models_agree(explicit, fused, tokens, tol=5e-5)


@pytest.mark.parametrize("temperature_mode", ["head_query", "head"])
def test_model_fused_matches_explicit_bf16(temperature_mode):
    # the paths differ in the bf16 rounding of the attention output, which later bf16 layers amplify
    explicit, fused = model_pair(temperature_mode)
    tokens = torch.randint(0, 64, (2, 24))
    assert_models_agree(explicit, fused, tokens, tol=2e-2, autocast_dtype=torch.bfloat16)


# -----------------------------------------------------------------------------
# CUDA: the memory-efficient kernel and the blockwise fallback

def test_cuda_kernel_calls_run_on_meta_tensors():
    # meta tensors check the aten call signatures, the lse padding and the gradient shapes without a GPU
    q, k, v, extra = (torch.empty(2, 3, 40, 8, device="meta", requires_grad=i < 3) for i in range(4))
    out, lse = fused_entropy._cuda_attention(q, k, v, extra, 0.5)
    assert out.shape == (2, 3, 40, 16)
    assert lse.shape == (2, 3, 40)
    assert not lse.requires_grad
    grads = torch.autograd.grad(out.sum(), [q, k, v])
    assert [tuple(g.shape) for g in grads] == [(2, 3, 40, 8)] * 3


@CUDA
@pytest.mark.parametrize("length", [1, 33, 130])
def test_fused_matches_explicit_cuda(length):
    q, k, v = make_qkv(length=length, device="cuda")
    assert_paths_agree(q, k, v, atol=1e-4, rtol=1e-4)


@CUDA
def test_fused_matches_explicit_cuda_bf16():
    q, k, v = make_qkv(length=130, device="cuda", dtype=torch.bfloat16)
    _, entropy_ref, _ = outputs_and_grads(q, k, v, "explicit")
    _, entropy, _ = outputs_and_grads(q, k, v, "fused")
    torch.testing.assert_close(entropy, entropy_ref, atol=5e-2, rtol=2e-2)


@CUDA
def test_blockwise_matches_explicit_cuda(monkeypatch):
    def failing_kernel(*args):
        raise RuntimeError("memory-efficient kernel switched off for this test")

    monkeypatch.setattr(fused_entropy, "_cuda_attention", failing_kernel)
    q, k, v = make_qkv(length=130, device="cuda")
    assert_paths_agree(q, k, v, atol=1e-4, rtol=1e-4)


@CUDA
def test_model_fused_matches_explicit_cuda():
    explicit, fused = model_pair("head_query", device="cuda")
    tokens = torch.randint(0, 64, (2, 24), device="cuda")
    assert_models_agree(explicit, fused, tokens, tol=1e-4)
