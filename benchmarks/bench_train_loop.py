"""Training throughput: our loop against transformers.Trainer with the released repository's approach.

Both sides train the same model (a preset, default sm_t_scfuffn at cpu-small, T=128) on the same packed
stdlib chunks with lambda = 1e-5, side by side in one process:
- ours: harness.train's step (fused attention, entropy from fused kernels, AdamW, clipping, schedule);
- released: a Trainer subclass that calls the model with output_attentions=True (probabilities of every
  layer through the explicit path) and computes the loss with a per-head Python loop, as the authors'
  EntropyRegularization.compute_loss does (entropy with log(p + 1e-9), a nansum, a loop over heads).
Tokens per second are measured over the timed steps after warmup. Results go to docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_train_loop.py            # defaults reproduce the table
    .venv/bin/python benchmarks/bench_train_loop.py --steps 20 --preset sm_ln_g
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from harness.config import load_config  # noqa: E402
from harness.data import batch_iterator, prepare_data  # noqa: E402
from harness.train import _train_step, build_model, build_optimizer, build_scheduler, seed_everything  # noqa: E402
from released import released_entropy_loss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Training loop against Trainer with the released approach"


def time_ours(cfg, data, steps: int, warmup: int) -> float:
    """Return tokens per second of harness.train's step over `steps` timed steps."""
    seed_everything(cfg.train.seed)
    device = torch.device("cpu")
    model = build_model(cfg, len(data.tokenizer), device).train()
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = batch_iterator(data.train, cfg.train.batch_size, cfg.train.seed)
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        _train_step(model, optimizer, scheduler, next(batches), cfg, step, device, scaler)
    return steps * cfg.train.batch_size * cfg.data.context_length / (time.perf_counter() - start)


class ChunkDataset(torch.utils.data.Dataset):
    def __init__(self, chunks: np.ndarray):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict:
        ids = torch.from_numpy(np.asarray(self.chunks[index], dtype=np.int64))
        return {"input_ids": ids, "labels": ids}


def time_released(cfg, data, steps: int, warmup: int) -> float:
    """Return tokens per second of a Trainer with the released approach over `steps` timed steps."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    seed_everything(cfg.train.seed)
    model = build_model(cfg, len(data.tokenizer), torch.device("cpu")).train()
    thresholds = [block.attn.reg_threshold_weights for block in model.transformer.h]
    n_head = model.config.n_head

    class ReleasedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs, output_attentions=True, return_entropy=False)
            reg = released_entropy_loss(outputs.attentions, thresholds, n_head, cfg.data.context_length,
                                        cfg.entropy.loss_coeff, cfg.entropy.tolerance)
            loss = outputs.loss + reg
            return (loss, outputs) if return_outputs else loss

    class StepClock(TrainerCallback):
        start = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                StepClock.start = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(ROOT / ".cache" / "bench_trainer"), max_steps=warmup + steps,
        per_device_train_batch_size=cfg.train.batch_size, learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay, adam_beta2=cfg.optim.beta2, max_grad_norm=cfg.optim.grad_clip,
        warmup_steps=int(cfg.optim.warmup_fraction * cfg.train.max_steps), lr_scheduler_type="linear",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=cfg.train.seed,
    )
    trainer = ReleasedTrainer(model=model, args=args, train_dataset=ChunkDataset(data.train), callbacks=[StepClock()])
    trainer.train()
    return steps * cfg.train.batch_size * cfg.data.context_length / (time.perf_counter() - StepClock.start)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_section(markdown: str) -> None:
    """Replace (or append) this benchmark's section in docs/benchmarks.md."""
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"{re.escape(SECTION)}\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(markdown.rstrip("\n"), text) if SECTION in text else text.rstrip("\n") + "\n\n" + markdown
    path.write_text(text.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="sm_t_scfuffn", help="model preset (default sm_t_scfuffn)")
    parser.add_argument("--size", default="cpu-small", help="model.size (default cpu-small)")
    parser.add_argument("--context", type=int, nargs="+", default=[128, 512], help="context lengths T (default 128 512)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per side (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warmup steps per side (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per side (default 3)")
    parser.add_argument("--no-write", action="store_true", help="print the table without updating docs/benchmarks.md")
    args = parser.parse_args()

    rows = []
    for context in args.context:
        cfg = load_config(args.preset, [f"model.size={args.size}", "entropy.loss_coeff=1e-5", "train.max_steps=1000",
                                        f"data.context_length={context}"])
        data = prepare_data(cfg.data)

        # alternate the two sides so slow drifts of the machine hit both
        ours, released = [], []
        for _ in range(args.repeats):
            ours.append(time_ours(cfg, data, args.steps, args.warmup))
            released.append(time_released(cfg, data, args.steps, args.warmup))
        ours_tps, released_tps = float(np.median(ours)), float(np.median(released))
        rows.append(f"| {context} | {ours_tps:,.0f} | {released_tps:,.0f} | {ours_tps / released_tps:.2f}x | "
                    f"{', '.join(f'{x:,.0f}' for x in ours)} / {', '.join(f'{x:,.0f}' for x in released)} |")

    n_layer, n_head, n_embd = cfg.model.dims()
    command = "python benchmarks/bench_train_loop.py " + " ".join(sys.argv[1:])
    markdown = (
        f"{SECTION}\n\n"
        f"Command: `{command.strip()}`. Machine: {machine()}. Date: {datetime.date.today().isoformat()}.\n"
        f"Model: {args.preset} ({n_layer} layers, {n_head} heads, d={n_embd}), batch {cfg.train.batch_size}, "
        f"vocab {len(data.tokenizer)}, lambda=1e-5, stdlib-python chunks; median of {args.repeats} alternating "
        f"runs of {args.steps} steps after {args.warmup} warmup steps. Goal: ours at 1.5x or better.\n\n"
        "| T | harness.train tokens/s | Trainer + released tokens/s | speed-up | runs (ours / released) |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(markdown)
    if not args.no_write:
        write_section(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
