"""Entropy regularization for any Hugging Face causal LM through a `transformers.Trainer` subclass.

`EntropyRegularizedTrainer` keeps the constructor of the authors' released example trainer
(Nandan91/entropy-guided-attention-llm): `loss_coeff`, `tolerance_margin_factor` and `context_size` as
keyword arguments, the entropy term added to the CE loss in training only, so eval_loss stays pure CE.
It works on two kinds of model:

- the harness family (`EntropyGPTForCausalLM`, any model whose forward takes `return_entropy`): the model
  computes L_ent from its own thresholds and config, and the trainer adds loss_coeff * L_ent.
- a stock causal LM (GPT-2, GPT-NeoX/Pythia, Llama-style): the trainer registers a learnable
  `reg_threshold_weights` (H,) parameter on each attention module (`add_entropy_thresholds`), runs the
  forwards that need attention probabilities through the eager attention path, and computes L_ent with
  harness.entropy.

Entropy metrics go into the Trainer's own log dict, so every `report_to` backend (MLflow included)
records them at the step of the training loss. Transformers 5.25 reads `config._attn_implementation`
at every forward, so the trainer switches to eager only for the forwards that need probabilities: every
training step when loss_coeff > 0, else the logging steps. Each `set_attn_implementation` call took
about 0.5 ms on a tiny GPT-2 on CPU. The eager forward keeps one (B, H, T, T) probability tensor per
layer for the backward pass, and evaluation stays on the model's own implementation.
"""

from __future__ import annotations

import inspect
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from transformers import Trainer, TrainerCallback

from harness.entropy import (
    MAX_ENTROPY_MODES,
    EntropyRegularization,
    attention_entropy,
    check_loss_args,
    entropy_regularization_loss,
    entropy_summary,
    max_entropy,
)

log = logging.getLogger(__name__)

THRESHOLD_NAME = "reg_threshold_weights"
# parameters that get no weight decay: the thresholds and the harness family's scalar parameters
NO_DECAY_KEYS = (THRESHOLD_NAME, "log_temperature", "ffn_alpha", "ffn_beta")
# config fields that hold the dropout applied to attention probabilities, by model family
ATTENTION_DROPOUT_KEYS = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")


# -----------------------------------------------------------------------------
# Thresholds on the attention modules of a stock model

def has_entropy_forward(model: nn.Module) -> bool:
    """Return True for the harness family: models whose forward takes `return_entropy`."""
    return "return_entropy" in inspect.signature(model.forward).parameters


def find_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Return the self-attention modules whose outputs form `outputs.attentions`, in layer order.

    Uses the model's `_can_record_outputs["attentions"]` (transformers 5 models declare it) and falls back
    to modules whose class name ends with "Attention" outside cross-attention.
    """
    spec = (getattr(model, "_can_record_outputs", None) or {}).get("attentions")
    specs = []
    if isinstance(spec, list):
        specs = spec
    elif spec is not None:
        specs = [spec]
    if specs:
        return [m for name, m in model.named_modules() if any(_matches(name, m, s) for s in specs)]
    return [
        m for name, m in model.named_modules()
        if type(m).__name__.endswith("Attention") and "cross" not in name.lower()
    ]


def _matches(name: str, module: nn.Module, spec) -> bool:
    """Apply transformers' output-recorder rule: a class, a module-name suffix, or an OutputRecorder."""
    if isinstance(spec, type):
        return isinstance(module, spec)
    if isinstance(spec, str):
        return name.endswith(spec)
    target, class_name, layer_name = spec.target_class, spec.class_name, spec.layer_name
    hit = (target is not None and isinstance(module, target)) or (class_name is not None and name.endswith(class_name))
    if hit and layer_name:
        hit = f".{layer_name.strip('.')}." in f".{name}."
    return hit


def threshold_modules(model: nn.Module) -> list[nn.Module]:
    """Return the modules that own a `reg_threshold_weights` parameter, in layer order."""
    return [m for m in model.modules() if isinstance(getattr(m, THRESHOLD_NAME, None), nn.Parameter)]


