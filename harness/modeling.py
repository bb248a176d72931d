"""The paper's GPT-2 model family as a transformers PreTrainedModel, with attention entropy built in.

One config switches between the variants of the paper's tables: LayerNorm in the blocks and before the
LM head, FFN activation (gelu, relu, none), learnable FFN scaling (alpha, beta per layer), a fused d x d
FFN, weight or spectral normalization, and a learnable attention temperature. Every attention layer owns
its entropy thresholds and computes its row entropy itself, so the loss and the statistics do not depend
on `output_attentions` (which SDPA ignores). Registered with AutoConfig and AutoModelForCausalLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations
from transformers import initialization as init
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from harness.attention import ATTENTION_IMPLS, causal_attention, explicit_attention_probs
from harness.entropy import MAX_ENTROPY_MODES, REDUCTIONS, check_loss_args, head_entropy, layer_entropy_penalty

FFN_ACTIVATIONS = ("gelu", "relu", "none")
NORM_KINDS = ("none", "weight", "spectral")
NORM_TARGETS = {
    "ffn": ("ffn",),
    "qk": ("q", "k"),
    "qk_ffn": ("q", "k", "ffn"),
    "qkv_ffn": ("q", "k", "v", "ffn"),
    "qkvo_ffn": ("q", "k", "v", "o", "ffn"),
}
TEMPERATURE_MODES = ("head_query", "head", "off")


class EntropyGPTConfig(PretrainedConfig):
    """Config of the entropy-guided GPT-2 family; defaults give the pre-LN GPT-2 baseline (SM+LN+G)."""

    model_type = "entropy_gpt"

    def __init__(
        self,
        vocab_size: int = 8192,
        n_positions: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        block_ln: bool = True,
        final_ln: bool = True,
        ffn_act: str = "gelu",
        ffn_fused: bool = False,
        ffn_scale: bool = False,
        alpha_init: float = 1.0,
        beta_init: float = 1.0,
        norm: str = "none",
        norm_on: str = "ffn",
        temperature_mode: str = "off",
        temperature_init: float = 1.0,
        attn_impl: str = "fused",
        entropy_threshold_init: float = 0.5,
        entropy_tolerance: float = 0.2,
        entropy_reduction: str = "row_sum",
        entropy_max_entropy: str = "log_t",
        initializer_range: float = 0.02,
        layer_norm_epsilon: float = 1e-5,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size, self.n_positions = vocab_size, n_positions
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.block_ln, self.final_ln = block_ln, final_ln
        self.ffn_act, self.ffn_fused, self.ffn_scale = ffn_act, ffn_fused, ffn_scale
        self.alpha_init, self.beta_init = alpha_init, beta_init
        self.norm, self.norm_on = norm, norm_on
        self.temperature_mode, self.temperature_init = temperature_mode, temperature_init
        self.attn_impl = attn_impl
        self.entropy_threshold_init = entropy_threshold_init
        self.entropy_tolerance = entropy_tolerance
        self.entropy_reduction = entropy_reduction
        self.entropy_max_entropy = entropy_max_entropy
        self.initializer_range, self.layer_norm_epsilon = initializer_range, layer_norm_epsilon
        kwargs.setdefault("bos_token_id", 0)
        kwargs.setdefault("eos_token_id", 0)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_switches()

    # names that generic code (lm-eval, Trainer) looks up
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    def validate_switches(self) -> None:
        """Raise ValueError naming the first invalid switch and its accepted values."""
        choices = {
            "ffn_act": (self.ffn_act, FFN_ACTIVATIONS),
            "norm": (self.norm, NORM_KINDS),
            "norm_on": (self.norm_on, tuple(NORM_TARGETS)),
            "temperature_mode": (self.temperature_mode, TEMPERATURE_MODES),
            "attn_impl": (self.attn_impl, ATTENTION_IMPLS),
            "entropy_reduction": (self.entropy_reduction, REDUCTIONS),
            "entropy_max_entropy": (self.entropy_max_entropy, MAX_ENTROPY_MODES),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"invalid {name}={value!r}: accepted values are {list(allowed)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"invalid n_embd={self.n_embd}: not divisible by n_head={self.n_head}")
        if self.temperature_init <= 0:
            raise ValueError(f"invalid temperature_init={self.temperature_init}: must be > 0")
        check_loss_args(0.0, self.entropy_tolerance, self.entropy_reduction)


@dataclass
class EntropyCausalLMOutput(CausalLMOutput):
    """CausalLMOutput plus the entropy terms: `loss` is the cross-entropy only.

    entropy_loss: L_ent, the unscaled regularizer (multiply by lambda); head_entropy: (L, H);
    row_entropy: per layer (B, H, T). All three are None when entropy was not requested.
    """

    entropy_loss: torch.FloatTensor | None = None
    head_entropy: torch.FloatTensor | None = None
    row_entropy: tuple[torch.FloatTensor, ...] | None = None


def _normalize(linear: nn.Linear, kind: str, std: float) -> nn.Linear:
    """Initialize the weight N(0, std), then register weight or spectral normalization on it."""
    if kind == "none":
        return linear
    with torch.no_grad():
        linear.weight.normal_(0.0, std)
    if kind == "weight":
        return parametrizations.weight_norm(linear)
    return parametrizations.spectral_norm(linear)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with learnable entropy thresholds and optional temperature."""

    def __init__(self, config: EntropyGPTConfig):
        super().__init__()
        d, self.n_head = config.n_embd, config.n_head
        self.config = config
        targets = NORM_TARGETS[config.norm_on] if config.norm != "none" else ()
        std = config.initializer_range

        # Q and K projections have biases; V and the output projection have none
        self.q_proj = _normalize(nn.Linear(d, d, bias=True), config.norm if "q" in targets else "none", std)
        self.k_proj = _normalize(nn.Linear(d, d, bias=True), config.norm if "k" in targets else "none", std)
        self.v_proj = _normalize(nn.Linear(d, d, bias=False), config.norm if "v" in targets else "none", std)
        self.o_proj = _normalize(nn.Linear(d, d, bias=False), config.norm if "o" in targets else "none", std)

        # theta(l, h): the name matches the released Trainer example, which reads attn.reg_threshold_weights
        self.reg_threshold_weights = nn.Parameter(torch.full((config.n_head,), float(config.entropy_threshold_init)))

        # learnable temperature t > 0 through its log: (H, T) per query position, (H, 1) per head
        t_shape = {"head_query": (config.n_head, config.n_positions), "head": (config.n_head, 1)}
        self.log_temperature = None
        if config.temperature_mode != "off":
            init = math.log(config.temperature_init)
            self.log_temperature = nn.Parameter(torch.full(t_shape[config.temperature_mode], init))

    def forward(self, x: torch.Tensor, need_entropy: bool, output_attentions: bool = False):
        """Return (output (B, T, C), row entropy (B, nh, T) or None, probabilities (B, nh, T, T) or None)."""
        B, T, C = x.shape
        hs = C // self.n_head

        # project and split heads
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)

        # temperature: softmax(q.k / (t_i sqrt(hs))) is softmax((q / t_i).k / sqrt(hs))
        if self.log_temperature is not None:
            t = self.log_temperature[:, :T].exp() if self.log_temperature.shape[1] > 1 else self.log_temperature.exp()
            q = q / t[None, :, :, None].to(q.dtype)  # (B, nh, T, hs)

        # attention and the entropy of every query row; returning probabilities needs the explicit path
        probs = None
        if output_attentions:
            y, row_entropy, probs = explicit_attention_probs(q, k, v)  # ..., (B, nh, T, T)
            row_entropy = row_entropy if need_entropy else None
        else:
            y, row_entropy = causal_attention(q, k, v, need_entropy, self.config.attn_impl)  # (B, nh, T, hs), (B, nh, T)

        # re-assemble heads and project out
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.o_proj(y), row_entropy, probs

    def entropy_penalty(self, row_entropy: torch.Tensor) -> torch.Tensor:
        """Return this layer's L_layer for its own thresholds."""
        cfg = self.config
        return layer_entropy_penalty(
            row_entropy, self.reg_threshold_weights, cfg.n_positions,
            cfg.entropy_tolerance, cfg.entropy_reduction, cfg.entropy_max_entropy,
        )


