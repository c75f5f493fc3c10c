#!/usr/bin/env bash
# Synthetic three-institution cross-site study of private models (docs/results.md).
# Usage: bash examples/crosssite_demo.sh OUT [CASES] [EPOCHS]
set -euo pipefail
out=${1:-crosssite-demo}; cases=${2:-40}; epochs=${3:-30}
fedseg data synth "$out/data" --cases "$cases" --external-cases 20 --seed 0
bash "$(dirname "$0")/crosssite.sh" "$out" "$epochs" 2 "$out/data/prostatex" "$out/data/nci" "$out/data/suny" "$out/data/ucla"