def add_entropy_thresholds(model: nn.Module, init: float = 0.5) -> list[nn.Parameter]:
    """Register a learnable (H,) `reg_threshold_weights` on each attention module of a stock model.

    theta is a fraction of E_max, initialized to `init`, kept in float32. Modules that already own one
    keep it, so calling this twice changes nothing. Call it after loading weights: `from_pretrained` of a
    stock class drops the threshold keys of a checkpoint; `load_entropy_thresholds` restores them.
    """
    cls = type(model).__name__
    n_head = getattr(model.config, "num_attention_heads", None)
    modules = find_attention_modules(model)
    if not modules or not n_head:
        raise ValueError(
            f"{cls} has no attention modules to hold entropy thresholds (found {len(modules)} modules, "
            f"num_attention_heads={n_head}). The entropy regularizer needs a softmax-attention model whose "
            "forward returns attention probabilities with output_attentions=True"
        )
    params = []
    for module in modules:
        if not isinstance(getattr(module, THRESHOLD_NAME, None), nn.Parameter):
            device = next(module.parameters()).device
            module.register_parameter(THRESHOLD_NAME, nn.Parameter(torch.full((n_head,), float(init), device=device)))
        params.append(getattr(module, THRESHOLD_NAME))
    return params


def entropy_thresholds(model: nn.Module) -> torch.Tensor:
    """Return the learned thresholds theta as an (L, H) tensor (fractions of E_max), detached."""
    modules = threshold_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no {THRESHOLD_NAME}: call add_entropy_thresholds(model) first")
    return torch.stack([getattr(m, THRESHOLD_NAME).detach() for m in modules])


def load_entropy_thresholds(model: nn.Module, path: str | Path, init: float = 0.5) -> torch.Tensor:
    """Add thresholds to a model loaded with `from_pretrained` and copy their values from the checkpoint.

    path: a save_pretrained folder or a Trainer checkpoint (model.safetensors or a sharded index).
    Returns the loaded (L, H) thresholds; raises ValueError when the checkpoint has none.
    """
    add_entropy_thresholds(model, init)
    stored = _read_threshold_tensors(Path(path))
    names = [name for name, _ in model.named_parameters() if name.endswith(THRESHOLD_NAME)]
    missing = [name for name in names if name not in stored]
    if missing:
        raise ValueError(
            f"checkpoint {path} has no entropy thresholds for {missing[:3]} ({len(missing)} of {len(names)} missing) "
            f"and contains {len(stored)} threshold tensors {sorted(stored)[:3]}. Save the model after "
            "add_entropy_thresholds or from EntropyRegularizedTrainer"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].copy_(stored[name])
    return entropy_thresholds(model)


def _read_threshold_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Read every `*.reg_threshold_weights` tensor from model.safetensors or its sharded index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for key, f in weight_map.items() if key.endswith(THRESHOLD_NAME)})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys() if key.endswith(THRESHOLD_NAME)})
    return tensors


# -----------------------------------------------------------------------------
# Entropy from the probabilities of the eager attention path

@contextmanager
def eager_attention(model: nn.Module, switch: bool = True):
    """Run the enclosed forwards with the eager attention path, then restore the previous implementation."""
    previous = getattr(model.config, "_attn_implementation", None)
    if not switch or previous in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# -----------------------------------------------------------------------------
# The trainer

