#!/usr/bin/env bash
# One-command setup: creates .venv and installs everything, in the order that keeps
# torchvision and a CUDA torch out (sam2 is installed without its declared deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_SPEC"
SAM2_BUILD_CUDA=0 python -m pip install -q --no-build-isolation --no-deps sam2==1.1.0
python -m pip install -q hydra-core iopath tqdm
python -m pip install -q -e ".[dev]"
if python -m pip show torchvision >/dev/null 2>&1; then
  echo "error: torchvision is installed in .venv; it is not needed and pulls a CUDA torch" >&2
  exit 1
fi
python -c "import torch, sam2unet; print('sam2unet-assist ready: torch', torch.__version__)"
