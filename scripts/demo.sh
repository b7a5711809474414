#!/usr/bin/env bash
# `make demo`: the main job on the embedded default recipe, every stage in one command:
# synthetic catalogue -> SFT (reasoning + InfoNCE) -> GRPO (retrieval rewards + InfoNCE) -> embed -> eval report.
# Usage: scripts/demo.sh [OUT_DIR] [moon-rl run options, e.g. --overwrite]. Finished stages are skipped on a rerun.
set -euo pipefail
OUT="${1:-runs/demo}"
shift || true
exec .venv/bin/moon-rl run recipes/tiny-cpu.yaml --set "output_dir=$OUT" "$@"
