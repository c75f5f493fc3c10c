#!/usr/bin/env bash
# Download the wheels the project's GPU machine lacks (see benchmarks/gpu.sh) into .whl/, which git ignores.
# That machine runs Python 3.12 with PyTorch, NumPy, SciPy, safetensors and rich already there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2> /dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "monai==$(python3 -c 'import monai; print(monai.__version__)' 2> /dev/null || echo 1.6.1)" nibabel
ls -l .whl
