#!/usr/bin/env bash
# GPU check for a CUDA machine (run it whenever one is available): the builtin `small` model in bf16 on CUDA through
# SFT steps, GRPO steps, 4-bit QLoRA steps, fp16 SFT steps, an FSDP run (SFT, resume, GRPO) and the 3B recipe at real
# size on random weights (bench/real_size_check.py: peak memory beside `moon-rl plan`) and `moon-rl annotate --teacher`
# (the builtin model writes traces, resumed), printing seconds per
# step, peak CUDA memory, trainable dtypes and the final loss of each part (bench/gpu_check.py says what each part does). Exit code 1 if any part failed.
#
#   bash bench/gpu_check.sh [--steps 6] [--parts sft,grpo,qlora,fp16,fsdp,real3b,annotate] [--device cuda|cpu] [...]   # from any folder
#
# No network needed: HF_HUB_OFFLINE=1, the model and catalogue are built locally into a fresh MOON_RL_CACHE. moon-rl
# is not installed, it runs from this checkout. Packages the machine lacks (trl, datasets, pydantic, bitsandbytes, ...)
# travel as wheels in .whl/ at the repository root and are installed into /tmp/site first, if that folder exists.
# The output is also written to ${OUT:-/tmp}/gpu_check.log.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_check.log
mkdir -p "$(dirname "$LOG")"

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PIP_ROOT_USER_ACTION=ignore
MOON_RL_CACHE=$(mktemp -d /tmp/moon-rl-cache.XXXXXX) || exit 1
export MOON_RL_CACHE

main() {
    local start=$SECONDS
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
    fi
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ into /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "FAILED: setup: pip install of .whl/*.whl"; return 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        echo "wheels installed in $((SECONDS - start)) s"
    fi
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    echo "PYTHONPATH=$PYTHONPATH"
    "$PY" bench/gpu_check.py "$@"
    local rc=$?
    echo "gpu_check.sh: exit code $rc after $((SECONDS - start)) s"
    return $rc
}

main "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
rm -rf "$MOON_RL_CACHE"
exit "$rc"
