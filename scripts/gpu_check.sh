#!/usr/bin/env bash
# The GPU checks of issue 13 in one run (under 8 minutes on one H100/H200), from the repository root:
#
#   bash scripts/gpu_check.sh            # on the GPU machine: device, tests, kernel bench, rollout bench, PPO
#   bash scripts/gpu_check.sh wheels     # on a dev machine first: fill .whl/ (git-ignored) for the GPU machine
#
# The GPU machine's Python has torch, triton and transformers but no deepspeed or datasets and no package index
# (../shared/ENV.md): the wheels in .whl/ go into /tmp/site with --no-deps. Each step has its own time limit, so
# a slow one cannot eat the others' time; the log is also written to $OUT/gpu_check.log when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = wheels ]; then  # dev machine: the wheels ENV.md lists (about 23 MB), for CPython 3.12 x86_64
    set -e
    mkdir -p .whl
    PIP=".venv/bin/pip"
    cached=$(find ~/.cache/pip/wheels -name 'deepspeed-0.19.8-py3-none-any.whl' 2>/dev/null | head -1)
    if [ -n "$cached" ]; then cp "$cached" .whl/; else $PIP wheel -q --no-deps -w .whl deepspeed==0.19.8; fi
    $PIP download -q --no-deps -d .whl --python-version 3.12 --platform manylinux_2_17_x86_64 --only-binary=:all: \
        hjson pydantic pydantic_core annotated-types typing-inspection "datasets==5.2.0" dill multiprocess \
        "fsspec==2026.9.0" "transformers==5.23.0" "tokenizers==0.23.3" typing_extensions
    ls -l .whl
    echo "carry .whl to the GPU machine (run tool: carry=[\".whl\"])"
    exit 0
fi

LOG="${OUT:-/tmp}/gpu_check.log"
exec > >(tee "$LOG") 2>&1
start=$SECONDS
step() { echo; echo "=== $1 (t=$((SECONDS - start)) s)"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
else
    echo "no .whl/ folder: deepspeed-dependent tests will skip (fill it with: bash scripts/gpu_check.sh wheels)"
fi
PY=python3
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
$PY - <<'PYEOF'
import importlib, torch
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
for m in ("torch", "triton", "transformers", "deepspeed", "datasets"):
    try:
        print(f"  {m} {importlib.import_module(m).__version__}")
    except Exception as e:
        print(f"  {m}: {type(e).__name__}: {e}")
PYEOF

step "tests: kernels (fp32 and bf16 on CUDA) and generation (compiled decoding with inductor)"
timeout 200 $PY -m pytest -q -rs tests/test_kernels.py tests/test_generation.py || echo "TESTS FAILED OR TIMED OUT (rc $?)"

step "rollout bench: random Llama 1.24B, bf16, batch 64, prompt 128, 256 new tokens (forward+backward in 4 chunks)"
timeout 150 $PY kernels/bench.py --rollout --train_micro_batch 16 || echo "ROLLOUT BENCH FAILED OR TIMED OUT (rc $?)"

step "kernel bench: realistic shapes, with the torch.compile peer"
timeout 90 $PY kernels/bench.py --repeats 10 || echo "KERNEL BENCH FAILED OR TIMED OUT (rc $?)"

step "ppo_lag.py on CUDA with each generation cache (toy world, 2 steps)"
if grep -q -- "--generation_cache" ppo_lag.py; then
    root=/tmp/gpu_check_toy
    $PY - "$root" <<'PYEOF'
import sys, torch
import data
from score_model import ScoreModel
root = sys.argv[1]
data.make_toy_model(f"{root}/base")
torch.manual_seed(0)
ScoreModel.from_pretrained(f"{root}/base", score_type="reward").save_pretrained(f"{root}/rm")
data.load_tokenizer(f"{root}/base").save_pretrained(f"{root}/rm")
PYEOF
    for cache in static dynamic; do
        timeout 40 $PY ppo_lag.py --actor_model_name_or_path $root/base --reward_model_name_or_path $root/rm \
            --train_datasets toy-prompts:0.02 --eval_datasets toy-eval:0.05 --max_length 48 --max_steps 2 \
            --per_device_prompt_batch_size 4 --per_device_train_batch_size 2 --update_iters 1 \
            --generation_cache $cache --output_dir /tmp/gpu_check_ppo_$cache 2>&1 \
            | grep -E "^generation:|time/generate|^step |error" || echo "PPO ($cache) FAILED OR TIMED OUT"
    done
else
    echo "skipped: ppo_lag.py has no --generation_cache flag yet (rollout.generate not wired in)"
fi

step "done in $((SECONDS - start)) s"
