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
# Chromium from the distribution's packages for the browser test (tests/system/test_browser_day0.py,
# driven by Playwright with executable_path; Playwright's own browser download is not used)
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
else
  echo "note: no Chromium and no way to install it here (needs root and apt-get):" \
    "the browser test will be skipped; install the 'chromium' package or set SAM2UNET_CHROMIUM" >&2
fi
python -c "import torch, sam2unet; print('sam2unet-assist ready: torch', torch.__version__)"
