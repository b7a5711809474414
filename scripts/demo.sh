#!/usr/bin/env bash
# `make demo`: the main job on the embedded default recipe, as far as moon-rl implements it today:
# synthetic catalogue -> SFT (reasoning + InfoNCE) -> embed the catalogue with the trained model -> search.
# GRPO and the evaluation report join when `moon-rl grpo` / `moon-rl eval` / `moon-rl run` land.
set -euo pipefail
OUT="${1:-runs/demo}"
MOON=".venv/bin/moon-rl"
RECIPE="recipes/tiny-cpu.yaml"

echo "== 1/5 recipe: $RECIPE"
$MOON recipe validate "$RECIPE"
echo "== 2/5 synthetic catalogue (what builtin:synthetic holds) -> $OUT/catalogue"
$MOON data synth "$OUT/catalogue" --n-products 600 --seed 0
$MOON data validate "$OUT/catalogue"
echo "== 3/5 SFT: reasoning traces + InfoNCE on builtin:tiny-vl (about 5 minutes on 2 cores)"
$MOON sft "$RECIPE" --set "output_dir=$OUT" --set "data.catalogue=$OUT/catalogue" --overwrite
echo "== 4/5 embed the catalogue with the trained model"
$MOON embed "$RECIPE" --model "$OUT/sft/final" --catalogue "$OUT/catalogue" --out "$OUT/embed" --set "output_dir=$OUT"
echo "== 5/5 search"
$MOON search "$OUT/embed" "red striped cotton shirt" -k 5
echo
echo "Test split, hard gallery (from $OUT/sft/metrics.json):"
.venv/bin/python -c "import json, sys; print(json.load(open(sys.argv[1]))['table'])" "$OUT/sft/metrics.json"
