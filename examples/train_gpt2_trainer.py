"""Train a small, randomly initialized stock GPT-2 on the Python standard library with EntropyRegularizedTrainer.

The data is the harness's code corpus (the interpreter's stdlib sources, a byte-level BPE trained on
them, packed T-token chunks), prepared and cached under .cache/harness on the first run. The run goes to
MLflow (sqlite:///mlflow.db by default): the training loss, eval_loss and the entropy metrics
(entropy/loss, entropy/mean, per-layer means, bins, overload and collapse fractions, one
attn.{layer}.head.{head}.entropy per head) share their steps. View them with `make ui`.

    .venv/bin/python examples/train_gpt2_trainer.py --max-steps 50
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from pathlib import Path

# offline at run time: no hub lookups, no telemetry
for key, value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, TrainerCallback, TrainingArguments  # noqa: E402

from harness.config import DataConfig  # noqa: E402
from harness.data import prepare_data  # noqa: E402
from harness.integrations import EntropyRegularizedTrainer, entropy_thresholds  # noqa: E402

log = logging.getLogger("train_gpt2_trainer")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # training length and batch
    parser.add_argument("--max-steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate, with linear warmup and decay")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the model init and the data order")
    # model and data
    parser.add_argument("--n-layer", type=int, default=4, help="GPT-2 layers")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads per layer")
    parser.add_argument("--n-embd", type=int, default=128, help="embedding width")
    parser.add_argument("--context-length", type=int, default=128, help="tokens per training sequence (T)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="size of the byte-level BPE trained on the corpus")
    parser.add_argument("--cache-dir", default=".cache/harness", help="folder of the cached tokenizer and chunks")
    # entropy regularization
    parser.add_argument("--loss-coeff", type=float, default=1e-5, help="lambda, the weight of L_ent (0 logs the entropy without adding it)")
    parser.add_argument("--tolerance", type=float, default=0.2, help="gamma: deviations within gamma * log T are free")
    parser.add_argument("--threshold-init", type=float, default=0.5, help="initial threshold, a fraction of log T")
    parser.add_argument("--reduction", choices=("row_sum", "head_mean"), default="row_sum", help="L_ent reduction")
    # logging, evaluation and tracking
    parser.add_argument("--logging-steps", type=int, default=10, help="steps between loss and entropy logs")
    parser.add_argument("--eval-steps", type=int, default=25, help="steps between evaluations")
    parser.add_argument("--eval-samples", type=int, default=64, help="validation sequences per evaluation")
    parser.add_argument("--report-to", choices=("mlflow", "none"), default="mlflow", help="where the Trainer logs")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI")
    parser.add_argument("--experiment", default="gpt2-trainer", help="MLflow experiment name")
    parser.add_argument("--output-dir", default="runs/gpt2-trainer", help="folder of the Trainer output and final model")
    return parser.parse_args()


class ChunkDataset(torch.utils.data.Dataset):
    """Packed (N, T) token chunks as causal-LM examples whose labels the model shifts."""

    def __init__(self, chunks: np.ndarray):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.chunks[i], dtype=np.int64))  # (T,)
        return {"input_ids": ids, "labels": ids}


class LogLineCallback(TrainerCallback):
    """Log one line per Trainer log: loss, entropy loss, mean head entropy, overload and collapse."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            parts = [f"loss {logs['loss']:.4f}"]
            if "entropy/loss" in logs:
                parts.append(f"entropy loss {logs['entropy/loss']:.1f}")
            if "entropy/mean" in logs:
                parts.append(f"head entropy {logs['entropy/mean']:.3f}")
                parts.append(f"overload {logs['entropy/overload_fraction']:.2f}")
                parts.append(f"collapse {logs['entropy/collapse_fraction']:.2f}")
            log.info("step %d: %s", state.global_step, ", ".join(parts))
        elif "eval_loss" in logs:
            log.info("step %d: eval loss %.4f, perplexity %.1f", state.global_step, logs["eval_loss"],
                     math.exp(logs["eval_loss"]))


def setup_mlflow(tracking_uri: str, experiment: str) -> str:
    """Point the Trainer's MLflow callback at the store, with artifacts in mlartifacts/ next to a SQLite file."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        tracking_uri = "sqlite:///" + str(Path(tracking_uri[len("sqlite:///"):]).resolve())
    client = MlflowClient(tracking_uri)
    if tracking_uri.startswith("sqlite:///") and client.get_experiment_by_name(experiment) is None:
        folder = Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", experiment)
        client.create_experiment(experiment, artifact_location=folder.as_uri())
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
    mlflow.set_tracking_uri(tracking_uri)
    return tracking_uri


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)

    # data: stdlib sources -> BPE -> (N, T) chunks, cached after the first run
    data_cfg = DataConfig(context_length=args.context_length, vocab_size=args.vocab_size, cache_dir=args.cache_dir)
    data = prepare_data(data_cfg)
    eval_chunks = data.val[: args.eval_samples]

    # a stock GPT-2 config with no dropout, so eager attention returns the exact probabilities
    tokenizer = data.tokenizer
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.context_length, n_layer=args.n_layer, n_head=args.n_head,
        n_embd=args.n_embd, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    log.info("GPT-2: %d layers, %d heads, d=%d, %.2fM parameters", args.n_layer, args.n_head, args.n_embd,
             sum(p.numel() for p in model.parameters()) / 1e6)

    # tracking
    if args.report_to == "mlflow":
        uri = setup_mlflow(args.tracking_uri, args.experiment)
        log.info("MLflow: %s, experiment %r", uri, args.experiment)

    # the Trainer: the only change from a stock Trainer is the class and the entropy arguments
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, weight_decay=0.1,
        adam_beta2=0.95, warmup_steps=max(1, args.max_steps // 20), max_grad_norm=1.0,
        logging_steps=args.logging_steps, eval_strategy="steps", eval_steps=args.eval_steps,
        save_strategy="no", report_to=args.report_to, run_name=f"gpt2-trainer-lambda{args.loss_coeff:g}",
        seed=args.seed, disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = EntropyRegularizedTrainer(
        model=model, args=training_args, train_dataset=ChunkDataset(data.train), eval_dataset=ChunkDataset(eval_chunks),
        loss_coeff=args.loss_coeff, tolerance_margin_factor=args.tolerance, context_size=args.context_length,
        reduction=args.reduction, threshold_init=args.threshold_init,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogLineCallback())
    trainer.train()

    # the Trainer evaluates at the last step; a later trainer.evaluate() would open a second MLflow run
    final_eval = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry][-1]
    thresholds = entropy_thresholds(model)
    log.info("final eval loss %.4f (perplexity %.1f)", final_eval, math.exp(final_eval))
    log.info("thresholds per layer (mean): %s", ", ".join(f"{v:.3f}" for v in thresholds.mean(dim=1).tolist()))
    if args.report_to == "mlflow":
        import mlflow

        log.info("MLflow run %s contains the loss and entropy metrics", mlflow.last_active_run().info.run_id)
    final_dir = Path(args.output_dir) / "final"
    trainer.save_model(str(final_dir))
    log.info("saved to %s (reload with GPT2LMHeadModel.from_pretrained(path), then load_entropy_thresholds(model, path))",
             final_dir)


if __name__ == "__main__":
    main()
