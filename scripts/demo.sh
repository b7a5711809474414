#!/usr/bin/env bash
# `make demo`: the main job on the embedded default recipe, as far as moon-rl implements it today:
# synthetic catalogue -> SFT (reasoning + InfoNCE) -> GRPO (retrieval rewards + InfoNCE) -> embed -> search.
# The evaluation report joins when `moon-rl eval` / `moon-rl run` land.
set -euo pipefail
OUT="${1:-runs/demo}"
MOON=".venv/bin/moon-rl"
RECIPE="recipes/tiny-cpu.yaml"

echo "== 1/6 recipe: $RECIPE"
$MOON recipe validate "$RECIPE"
echo "== 2/6 synthetic catalogue (what builtin:synthetic holds) -> $OUT/catalogue"
$MOON data synth "$OUT/catalogue" --n-products 600 --seed 0
$MOON data validate "$OUT/catalogue"
echo "== 3/6 SFT: reasoning traces + InfoNCE on builtin:tiny-vl (about 5 minutes on 2 cores)"
$MOON sft "$RECIPE" --set "output_dir=$OUT" --set "data.catalogue=$OUT/catalogue" --overwrite
echo "== 4/6 GRPO: sampled reasoning rewarded by retrieval rank (about 1 minute)"
$MOON grpo "$RECIPE" --set "output_dir=$OUT" --set "data.catalogue=$OUT/catalogue" --overwrite
echo "== 5/6 embed the catalogue with the trained model"
$MOON embed "$RECIPE" --model "$OUT/grpo/final" --catalogue "$OUT/catalogue" --out "$OUT/embed" --set "output_dir=$OUT"
echo "== 6/6 search"
$MOON search "$OUT/embed" "red striped cotton shirt" -k 5
echo
echo "Test split, hard gallery (from $OUT/grpo/metrics.json):"
.venv/bin/python -c "import json, sys; print(json.load(open(sys.argv[1]))['table'])" "$OUT/grpo/metrics.json"
