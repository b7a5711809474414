#!/usr/bin/env bash
# `make demo`: the main job on the embedded default recipe, as far as moon-rl implements it today.
# Grows with each stage: catalogue -> (sft -> grpo) -> embed -> search.
set -euo pipefail
OUT="${1:-runs/demo}"
MOON=".venv/bin/moon-rl"
RECIPE="recipes/tiny-cpu.yaml"

echo "== 1/4 recipe: $RECIPE"
$MOON recipe validate "$RECIPE"
echo "== 2/4 synthetic catalogue -> $OUT/catalogue"
$MOON data synth "$OUT/catalogue" --n-products 200 --seed 0
$MOON data validate "$OUT/catalogue"
echo "== 3/4 embed the catalogue (untrained builtin:tiny-vl; training stages arrive with moon-rl sft/grpo)"
$MOON embed "$RECIPE" --catalogue "$OUT/catalogue" --out "$OUT/embed" --set "output_dir=$OUT"
echo "== 4/4 search"
$MOON search "$OUT/embed" "red striped cotton shirt" -k 5
