#!/usr/bin/env bash
# Everything fedseg measures on a GPU, in one call of at most ~8 minutes:
#   1. the CUDA-only tests (skipped on CPU machines, so CI never runs them);
#   2. benchmarks/gpu_training.py: AH-Net at 1 mm, fp32 vs AMP, GPU utilisation, memory,
#      epoch time, the AMP Dice cost on one fold, DDP scaling if >1 GPU, the paper study's projection.
#
# On a machine with fedseg installed:   bash benchmarks/gpu.sh
# Rehearsal on a CPU (no GPU needed):   bash benchmarks/gpu.sh --device cpu --quick
#
# The project's GPU machine (the `device` tool) has PyTorch but not MONAI or nibabel, and no network.
# Before the call, here, once:   bash benchmarks/gpu_wheels.sh      (downloads them into .whl/, git-ignored)
# then run with carry [".whl"] and the command `bash benchmarks/gpu.sh`; results land in $OUT.
# Extra arguments go to gpu_training.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fedseg-site .whl/*.whl
    export PYTHONPATH="/tmp/fedseg-site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
elif ! python3 -c "import fedseg" 2> /dev/null; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
python3 - << 'EOF'
import torch, monai, nibabel  # noqa: F401 - fail here, clearly, if something is missing
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}")
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
start=$(date +%s)
if python3 -c "import pytest" 2> /dev/null; then
    # only the tests that need CUDA: they are skipped everywhere else
    python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_distributed.py -k "cuda or gpus" 2>&1 | tee "$OUT/cuda_tests.log" || true
fi
echo "tests: $(( $(date +%s) - start )) s"
python3 benchmarks/gpu_training.py --json "$OUT/gpu_training.json" "$@" 2>&1 | tee "$OUT/gpu_training.log"
echo "gpu.sh: $(( $(date +%s) - start )) s in all"
