"""The training loop: one call trains one model and records it in one MLflow run.

Loss = CE + lambda * L_ent (the entropy regularizer from `entropy.start_step` on). Every eval interval:
validation perplexity over full T-token chunks and head entropy statistics on a fixed validation batch.
The loop does not import Optuna: a study passes `on_eval`, which may raise to stop (prune) the run.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from harness import checkpoint, distributed
from harness.config import RunConfig, dump_yaml, load_config
from harness.entropy import entropy_summary
from harness.modeling import EntropyGPTForCausalLM, model_config_from_run

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite; carries the step."""

    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step = step


@dataclass
class TrainResult:
    step: int
    val_ppl: float
    test_ppl: float
    metrics: dict[str, float] = field(default_factory=dict)
    model: EntropyGPTForCausalLM | None = None
    tokenizer: object = None
    run_id: str | None = None


# -----------------------------------------------------------------------------
# Setup helpers

def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("invalid train.device=cuda: no CUDA device is available; use train.device=cpu or auto")
    return torch.device(name)


def autocast_context(device: torch.device, dtype: str):
    """Return an autocast context for bf16/fp16, or a no-op for fp32."""
    if dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def build_optimizer(model: EntropyGPTForCausalLM, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    opt = cfg.optim
    return torch.optim.AdamW(
        model.optim_groups(opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
        fused=device.type == "cuda",
    )


def build_scheduler(optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_fraction of max_steps, then linear decay to min_lr_fraction."""
    total = cfg.train.max_steps
    warmup = max(1, int(cfg.optim.warmup_fraction * total))
    floor = cfg.optim.min_lr_fraction

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1.0 - floor) * max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_model(cfg: RunConfig, vocab_size: int, device: torch.device) -> EntropyGPTForCausalLM:
    model = EntropyGPTForCausalLM(model_config_from_run(cfg, vocab_size)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    log.info("model %s: %.2fM parameters, n_layer=%d n_head=%d n_embd=%d T=%d vocab=%d", cfg.name, n_params / 1e6,
             c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size)
    return model


# -----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate_perplexity(model, chunks: np.ndarray, batch_size: int, max_batches: int, device, dtype: str) -> tuple[float, float]:
    """Return (mean CE in nats, perplexity) over full T-token chunks, the metric of Jha and Reagen (2025).

    Uses the first max_batches * batch_size chunks (all when max_batches is 0), so every evaluation
    of a run uses the same tokens. Under DDP each rank evaluates every world_size-th batch of them and
    the sums are added over ranks, so every rank returns the perplexity of all those chunks.
    """
    was_training = model.training
    model.eval()
    n = len(chunks) if max_batches <= 0 else min(len(chunks), max_batches * batch_size)
    if n == 0:
        raise ValueError("the evaluation split has no full chunk: use a larger corpus or a smaller data.context_length")
    total_nll, total_tokens = 0.0, 0
    starts = range(distributed.rank() * batch_size, n, distributed.world_size() * batch_size)
    for start in starts:
        x = torch.from_numpy(np.asarray(chunks[start:start + batch_size], dtype=np.int64)).to(device)
        with autocast_context(device, dtype):
            out = model(x, labels=x, return_entropy=False)
        count = x.shape[0] * (x.shape[1] - 1)
        total_nll += out.loss.float().item() * count
        total_tokens += count
    model.train(was_training)
    total_nll, total_tokens = distributed.all_reduce_sum([total_nll, total_tokens])
    ce = total_nll / total_tokens
    return ce, math.exp(min(ce, 700.0))


@torch.no_grad()
def entropy_statistics(model, batch: torch.Tensor, device, dtype: str) -> tuple[np.ndarray, dict[str, float]]:
    """Return the (L, H) head entropy on a fixed batch and its summary statistics."""
    was_training = model.training
    model.eval()
    with autocast_context(device, dtype):
        out = model(batch.to(device), return_entropy=True)
    model.train(was_training)
    head_ent = out.head_entropy.float().cpu()
    stats = entropy_summary(head_ent, batch.shape[1])
    stats["entropy/loss_val"] = out.entropy_loss.float().item()
    thresholds = model.entropy_thresholds().float().cpu()
    for layer, row in enumerate(thresholds):
        stats[f"thresholds/layer_{layer}_mean"] = row.mean().item()
    return head_ent.numpy(), stats


# -----------------------------------------------------------------------------
# The loop

@dataclass
class LoopState:
    step: int = 0
    val_ppl: float = float("nan")
    last_metrics: dict = field(default_factory=dict)


def _train_step(model, optimizer, scheduler, batch, cfg: RunConfig, step: int, device, scaler) -> dict[str, float]:
    """Run one optimizer step and return its scalar metrics (averaged over ranks under DDP)."""
    lam = cfg.entropy.loss_coeff if step >= cfg.entropy.start_step else 0.0
    need_entropy = lam > 0

    # forward: CE plus the scaled regularizer
    with autocast_context(device, cfg.train.dtype):
        out = model(batch, labels=batch, return_entropy=need_entropy)
    ce = out.loss.float()
    entropy_loss = out.entropy_loss.float() if need_entropy else torch.zeros((), device=device)
    entropy_loss = entropy_loss * _entropy_rank_scale(cfg)
    loss = ce + lam * entropy_loss

    # every rank checks the loss averaged over ranks, so all ranks stop together on a non-finite loss
    reduced = distributed.all_reduce_mean({"loss": loss.item(), "ce": ce.item(), "entropy_loss": entropy_loss.item()})
    if not math.isfinite(reduced["loss"]):
        raise NonFiniteLossError(step, reduced["loss"])

    # backward, clip, step
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return {
        "train/loss": reduced["loss"], "train/ce": reduced["ce"], "train/entropy_loss": reduced["entropy_loss"],
        "train/lr": lr, "train/grad_norm": float(grad_norm),
    }


def _entropy_rank_scale(cfg: RunConfig) -> float:
    """Return the factor that makes the DDP average of the row_sum regularizer its sum over the global batch.

    row_sum adds the penalties of all (batch, query) rows, and DDP averages gradients over ranks, so
    each rank multiplies its term by world_size. head_mean is a nonlinear function of the batch mean,
    so under DDP it is the mean of per-rank values, close to but not equal to one process's value.
    """
    if cfg.entropy.reduction == "row_sum":
        return float(distributed.world_size())
    return 1.0


def _log_line(step: int, metrics: dict, val_ppl: float) -> str:
    return (
        f"step={step} loss={metrics['train/loss']:.4f} ce={metrics['train/ce']:.4f} "
        f"ent={metrics['train/entropy_loss']:.4g} lr={metrics['train/lr']:.3g} "
        f"val_ppl={val_ppl:.3f} tok/s={metrics['train/tok_per_s']:.0f}"
    )


def _run_eval(model, data, fixed_batch, cfg, state: LoopState, tracker, device) -> dict[str, float]:
    tc = cfg.train
    val_ce, val_ppl = evaluate_perplexity(model, data.val, tc.batch_size, tc.eval_batches, device, tc.dtype)
    head_ent, stats = entropy_statistics(model, fixed_batch, device, tc.dtype)
    metrics = {"val/ce": val_ce, "val/ppl": val_ppl, **stats}
    state.val_ppl = val_ppl
    if tracker is not None:
        tracker.log_metrics(metrics, state.step)
        interval = cfg.tracking.head_entropy_interval or tc.eval_interval
        if state.step % interval == 0 or state.step == tc.max_steps:
            tracker.log_head_entropy(head_ent, state.step)
        tracker.flush()
    log.info("eval step=%d val_ce=%.4f val_ppl=%.3f entropy_mean=%.3f overload=%.2f collapse=%.2f",
             state.step, val_ce, val_ppl, stats["entropy/mean"], stats["entropy/overload_fraction"],
             stats["entropy/collapse_fraction"])
    return metrics


def train(
    cfg: RunConfig,
    data=None,
    tracker=None,
    on_eval: Callable[[int, dict], None] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train one model on `data` (prepared from cfg.data when None) and return its final numbers.

    tracker: a RunTracker or None. on_eval(step, metrics) runs after every evaluation and may raise to
    stop the run, which is how a study prunes. The exception propagates after the metrics are flushed.

    Under torchrun (WORLD_SIZE > 1) every rank calls train(): train.batch_size is the batch of one
    rank, so a step sees a global batch of batch_size * world_size chunks, the same chunks that one
    process with that batch size sees. Pass the tracker and on_eval on rank 0 only; ranks > 0 raise
    StoppedByRank0 when rank 0's on_eval raises.
    """
    from harness.data import batch_iterator

    tc = cfg.train
    device = distributed.init(resolve_device(tc.device))
    seed_everything(tc.seed)
    data = data if data is not None else _prepare_data_rank0_first(cfg)
    if len(data.train) == 0:
        raise ValueError(f"corpus {cfg.data.corpus!r} gave no training chunk of {cfg.data.context_length} tokens")

    # model, optimizer, schedule, and the checkpoint to continue from
    model = build_model(cfg, len(data.tokenizer), device)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.dtype == "float16")
    state = LoopState()
    run_dir = checkpoint.run_dir(cfg)
    if resume:
        state.step = checkpoint.load_latest(run_dir, model, optimizer, scheduler)
    fixed_batch = torch.from_numpy(np.asarray(data.val[: tc.batch_size], dtype=np.int64))

    # under DDP: steps without the regularizer leave the thresholds without a gradient
    skips_entropy = cfg.entropy.loss_coeff == 0 or cfg.entropy.start_step > 0
    ddp_model = distributed.wrap_model(model, device, find_unused_parameters=skips_entropy)

    # every rank draws the same global batch and trains on its own slice of it
    world, rank = distributed.world_size(), distributed.rank()
    batches = batch_iterator(data.train, tc.batch_size * world, tc.seed, start_step=state.step)
    rows = slice(rank * tc.batch_size, (rank + 1) * tc.batch_size)
    tokens_per_step = tc.batch_size * world * cfg.data.context_length
    model.train()
    if state.step == 0:
        state.last_metrics = _run_eval(model, data, fixed_batch, cfg, state, tracker, device)
        _notify_eval(on_eval, state.step, state.last_metrics)

    show_bar = sys.stderr.isatty() and distributed.is_rank0()
    with logging_redirect_tqdm(), tqdm(total=tc.max_steps, initial=state.step, desc=cfg.name, unit="step",
                                       leave=False, mininterval=2.0, disable=not show_bar) as bar:
        while state.step < tc.max_steps:
            t0 = time.perf_counter()
            batch = next(batches)[rows].to(device)  # (B, T) of this rank
            metrics = _train_step(ddp_model, optimizer, scheduler, batch, cfg, state.step, device, scaler)
            if device.type == "cuda":
                torch.cuda.synchronize()
            metrics["train/tok_per_s"] = tokens_per_step / (time.perf_counter() - t0)
            state.step += 1
            bar.update(1)

            # log, evaluate, checkpoint
            if tracker is not None:
                tracker.log_metrics(metrics, state.step)
            if state.step % tc.eval_interval == 0 or state.step == tc.max_steps:
                state.last_metrics = _run_eval(model, data, fixed_batch, cfg, state, tracker, device)
            if state.step % tc.log_interval == 0 or state.step == tc.max_steps:
                log.info(_log_line(state.step, metrics, state.val_ppl))
            if tc.checkpoint_interval and state.step % tc.checkpoint_interval == 0 and distributed.is_rank0():
                checkpoint.save(run_dir, model, optimizer, scheduler, state.step, tracker)
            if state.step % tc.eval_interval == 0 or state.step == tc.max_steps:
                _notify_eval(on_eval, state.step, state.last_metrics)

    # final checkpoint (rank 0) and test perplexity
    if distributed.is_rank0():
        checkpoint.save(run_dir, model, optimizer, scheduler, state.step, tracker)
    test_ce, test_ppl = evaluate_perplexity(model, data.test, tc.batch_size, tc.test_batches, device, tc.dtype)
    final = {"test/ce": test_ce, "test/ppl": test_ppl, "val/ppl": state.val_ppl}
    if tracker is not None:
        tracker.log_metrics({"test/ce": test_ce, "test/ppl": test_ppl}, state.step)
        head_ent, _ = entropy_statistics(model, fixed_batch, device, tc.dtype)
        thresholds = model.entropy_thresholds().float().cpu().numpy()
        tracker.log_final_artifacts(head_ent, thresholds, model=model, tokenizer=data.tokenizer)
    log.info("finished %s: step=%d val_ppl=%.3f test_ppl=%.3f", cfg.name, state.step, state.val_ppl, test_ppl)
    return TrainResult(state.step, state.val_ppl, test_ppl, {**state.last_metrics, **final}, model, data.tokenizer,
                       tracker.run_id if tracker is not None else None)


def _prepare_data_rank0_first(cfg: RunConfig):
    """Prepare the data. Under DDP rank 0 builds the caches first, and the other ranks then read them."""
    from harness.data import prepare_data

    if not distributed.is_distributed():
        return prepare_data(cfg.data)
    data, error = None, None
    if distributed.is_rank0():
        try:
            data = prepare_data(cfg.data)
        except Exception as err:
            error = err
    if distributed.any_rank(error is not None):
        if error is not None:
            raise error
        raise distributed.StoppedByRank0("rank 0 failed to prepare the data; its log has the error")
    return data if data is not None else prepare_data(cfg.data)


def _notify_eval(on_eval, step: int, metrics: dict) -> None:
    """Call on_eval. Under DDP only rank 0 calls it, and every rank stops when it raises."""
    if not distributed.is_distributed():
        if on_eval is not None:
            on_eval(step, metrics)
        return
    error = None
    if distributed.is_rank0() and on_eval is not None:
        try:
            on_eval(step, metrics)
        except BaseException as err:
            error = err
    if distributed.any_rank(error is not None):
        if error is not None:
            raise error
        raise distributed.StoppedByRank0(f"rank 0 stopped the run at step {step}")


# -----------------------------------------------------------------------------
# Command line

def main_train(preset: str, overrides: list[str], resume: bool = False, print_config: bool = False) -> int:
    """Entry point of `harness train`: returns the process exit code.

    Under torchrun it joins the process group first, so only rank 0 creates the MLflow run.
    """
    cfg = load_config(preset, overrides)
    if print_config:
        print(dump_yaml(cfg), end="")
        return 0
    distributed.init(resolve_device(cfg.train.device))
    if not distributed.is_rank0():
        logging.getLogger("harness").setLevel(logging.WARNING)
    try:
        return _train_tracked(cfg, resume)
    finally:
        distributed.cleanup()


def _train_tracked(cfg: RunConfig, resume: bool) -> int:
    """Train with a RunTracker on rank 0 (none on other ranks) and close its run with the outcome."""
    from harness.tracking import RunTracker

    tracker = None
    if distributed.is_rank0():
        run_id = checkpoint.saved_run_id(checkpoint.run_dir(cfg)) if resume else None
        tracker = RunTracker(cfg, run_name=cfg.name, run_id=run_id)
        tracker.start()
    try:
        result = train(cfg, tracker=tracker, resume=resume)
    except NonFiniteLossError as err:
        if tracker is not None:
            tracker.end("FAILED", reason=f"non_finite_loss at step {err.step}")
        log.error("training stopped: %s", err)
        return 1
    except KeyboardInterrupt:
        if tracker is not None:
            tracker.end("KILLED", reason="interrupted")
        raise
    except Exception as err:
        if tracker is not None:
            tracker.end("FAILED", reason=repr(err))
        raise
    if tracker is not None:
        tracker.end("FINISHED")
        log.info("MLflow run %s: val_ppl=%.3f test_ppl=%.3f", result.run_id, result.val_ppl, result.test_ppl)
    return 0
