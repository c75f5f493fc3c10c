#!/usr/bin/env bash
# Private five-fold ensembles at several sites, each evaluated on every site's
# held-out test set and on an external set: the paper's Tables 3 and 4 without
# the FL row. Usage:
#   bash examples/crosssite.sh OUT EPOCHS SPACING EXTERNAL_DIR SITE_DIR [SITE_DIR...]
set -euo pipefail
out=$1; epochs=$2; spacing=$3; external=$4; shift 4
sites=("$@")
cache="$out/cache"
names=()
for site in "${sites[@]}"; do
  name=$(basename "$site"); names+=("$name")
  /usr/bin/time -f "train $name: %e s wall" \
    fedseg train "$site" --out "$out/models/$name" --epochs "$epochs" --spacing "$spacing" --cache "$cache"
done
ext=$(basename "$external")
for model in "${names[@]}"; do
  for site in "${sites[@]}"; do
    fedseg evaluate "$out/models/$model" "$site" --name "private:$model" --json "$out/eval/$model-on-$(basename "$site").json" --cache "$cache"
  done
  fedseg evaluate "$out/models/$model" "$external" --split all --name "private:$model" --json "$out/eval/$model-on-$ext.json" --cache "$cache"
done
private=$(IFS=,; echo "${names[*]}")
fedseg tables "$out"/eval/*.json --reference "private:${names[0]}" --private "$private" --external "$ext" --out "$out/tables"
