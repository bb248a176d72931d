"""Benchmark training steps with and without the entropy regularizer, side by side.

For each context length T, three training steps (forward, backward, AdamW step) of the same model
(the sm_t_scfuffn preset, cpu-small size by default):

  a  plain:    fused attention, no entropy (return_entropy=False), loss = CE
  b  fused:    fused attention with the row entropy (harness.fused_entropy), loss = CE + 1e-5 * L_ent
  c  released: the authors' released approach: eager attention that keeps every layer's (B, H, T, T)
               probabilities in a list, as output_attentions does, and a loss computed per layer and head
               in Python: ent = -nansum(A * log(A + 1e-9)), deviation, where, square, sum

Step times are medians over --steps steps per mode after --warmup steps, with the three modes
interleaved step by step in one process, so that load from other processes hits all three alike. Peak
memory is measured over two steps per mode. On CPU, each mode runs in a fresh subprocess and the peak is
its peak RSS (ru_maxrss) minus the RSS before the first step. On CUDA, the modes run one after another
in this process and the peak is torch.cuda.max_memory_allocated minus the memory allocated before.

    python benchmarks/bench_entropy_attention.py                       # CPU, writes docs/benchmarks.md
    python benchmarks/bench_entropy_attention.py --device cuda --write $OUT/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import harness.modeling as modeling
from harness.config import load_config
from harness.modeling import EntropyGPTForCausalLM, model_config_from_run
from released import released_entropy_loss

MODES = ("plain", "fused", "released")
LOSS_COEFF = 1e-5
SECTION = "## Entropy attention: fused vs explicit vs released"
ROOT = Path(__file__).resolve().parent.parent


# -----------------------------------------------------------------------------
# The released approach: eager attention that keeps the probabilities, a per-head loss loop

def eager_attention_keeping_probs(store: list):
    """Return a causal_attention replacement that runs eager attention and appends each layer's probabilities."""

    def attention(q, k, v, need_entropy, impl="explicit"):
        T = q.shape[-2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)  # (B, nh, T, T)
        store.append(probs)
        return probs @ v, None  # (B, nh, T, hs)

    return attention


# -----------------------------------------------------------------------------
# One training step per mode