class EntropyRegularizedTrainer(Trainer):
    """A Trainer that adds loss_coeff * L_ent to the training loss and logs attention entropy.

    loss_coeff: lambda (0 turns the term off and keeps the monitoring). tolerance_margin_factor: gamma.
    context_size: T of E_max = log T (None: the key length of each batch, as the released code does).
    reduction: row_sum (one deviation per query row, as the authors' released code) or head_mean (one per head,
    as the algorithm in Jha and Reagen, arXiv 2501.03489). max_entropy: log_t or causal.
    threshold_init: initial theta of thresholds added to a stock model. entropy_log_steps: steps between
    entropy statistics (None: args.logging_steps); a step that logs entropy also logs the loss.
    """

    def __init__(
        self,
        *args,
        loss_coeff: float = 1e-5,
        tolerance_margin_factor: float = 0.2,
        context_size: int | None = None,
        reduction: str = "row_sum",
        max_entropy: str = "log_t",
        threshold_init: float = 0.5,
        entropy_log_steps: int | None = None,
        **kwargs,
    ):
        _check_trainer_args(loss_coeff, tolerance_margin_factor, reduction, max_entropy, threshold_init, entropy_log_steps)
        # the released trainer's attribute, with the same three arguments
        self.entropy_regularizer = EntropyRegularization(loss_coeff, tolerance_margin_factor, context_size)
        self.loss_coeff, self.tolerance, self.context_size = loss_coeff, tolerance_margin_factor, context_size
        self.reduction, self.max_entropy_mode, self.threshold_init = reduction, max_entropy, threshold_init
        self.entropy_log_steps = entropy_log_steps
        self._entropy_loss_sum, self._entropy_loss_count, self._pending_metrics = None, 0, None

        # thresholds go on the model before Trainer.__init__ moves it and before any optimizer exists
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            self._prepare_model(model)
        super().__init__(*args, **kwargs)
        self._check_optimizer()
        self.add_callback(_EntropyLogCallback(self))

        # NOTE: EntropyGPTForCausalLM takes **kwargs but ignores num_items_in_batch, so its CE is a
        # per-micro-batch mean. Telling the Trainer so keeps gradient accumulation scaled right.
        if self._native and not hasattr(self.model, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = False

    # --- model preparation ---------------------------------------------------

    def call_model_init(self, trial=None):
        """Build the model with `model_init`, then add its thresholds (runs in __init__ and in train())."""
        model = super().call_model_init(trial)
        self._prepare_model(model)
        return model

    def _prepare_model(self, model: nn.Module) -> None:
        """Check a harness-family model's entropy config, or add thresholds to a stock model."""
        self._native = has_entropy_forward(model)
        if self._native:
            _check_native_config(model, self.tolerance, self.reduction, self.max_entropy_mode, self.context_size)
            return
        add_entropy_thresholds(model, self.threshold_init)
        _warn_attention_dropout(model)
        impl = getattr(model.config, "_attn_implementation", None)
        can_switch = getattr(type(model), "_can_set_attn_implementation", lambda: False)()
        self._switch_attention = impl not in (None, "eager") and can_switch

    def _check_optimizer(self) -> None:
        """Raise ValueError when an optimizer passed in `optimizers` lacks the thresholds."""
        if self.optimizer is None:
            return
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        if any(id(getattr(m, THRESHOLD_NAME)) not in in_optimizer for m in threshold_modules(self.model)):
            raise ValueError(
                "the optimizer passed in `optimizers` does not contain the entropy thresholds: call "
                "add_entropy_thresholds(model) before creating it, or let the Trainer create it"
            )

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Return the Trainer's weight-decay names minus thresholds and scalars (the model's own groups if it has them)."""
        if hasattr(model, "optim_groups"):
            decay = {id(p) for p in model.optim_groups(self.args.weight_decay)[0]["params"]}
            return [name for name, p in model.named_parameters() if id(p) in decay]
        names = super().get_decay_parameter_names(model)
        return [name for name in names if not any(key in name for key in NO_DECAY_KEYS)]

    # --- loss -------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Return CE + loss_coeff * L_ent in training, and the plain CE in evaluation."""
        step = self.state.global_step + 1
        log_step = self._is_entropy_log_step(step)
        if not model.training or (self.loss_coeff == 0 and not log_step):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        # forward with the entropy terms: L_ent (unscaled), head entropy (L, H), query rows per head
        if self._native:
            inputs = {**inputs, "return_entropy": True}
            ce, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            entropy_loss, head_ent = outputs.entropy_loss, outputs.head_entropy
            n_rows = outputs.row_entropy[0].shape[-1]
        else:
            unwrapped = self.accelerator.unwrap_model(model)
            with eager_attention(unwrapped, self._switch_attention):
                ce, outputs = super().compute_loss(model, {**inputs, "output_attentions": True}, True, num_items_in_batch)
            entropy_loss, head_ent, n_rows = self._stock_entropy(unwrapped, outputs, inputs.get("attention_mask"))

        # the entropy term follows the CE's gradient-accumulation scaling
        loss = ce
        if self.loss_coeff > 0:
            loss = ce + self.loss_coeff * entropy_loss / self._entropy_ga_divisor(num_items_in_batch)

        # statistics for the next training log
        detached = entropy_loss.detach()
        self._entropy_loss_sum = detached if self._entropy_loss_sum is None else self._entropy_loss_sum + detached
        self._entropy_loss_count += 1
        if log_step:
            self._pending_metrics = self._entropy_metrics(head_ent, n_rows)
        return (loss, outputs) if return_outputs else loss

    def _stock_entropy(self, model, outputs, attention_mask):
        """Return (L_ent, head entropy (L, H), query rows) from the attention probabilities of a stock model."""
        modules = threshold_modules(model)
        attentions = getattr(outputs, "attentions", None)
        if not attentions:
            raise ValueError(
                f"{type(model).__name__} returned no attention probabilities (outputs.attentions is "
                f"{'empty' if attentions is not None else 'None'}) with output_attentions=True and "
                f"attn_implementation={getattr(model.config, '_attn_implementation', None)!r}. Load the model with "
                "attn_implementation='eager', or use a model that supports output_attentions"
            )
        if len(attentions) != len(modules):
            raise ValueError(
                f"{type(model).__name__} returned {len(attentions)} attention tensors for {len(modules)} modules "
                f"with {THRESHOLD_NAME}, but the entropy regularizer needs one probability tensor per module"
            )

        # exact row entropy with a finite gradient, one (B, H, T) tensor per layer
        rows = [attention_entropy(a) for a in attentions]
        thresholds = torch.stack([getattr(m, THRESHOLD_NAME) for m in modules])  # (L, H)
        context = self.context_size or attentions[0].shape[-1]
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            head_ent, rows = self._exclude_padding(rows, thresholds, attention_mask.bool(), context)
        else:
            head_ent = torch.stack([r.detach().mean(dim=(0, 2)) for r in rows])  # (L, H)
        with torch.set_grad_enabled(self.loss_coeff > 0):
            entropy_loss = entropy_regularization_loss(
                rows, thresholds, context, self.tolerance, self.reduction, self.max_entropy_mode
            )
        return entropy_loss, head_ent, rows[0].shape[-1]

    def _exclude_padding(self, rows, thresholds, valid, context):
        """Take padded query rows out of the loss and the statistics: (head entropy (L, H), filled rows).

        row_sum: a padded row gets the target theta * E_max, so its deviation and penalty are zero.
        head_mean: a padded row gets the mean of the valid rows of its head, which leaves the head mean unchanged.
        """
        padded = ~valid  # (B, T)
        weights = valid[:, None, :].float()  # (B, 1, T)
        head_ent, filled = [], []
        e_max = max_entropy(context, self.max_entropy_mode, rows[0].shape[-1], rows[0].device)  # () or (T,)
        for row, theta in zip(rows, thresholds):
            mean = (row * weights).sum(dim=(0, 2)) / weights.sum(dim=(0, 2)).clamp(min=1)  # (H,)
            head_ent.append(mean.detach())
            fill = theta.float()[:, None] * e_max if self.reduction == "row_sum" else mean[:, None]  # (H, 1) or (H, T)
            filled.append(torch.where(padded[:, None, :], fill[None].expand_as(row), row))  # (B, H, T)
        return torch.stack(head_ent), filled

    def _entropy_ga_divisor(self, num_items_in_batch) -> int:
        """Return k when the Trainer will not divide this loss by the k accumulation steps, else 1."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        return self.current_gradient_accumulation_steps if scaled else 1

    # --- logging ----------------------------------------------------------------

    def _is_entropy_log_step(self, step: int) -> bool:
        every = self.entropy_log_steps
        if every is None and self.args.logging_strategy == "steps":
            # a float logging_steps below 1 is a fraction of max_steps, resolved when training starts
            steps = self.args.logging_steps
            every = int(steps) if steps >= 1 else self.state.logging_steps
        first = step == 1 and self.args.logging_first_step
        return first or bool(every and step % every == 0)

    def _entropy_metrics(self, head_ent: torch.Tensor, n_rows: int) -> dict[str, float]:
        """Return entropy_summary, the threshold mean and per-head `attn.{layer}.head.{head}.entropy`."""
        head_ent = head_ent.detach().float().cpu()  # (L, H)
        metrics = entropy_summary(head_ent, n_rows)
        metrics["entropy/threshold_mean"] = entropy_thresholds(self.model).float().mean().item()
        for layer, per_head in enumerate(head_ent.tolist()):
            for head, value in enumerate(per_head):
                metrics[f"attn.{layer}.head.{head}.entropy"] = value
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the entropy metrics gathered since the last training log to a training log dict."""
        if "loss" in logs:
            if self._entropy_loss_count:
                logs["entropy/loss"] = (self._entropy_loss_sum / self._entropy_loss_count).item()
                self._entropy_loss_sum, self._entropy_loss_count = None, 0
            if self._pending_metrics is not None:
                logs.update(self._pending_metrics)
                self._pending_metrics = None
        super().log(logs, start_time)


