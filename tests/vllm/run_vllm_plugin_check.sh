#!/usr/bin/env bash
# make test-vllm: installs vLLM into its own virtual environment (a CUDA build of torch comes with it:
# several GB, so this is kept out of CI), installs this package beside it, and checks through vLLM's
# own plugin loader that vLLM then hands out vllm_sleep_ext's allocator.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.33.0}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "vllm==$VLLM_VERSION" pybind11 setuptools wheel
"$VENV/bin/pip" install -q --no-build-isolation --no-deps .
cd /tmp  # import the installed package, not the source tree
"$OLDPWD/$VENV/bin/python" "$OLDPWD/tests/vllm/check_plugin.py"
