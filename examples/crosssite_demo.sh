#!/usr/bin/env bash
# Private five-fold ensembles at three synthetic institutions, each evaluated on
# every institution's held-out test set and on the external set (the paper's
# Tables 3 and 4 without the FL row). Usage: bash examples/crosssite_demo.sh OUT [CASES] [EPOCHS]
set -euo pipefail
out=${1:-crosssite-demo}; cases=${2:-40}; epochs=${3:-30}
sites=(nci suny ucla)
cache="$out/cache"
fedseg data synth "$out/data" --cases "$cases" --external-cases 20 --seed 0
for site in "${sites[@]}"; do
  /usr/bin/time -f "train $site: %e s wall" \
    fedseg train "$out/data/$site" --out "$out/models/$site" --epochs "$epochs" --spacing 2 --cache "$cache"
done
for model in "${sites[@]}"; do
  for test_set in "${sites[@]}"; do
    fedseg evaluate "$out/models/$model" "$out/data/$test_set" --name "private:$model" --json "$out/eval/$model-on-$test_set.json" --cache "$cache"
  done
  fedseg evaluate "$out/models/$model" "$out/data/prostatex" --split all --name "private:$model" --json "$out/eval/$model-on-prostatex.json" --cache "$cache"
done
fedseg tables "$out"/eval/*.json --reference private:nci --private nci,suny,ucla --external prostatex --out "$out/tables"
