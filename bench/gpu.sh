#!/usr/bin/env bash
# One pass of the serving and round benchmarks on a lent GPU machine (CUDA, bf16 serving,
# bf16-autocast training), with their reference loops on the same GPU. Run from the repo
# root:  bash bench/gpu.sh   (results in $OUT, default ./data/gpu-out: gpu.log, serve.json,
# round.json, serve-server.log). Ends within ~$GPU_BUDGET_S s (default 400; keep it >= 360:
# each step keeps a reserve for the ones after it).
#
# That machine has no network and its python3 (3.12, /opt/torch/.venv) holds torch 2.11
# (cu130), transformers 5.17.0, tokenizers 0.23.2, huggingface_hub 1.33.0, accelerate,
# safetensors, numpy, httpx, anyio, h11, click, uvloop, ... but not the service's web/DB
# stack. That travels as wheels in .whl (`carry: [".whl"]`; cp312 manylinux x86_64 or
# py3), the same versions as .venv here, installed with --no-deps into /tmp/site:
#   alembic 1.20.1, amqp 5.4.2, annotated-types 0.8.0, billiard 4.3.2, celery 5.7.0,
#   click-didyoumean 0.3.1, click-plugins 1.1.1.2, click-repl 0.4.1, fastapi 0.165.0,
#   httptools 0.9.0, kombu 5.7.0, mako 1.4.3, opentelemetry-api 1.45.2,
#   prompt-toolkit 3.0.53, pydantic 2.14.4, pydantic-core 2.50.5, pydantic-settings 2.16.3,
#   python-dotenv 1.2.4, sqlalchemy 2.1.9, starlette 1.10.0, typing-extensions 4.16.0
#   (pydantic needs >= 4.16; shadows the machine's), typing-inspection 0.4.5,
#   tzlocal 5.4.5, uvicorn 0.54.0, vine 5.1.0, wcwidth 0.9.4.
# transformers/tokenizers/huggingface_hub are the machine's own (5.17.0 / 0.23.2 / 1.33.0:
# tests/engine, tests/modeling and the app generate/stream tests pass with them here).
# bench/gpu_wheels.sh downloads exactly these into .whl and checks their Requires-Dist.
#
# The model is SmolLM2-135M's exact architecture with seeded random weights, built on the
# machine by bench/gpu_model.py (the real weights cannot travel); cost per token is the same.
#
# SELFLM_GPU_SCRIPT_DRYRUN=1: the same steps with this checkout's .venv python (or
# $PYTHON), on the CPU, tiny sizes and no wheel install — to test the script without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/data/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu.log
DRY=${SELFLM_GPU_SCRIPT_DRYRUN:-0}
# 400 s on the GPU; a dry run on a busy 2-core CPU needs more.
BUDGET=${GPU_BUDGET_S:-$([ "$DRY" = 1 ] && echo 900 || echo 400)}
T0=$(date +%s)

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false
unset SELFLM_REDIS_URL SELFLM_API_KEYS SELFLM_BROKER_URL SELFLM_RECORD_PROMPTS

MODEL=$ROOT/data/gpu-model
STORE=$ROOT/data/gpu-ck
WORK=$ROOT/data/gpu-work

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  DEVICE=cpu
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  SERVE_ARGS=(--concurrency "1,2" --requests 2 --prompts 4 --max-new-tokens 4 --ref-prompts 2
    --warmup 1 --server-env SELFLM_MAX_BATCH_SIZE=4)
  ROUND_ARGS=(--samples 4 --samples-per-prompt 2 --generate-batch-size 2 --max-new-tokens 4
    --ref-samples 2 --texts 4 --batch-size 2 --train-warmup 1)
