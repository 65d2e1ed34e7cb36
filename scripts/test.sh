#!/usr/bin/env bash
# Run leansd's whole test suite from a fresh checkout:
#   1. a development environment (.venv-dev) with PyTorch + diffusers: every test, parity included;
#   2. a runtime-only environment (.venv-runtime) without torch: the runtime tests, proving they need no torch.
# Both environments are created on first use and reused afterwards. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

make_env() {  # make_env DIR PIP_ARGS...
  local dir=$1; shift
  if [ ! -x "$dir/bin/python" ]; then
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --upgrade pip
  fi
  "$dir/bin/python" -m pip install --quiet "$@"
}

# The web page's browser test (tests/server/test_webui.py) drives the system's Chromium through Playwright, which
# downloads nothing; install Debian's chromium when it is missing and we may (root, apt). Without it the test skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing chromium for the web UI browser test =="
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null \
    || echo "could not install chromium: the web UI browser test will be skipped" >&2
fi

echo "== development environment (torch, diffusers: parity with the reference) =="
# torch first and pinned, so pip takes the CPU wheel instead of a multi-GB CUDA build.
make_env .venv-dev torch==2.13.0
"$PWD/.venv-dev/bin/python" -m pip install --quiet -r requirements/dev.txt -e ".[export,onnxruntime,openvino,server,test]"
.venv-dev/bin/python -m pytest -q "$@"

echo "== runtime-only environment (no torch): runtime tests =="
make_env .venv-runtime -e ".[onnxruntime,openvino,server,test]"
if .venv-runtime/bin/python -c "import torch" 2>/dev/null; then
  echo "torch is importable in the runtime-only environment; it must not be" >&2
  exit 1
fi
.venv-runtime/bin/python -m pytest -q tests/runtime tests/cli tests/server "$@"