class FeedForward(nn.Module):
    """The FFN: d -> 4d -> d with an activation, or one fused d x d matrix; no biases."""

    def __init__(self, config: EntropyGPTConfig):
        super().__init__()
        d = config.n_embd
        kind = config.norm if config.norm != "none" and "ffn" in NORM_TARGETS[config.norm_on] else "none"
        std = config.initializer_range
        self.fused = config.ffn_fused
        if self.fused:
            self.c_fused = _normalize(nn.Linear(d, d, bias=False), kind, std)
            return
        self.c_fc = _normalize(nn.Linear(d, 4 * d, bias=False), kind, std)
        self.c_proj = _normalize(nn.Linear(4 * d, d, bias=False), kind, std)
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU(), "none": nn.Identity()}[config.ffn_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.c_fused(x)
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """A pre-LN transformer block; LayerNorm and FFN scaling are switches."""

    def __init__(self, config: EntropyGPTConfig):
        super().__init__()
        d, eps = config.n_embd, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(d, eps=eps) if config.block_ln else nn.Identity()
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(d, eps=eps) if config.block_ln else nn.Identity()
        self.mlp = FeedForward(config)
        self.ffn_alpha = self.ffn_beta = None
        if config.ffn_scale:
            self.ffn_alpha = nn.Parameter(torch.tensor(float(config.alpha_init)))
            self.ffn_beta = nn.Parameter(torch.tensor(float(config.beta_init)))

    def forward(self, x: torch.Tensor, need_entropy: bool, output_attentions: bool = False):
        # attention sub-block
        attn_out, row_entropy, probs = self.attn(self.ln_1(x), need_entropy, output_attentions)
        x_sa = x + attn_out

        # FFN sub-block: X_out = beta * X_sa + (1 / alpha) * FFN(X_sa) when scaled
        ffn_out = self.mlp(self.ln_2(x_sa))
        if self.ffn_alpha is not None:
            return self.ffn_beta * x_sa + ffn_out / self.ffn_alpha, row_entropy, probs
        return x_sa + ffn_out, row_entropy, probs


class EntropyGPTPreTrainedModel(PreTrainedModel):
    config_class = EntropyGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    # forward returns the mean CE and ignores num_items_in_batch, so Trainer must scale for accumulation
    accepts_loss_kwargs = False
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialize N(0, 0.02) weights, zero biases, unit LayerNorm gains, and the entropy parameters."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # normalized layers were initialized before their parametrization was registered
            if not hasattr(module, "parametrizations"):
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, CausalSelfAttention):
            init.constant_(module.reg_threshold_weights, float(self.config.entropy_threshold_init))
            if module.log_temperature is not None:
                init.constant_(module.log_temperature, math.log(self.config.temperature_init))
        elif isinstance(module, Block) and module.ffn_alpha is not None:
            init.constant_(module.ffn_alpha, float(self.config.alpha_init))
            init.constant_(module.ffn_beta, float(self.config.beta_init))