class _EntropyLogCallback(TrainerCallback):
    """Turn a step with fresh entropy statistics into a logging step, so they share the loss's step."""

    def __init__(self, trainer: EntropyRegularizedTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer._pending_metrics is not None:
            control.should_log = True
        return control


# -----------------------------------------------------------------------------
# Argument and model checks

def _check_trainer_args(loss_coeff, tolerance, reduction, mode, threshold_init, log_steps) -> None:
    check_loss_args(loss_coeff, tolerance, reduction)
    if mode not in MAX_ENTROPY_MODES:
        raise ValueError(f"invalid max_entropy={mode!r}: accepted values are {list(MAX_ENTROPY_MODES)}")
    if not threshold_init >= 0:
        raise ValueError(f"invalid threshold_init={threshold_init}: must be >= 0 (a fraction of E_max)")
    if log_steps is not None and (not isinstance(log_steps, int) or log_steps < 1):
        raise ValueError(f"invalid entropy_log_steps={log_steps!r}: must be an int >= 1, or None for args.logging_steps")


def _check_native_config(model, tolerance, reduction, mode, context_size) -> None:
    """Raise ValueError when the trainer's entropy arguments differ from the config the model computes L_ent with."""
    cfg = model.config
    pairs = [
        ("tolerance_margin_factor", tolerance, "entropy_tolerance", getattr(cfg, "entropy_tolerance", tolerance)),
        ("reduction", reduction, "entropy_reduction", getattr(cfg, "entropy_reduction", reduction)),
        ("max_entropy", mode, "entropy_max_entropy", getattr(cfg, "entropy_max_entropy", mode)),
    ]
    n_positions = getattr(cfg, "n_positions", None)
    if context_size is not None:
        pairs.append(("context_size", context_size, "n_positions", n_positions))
    differ = [f"{arg}={ours!r} but config.{field}={theirs!r}" for arg, ours, field, theirs in pairs if ours != theirs]
    if differ:
        raise ValueError(
            f"{type(model).__name__} computes its entropy loss from its config, which differs from the trainer's "
            f"arguments: {'; '.join(differ)}. Pass the config's values to the trainer or set them in the model config"
        )


def _warn_attention_dropout(model) -> None:
    """Warn when attention dropout is on: eager attention returns the probabilities after dropout."""
    for key in ATTENTION_DROPOUT_KEYS:
        p = getattr(model.config, key, 0.0)
        if isinstance(p, float) and p > 0:
            log.warning(
                "%s has %s=%s: in training its eager attention returns the attention probabilities after dropout, "
                "so the entropy is measured on dropped-out rows; set %s=0.0 for the exact entropy",
                type(model).__name__, key, p, key,
            )
            return