def build(args, T: int):
    """Return (model, optimizer, tokens) for context length T, seeded so every mode gets the same weights."""
    torch.manual_seed(0)
    cfg = load_config("sm_t_scfuffn", [f"data.context_length={T}", f"model.size={args.model_size}"])
    model = EntropyGPTForCausalLM(model_config_from_run(cfg)).to(args.device).train()
    optimizer = torch.optim.AdamW(model.optim_groups(weight_decay=0.1), lr=1e-4)
    batch = max(1, args.batch_tokens // T)
    tokens = torch.randint(0, model.config.vocab_size, (batch, T), device=args.device)
    return model, optimizer, tokens


def train_step(mode: str, model, optimizer, tokens, dtype) -> None:
    """Run one forward, backward and AdamW step of `mode` (plain, fused or released)."""
    # the released mode swaps the model's attention function for eager attention that records probabilities
    store = []
    original = modeling.causal_attention
    if mode == "released":
        modeling.causal_attention = eager_attention_keeping_probs(store)
    try:
        with torch.autocast(tokens.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(tokens, labels=tokens, return_entropy=mode == "fused")
            loss = out.loss
            if mode == "fused":
                loss = loss + LOSS_COEFF * out.entropy_loss
            if mode == "released":
                thresholds = [block.attn.reg_threshold_weights for block in model.transformer.h]
                loss = loss + released_entropy_loss(store, thresholds, model.config.n_head, tokens.shape[1], LOSS_COEFF)
        loss.backward()
    finally:
        modeling.causal_attention = original
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_modes(args, T: int) -> dict:
    """Return {"median": {mode: s}, "min": {mode: s}} step times, with the modes interleaved step by step.

    A mode that runs out of memory gets the string "out of memory" and leaves the rotation.
    """
    runs = {mode: build(args, T) for mode in MODES}
    times = {mode: [] for mode in MODES}
    failed = {}
    for step in range(args.warmup + args.steps):
        for mode in MODES:
            if mode in failed:
                continue
            synchronize(args.device)
            start = time.perf_counter()
            try:
                train_step(mode, *runs[mode], args.dtype)
            except torch.OutOfMemoryError:
                failed[mode] = "out of memory"
                runs[mode] = None
                torch.cuda.empty_cache()
                continue
            synchronize(args.device)
            if step >= args.warmup:
                times[mode].append(time.perf_counter() - start)
    return {
        "median": {mode: failed.get(mode) or statistics.median(times[mode]) for mode in MODES},
        "min": {mode: failed.get(mode) or min(times[mode]) for mode in MODES},
    }


def current_rss() -> int:
    """Return this process's resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(args, T: int, mode: str) -> int:
    """Return the peak memory (bytes) of two steps of `mode` above the memory held before them."""
    if args.device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    model, optimizer, tokens = build(args, T)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss()
    for _ in range(2):
        train_step(mode, model, optimizer, tokens, args.dtype)
    if args.device == "cuda":
        return torch.cuda.max_memory_allocated() - before
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def attention_split(args) -> str:
    """Return a Markdown table of one attention layer's time: plain SDPA vs fused y + H, fwd and fwd+bwd.

    Random (B, 4, T, 32) inputs with B = --batch-tokens // T; each entry is the fastest of 5 runs.
    CPU time of this process on CPU (steadier under load from other processes), wall time on CUDA.
    """
    clock = time.perf_counter if args.device == "cuda" else time.process_time
    from harness.fused_entropy import fused_attention_entropy

    def plain(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    def fused(q, k, v):
        y, entropy = fused_attention_entropy(q, k, v)
        return y.sum() + entropy.sum()

    lines = ["| B x T | plain SDPA fwd | plain fwd+bwd | fused y + H fwd | fused fwd+bwd |", "|---|---|---|---|---|"]
    for T in args.sizes:
        batch = max(1, args.batch_tokens // T)
        q, k, v = (torch.randn(batch, 4, T, 32, device=args.device, requires_grad=True) for _ in range(3))
        cells = []
        for function in (plain, fused):
            for backward in (False, True):
                runs = []
                for _ in range(6):
                    synchronize(args.device)
                    start = clock()
                    loss = function(q, k, v)
                    if backward:
                        loss.backward()
                    synchronize(args.device)
                    runs.append(clock() - start)
                cells.append(f"{min(runs[1:]) * 1e3:.0f} ms")
        lines.append(f"| {batch} x {T} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Subprocess workers and the driver

def run_job(args, job: str, T: int):
    """Return the result of `job`: the step times ("time") or the peak memory of one mode (its name)."""
    if job == "time":
        return time_modes(args, T)
    try:
        return peak_memory(args, T, job)
    except torch.OutOfMemoryError:
        return "out of memory"


def spawn(args, job: str, T: int):
    """Run `job` for context length T in a fresh process on CPU, in this process on CUDA."""
    if args.device == "cuda":
        return run_job(args, job, T)
    command = [sys.executable, __file__, "--worker", job, "--worker-size", str(T), *args.passthrough]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark worker {job} at T={T} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])["result"]


def measure(args) -> list[dict]:
    rows = []
    for T in args.sizes:
        timing = spawn(args, "time", T)
        memory = {mode: spawn(args, mode, T) for mode in MODES}
        rows.append({"T": T, "batch": max(1, args.batch_tokens // T), "time": timing, "memory": memory})
        print(format_table([rows[-1]], args.device).splitlines()[-1], flush=True)
    return rows


def ratio(numerator, denominator) -> str:
    if isinstance(numerator, str) or isinstance(denominator, str):
        return "n/a"
    return f"{numerator / denominator:.2f}"


def cell(value, unit: float) -> str:
    """Format a measurement in the given unit, or pass through a failure such as "out of memory"."""
    return value if isinstance(value, str) else f"{value / unit:.0f}"


def format_table(rows: list[dict], device: str) -> str:
    """Return the results as a Markdown table: median step times (ms), peak memory (MiB) and the ratios.

    "b/a fastest" is the ratio of the fastest steps, which load from other processes disturbs least.
    """
    lines = [
        "| T | batch | a plain ms | b fused ms | c released ms | b/a time | c/b time | b/a fastest "
        "| a MiB | b MiB | c MiB | b/a memory | c/b memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t, fastest, m = row["time"]["median"], row["time"]["min"], row["memory"]
        cells = [str(row["T"]), str(row["batch"])]
        cells += [cell(t[mode], 1e-3) for mode in MODES]
        cells += [ratio(t["fused"], t["plain"]), ratio(t["released"], t["fused"])]
        cells += [ratio(fastest["fused"], fastest["plain"])]
        cells += [cell(m[mode], 2**20) for mode in MODES]
        cells += [ratio(m["fused"], m["plain"]), ratio(m["released"], m["fused"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(device: str) -> str:
    """Return the device, CPU model, core count and torch version."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, torch threads: {torch.get_num_threads()}"
    if device == "cuda":
        text = f"{torch.cuda.get_device_name()}; host {text}"
    return text


def results_key(args) -> str:
    """Return the name of a results block: device, model size, dtype and, on CPU, the torch thread count."""
    key = f"{args.device}, {args.model_size}, {args.dtype_name}"
    threads = torch.get_num_threads()
    return key if args.device == "cuda" else f"{key}, {threads} thread{'s' if threads > 1 else ''}"


def results_block(args, rows, load_before, load_after) -> str:
    """Return the Markdown block for one device: command, machine, date, load and the table."""
    command = "python benchmarks/bench_entropy_attention.py " + " ".join(args.passthrough + args.driver_only)
    return "\n".join([
        f"### {results_key(args)} ({datetime.date.today().isoformat()})",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine_line(args.device)}",
        f"- model: sm_t_scfuffn, size {args.model_size}, dtype {args.dtype_name}; batch = {args.batch_tokens} tokens / T;"
        f" {args.steps} timed steps per mode after {args.warmup} untimed",
        f"- load average (1 min) before / after: {load_before:.1f} / {load_after:.1f}",
        "",
        format_table(rows, args.device),
    ])


def write_section(path: Path, key: str, block: str) -> None:
    """Replace the results block named `key` inside the section of `path`, creating what is missing."""
    start, end = f"<!-- bench_entropy_attention {key} start -->", f"<!-- bench_entropy_attention {key} end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\nWritten by benchmarks/bench_entropy_attention.py.\n"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1]
    else:
        # insert at the end of the section: before the next level-2 heading, if any
        section_start = text.index(SECTION) + len(SECTION)
        next_heading = text.find("\n## ", section_start)
        cut = len(text) if next_heading < 0 else next_heading
        text = text[:cut].rstrip("\n") + f"\n\n{start}\n{block}\n{end}\n" + text[cut:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024, 2048], help="context lengths T")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens per batch; batch size = this // T")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode and size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode before timing")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype")
    parser.add_argument("--model-size", default="cpu-small", help="a model size of harness.config.MODEL_SIZES")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="Markdown file whose section gets the results")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--json", type=Path, help="also write the raw results to this JSON file")
    parser.add_argument("--attention-only", action="store_true",
                        help="print the time of one attention layer (plain vs fused) instead of training steps")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given, but torch finds no CUDA device")
    if min(args.sizes) < 1 or args.steps < 1 or args.batch_tokens < 1:
        parser.error("--sizes, --steps and --batch-tokens must be >= 1")

    # options that workers repeat, and driver-only options shown in the command line
    args.passthrough = [
        "--batch-tokens", str(args.batch_tokens), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--device", args.device, "--dtype", args.dtype, "--model-size", args.model_size, "--threads", str(args.threads),
    ]
    args.driver_only = ["--sizes", *map(str, args.sizes)]
    args.dtype_name, args.dtype = args.dtype, getattr(torch, args.dtype)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps({"result": run_job(args, args.worker, args.worker_size)}))
        return
    if args.attention_only:
        print(attention_split(args))
        return

    # measure, then print and record
    load_before = os.getloadavg()[0]
    rows = measure(args)
    block = results_block(args, rows, load_before, os.getloadavg()[0])
    print("\n" + block)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if not args.no_write:
        write_section(args.write, results_key(args), block)
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