else
  PY=python3
  DEVICE=cuda
  export PYTHONPATH=/tmp/site:$ROOT
  # 64 greedy tokens; server batches of up to 64 rows (C=32 is never capped by it).
  SERVE_ARGS=(--concurrency "${SERVE_CONCURRENCY:-1,8,32}" --prompts 32 --max-new-tokens 64
    --ref-prompts 8 --warmup 4 --server-env "SELFLM_MAX_BATCH_SIZE=${SERVE_MAX_BATCH:-64}")
  # 256 samples (64 prompts × 4, 48 tokens) in batches of 64; the batch-1 sampling reference
  # on the first 32 of them; 512 training texts (samples, then corpus passages) in batches
  # of 16, 2 untimed warm-up steps before each timed training run.
  ROUND_ARGS=(--samples 256 --samples-per-prompt 4 --generate-batch-size 64
    --max-new-tokens 48 --ref-samples 32 --texts 512 --batch-size 16 --train-warmup 2)
  # GPU_ROUND_ARGS="..." replaces these (a shorter second pass, say).
  if [ -n "${GPU_ROUND_ARGS:-}" ]; then read -r -a ROUND_ARGS <<<"$GPU_ROUND_ARGS"; fi
fi

left() { echo $((BUDGET - ($(date +%s) - T0))); }
# run NAME CAP_S RESERVE_S CMD...: CMD under `timeout` (its whole process group, the server
# it starts included), capped at CAP_S and at what the budget leaves after RESERVE_S.
run() {
  local name=$1 cap=$2 reserve=$3 limit rc
  shift 3
  limit=$(($(left) - reserve))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped (budget spent)"
    return 124
  fi
  echo "=== $name (limit ${limit}s, t=$(($(date +%s) - T0))s): $*"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after t=$(($(date +%s) - T0))s"
  return $rc
}

main() {
  echo "=== bench/gpu.sh $(date -u +%FT%TZ) dry=$DRY device=$DEVICE budget=${BUDGET}s out=$OUT"
  git log -1 --format='commit %H %s' 2>/dev/null || true
  git status --short 2>/dev/null | head -20 || true
  if [ "$DRY" != 1 ]; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl: carry .whl"; return 2; }
    run wheels 90 300 "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  run versions 60 300 "$PY" - <<'EOF'
import platform, sys
import torch, transformers, tokenizers, huggingface_hub, fastapi, pydantic, sqlalchemy, uvicorn
print("python", platform.python_version(), sys.executable)
for m in (torch, transformers, tokenizers, huggingface_hub, fastapi, pydantic, sqlalchemy, uvicorn):
    print(f"{m.__name__} {m.__version__}  ({m.__file__})")
print("cuda available:", torch.cuda.is_available(), "| torch cuda", torch.version.cuda)
if torch.cuda.is_available():
    from core.modeling.device import pick_device, pick_dtype
    d = pick_device("auto")
    print("device", torch.cuda.get_device_name(0), "| SELFLM_DTYPE=auto ->", pick_dtype("auto", d))
EOF
  rm -rf "$MODEL" "$STORE" "$WORK"
  run model 120 240 "$PY" -m bench.gpu_model --out "$MODEL" || return 3
  # The CUDA path of nucleus sampling (skipped without a GPU).
  run cuda-sampling-test 60 230 "$PY" -m pytest -q -p no:cacheprovider \
    tests/engine/test_sampling.py -k cuda -rs

  local common=(--model "$MODEL" --checkpoint-dir "$STORE" --device "$DEVICE")
  run serve 170 150 "$PY" -m bench.serve "${common[@]}" "${SERVE_ARGS[@]}" \
    --server-env "SELFLM_DEVICE=$DEVICE" --server-env SELFLM_DTYPE=auto \
    --workdir "$WORK/serve" --out "$OUT/serve.json"
  local serve_rc=$?
  cat "$WORK"/serve/server-*.log >"$OUT/serve-server.log" 2>/dev/null || true
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
  run round 200 5 "$PY" -m bench.round "${common[@]}" "${ROUND_ARGS[@]}" \
    --workdir "$WORK/round" --out "$OUT/round.json"
  local round_rc=$?

  echo
  echo "=== results (serve exit $serve_rc, round exit $round_rc, $(($(date +%s) - T0))s in all)"
  # The benchmarks' tables again (from a copy: this output is appended to the log itself).
  mkdir -p "$WORK" && cp "$LOG" "$WORK/gpu.log.copy" &&
    awk '/^### /{p=1; print ""} p&&/^(###|\||$)/{print; next} {p=0}' "$WORK/gpu.log.copy"
  [ "$serve_rc" = 0 ] && [ "$round_rc" = 0 ]
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