class EntropyGPTModel(EntropyGPTPreTrainedModel):
    """Token and position embeddings, the blocks, and the optional final LayerNorm."""

    def __init__(self, config: EntropyGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon) if config.final_ln else nn.Identity()
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(self, input_ids: torch.LongTensor, need_entropy: bool = False, output_attentions: bool = False):
        """Return (hidden states (B, T, d), per-layer row entropy or None, per-layer probabilities or None)."""
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ValueError(f"sequence length {T} exceeds the model's context n_positions={self.config.n_positions}")
        pos = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)  # (B, T, d)
        row_entropies, attentions = [], []
        for block in self.h:
            x, row_entropy, probs = block(x, need_entropy, output_attentions)
            row_entropies.append(row_entropy)
            attentions.append(probs)
        return self.ln_f(x), (row_entropies if need_entropy else None), (tuple(attentions) if output_attentions else None)


class EntropyGPTForCausalLM(EntropyGPTPreTrainedModel, GenerationMixin):
    """The LM: EntropyGPTModel with a tied LM head; returns CE loss and the entropy terms."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: EntropyGPTConfig):
        super().__init__(config)
        self.transformer = EntropyGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_entropy: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> EntropyCausalLMOutput:
        """Run the LM. `loss` (when labels are given) is the mean next-token cross-entropy only.

        return_entropy defaults to self.training. attention_mask is accepted for API compatibility;
        attention is always causal, so right padding (as lm-eval uses) is fine but left padding is not.
        output_attentions returns the (B, H, T, T) probabilities of every layer through the explicit path,
        as code written for the released Trainer example expects.
        """
        need_entropy = self.training if return_entropy is None else return_entropy
        hidden, row_entropies, attentions = self.transformer(input_ids, need_entropy, bool(output_attentions))
        logits = self.lm_head(hidden)  # (B, T, V)

        # next-token cross-entropy; labels are the inputs, shifted here
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)

        if not need_entropy:
            return EntropyCausalLMOutput(loss=loss, logits=logits, attentions=attentions)

        # entropy regularizer (unscaled) and the L x H head entropy
        penalties = [block.attn.entropy_penalty(h) for block, h in zip(self.transformer.h, row_entropies)]
        return EntropyCausalLMOutput(
            loss=loss,
            logits=logits,
            entropy_loss=torch.stack(penalties).mean(),
            head_entropy=head_entropy(row_entropies).detach(),
            row_entropy=tuple(row_entropies),
            attentions=attentions,
        )

    def entropy_thresholds(self) -> torch.Tensor:
        """Return the learned thresholds theta as an (L, H) tensor (fractions of E_max)."""
        return torch.stack([b.attn.reg_threshold_weights.detach() for b in self.transformer.h])

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """Return AdamW parameter groups: decay on weight matrices and embeddings only.

        Thresholds, temperatures, alpha, beta, biases, LayerNorm gains and weight-norm magnitudes
        get no weight decay, as in the authors' training code.
        """
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            scalar_like = param.dim() < 2 or name.endswith("original0")
            special = any(key in name for key in ("reg_threshold_weights", "log_temperature", "ffn_alpha", "ffn_beta"))
            (no_decay if scalar_like or special else decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


AutoConfig.register(EntropyGPTConfig.model_type, EntropyGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(EntropyGPTConfig, EntropyGPTForCausalLM, exist_ok=True)

# save_pretrained writes `auto_map` into config.json and copies this file next to the weights, so a process
# that never imports harness (e.g. the stock `lm_eval` command) can load the folder with trust_remote_code=True.
# The copy imports harness.attention and harness.entropy, so loading it still needs the harness package installed.
EntropyGPTConfig.register_for_auto_class()
EntropyGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def model_config_from_run(run_cfg, vocab_size: int | None = None) -> EntropyGPTConfig:
    """Build the EntropyGPTConfig for a harness RunConfig (model, entropy and data sections)."""
    model, entropy, data = run_cfg.model, run_cfg.entropy, run_cfg.data
    n_layer, n_head, n_embd = model.dims()
    return EntropyGPTConfig(
        vocab_size=vocab_size or data.vocab_size,
        n_positions=data.context_length,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        block_ln=model.block_ln,
        final_ln=model.final_ln,
        ffn_act=model.ffn_act,
        ffn_fused=model.ffn_fused,
        ffn_scale=model.ffn_scale,
        alpha_init=model.alpha_init,
        beta_init=model.beta_init,
        norm=model.norm,
        norm_on=model.norm_on,
        temperature_mode=model.temperature.mode,
        temperature_init=model.temperature.init,
        attn_impl=model.attn_impl,
        entropy_threshold_init=entropy.threshold_init,
        entropy_tolerance=entropy.tolerance,
        entropy_reduction=entropy.reduction,
        entropy_max_entropy=entropy.max_entropy,
    )
