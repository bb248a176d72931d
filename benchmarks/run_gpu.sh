#!/usr/bin/env bash
# Run the CUDA checks of the fused attention entropy and its benchmark on one GPU, in about 5 minutes.
#
# Needs a Python with CUDA torch, transformers and pytest, and the repository as the working directory.
# Writes to $OUT (default ./gpu-results): env.txt, test_fused_entropy.txt, benchmarks.md (the results
# blocks of the "Entropy attention" section, to paste into docs/benchmarks.md) and one JSON and log per run.
set -uo pipefail

OUT="${OUT:-gpu-results}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true

# environment: stop here when torch finds no GPU
"$PYTHON" - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name())
PY
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device"; exit 1; }

# equality tests, CUDA variants included (about 30 s)
timeout 120 "$PYTHON" -m pytest tests/unit/test_fused_entropy.py -q -p no:cacheprovider -rs 2>&1 \
    | tee "$OUT/test_fused_entropy.txt"

# the benchmark: the CPU-sized model in fp32, then GPT-2 small in bf16 autocast
timeout 120 "$PYTHON" benchmarks/bench_entropy_attention.py --device cuda --steps 10 --warmup 3 \
    --write "$OUT/benchmarks.md" --json "$OUT/bench_cpu_small_fp32.json" 2>&1 | tee "$OUT/bench_cpu_small_fp32.txt"
timeout 150 "$PYTHON" benchmarks/bench_entropy_attention.py --device cuda --steps 10 --warmup 3 \
    --model-size gpt2-small --dtype bfloat16 --batch-tokens 8192 \
    --write "$OUT/benchmarks.md" --json "$OUT/bench_gpt2_small_bf16.json" 2>&1 | tee "$OUT/bench_gpt2_small_bf16.txt"
