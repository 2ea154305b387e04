#!/usr/bin/env bash
# Create (idempotently) a private virtual environment holding mergekit, used only by
# bench/bench_extract.py as the comparison tool.  mergekit is NOT a dependency of
# lora-convert.  The venv lives at bench/.cache/mergekit-venv (git-ignored).
#
# torch is installed first and pinned to the CPU build (torch==2.13.0 resolves to
# the +cpu wheel on this machine), so that resolving mergekit's "torch>=2.0.0"
# never pulls a multi-GB CUDA build.
#
# Usage: bash bench/setup_mergekit.sh [VENV_DIR]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-${MERGEKIT_VENV:-$HERE/.cache/mergekit-venv}}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${MERGEKIT_TORCH_SPEC:-torch==2.13.0}"
MERGEKIT_SPEC="${MERGEKIT_SPEC:-mergekit==0.1.5}"

if [ -x "$VENV/bin/mergekit-extract-lora" ] && "$VENV/bin/python" -c "import mergekit, torch" 2>/dev/null; then
    echo "mergekit venv ready: $VENV"
    "$VENV/bin/python" -c "import importlib.metadata as m, torch; print('mergekit', m.version('mergekit'), '| torch', torch.__version__)"
    exit 0
fi

echo "creating mergekit venv at $VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# CPU torch first: the later resolution then sees torch already satisfied.
"$VENV/bin/python" -m pip install "$TORCH_SPEC"
# Keep torch where it is: a constraint file forbids any other torch version.
CONSTRAINT="$(mktemp)"
trap 'rm -f "$CONSTRAINT"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINT"
"$VENV/bin/python" -m pip install -c "$CONSTRAINT" "$MERGEKIT_SPEC"
"$VENV/bin/python" -c "import importlib.metadata as m, torch; assert torch.__version__.endswith('+cpu') or not torch.cuda.is_available(); print('mergekit', m.version('mergekit'), '| torch', torch.__version__)"
echo "mergekit venv ready: $VENV"
