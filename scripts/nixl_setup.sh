#!/usr/bin/env bash
# Build a separate virtualenv with NIXL (nixl 1.5.1, the project's `nixl` extra) and this
# project, for the mocker's real KV transfers (`--kv-transfer nixl`) and their test
# `pytest -m nixl tests/backends/test_mocker_nixl.py`.
#
#   bash scripts/nixl_setup.sh [VENV_DIR]        (default .venv-nixl; ~1.5 GB, ~4 min)
#
# nixl requires torch, and a plain install pulls CUDA torch and ~15 NVIDIA packages. So CPU
# torch (torch==2.13.0) goes in first: on these machines pip finds the local +cpu wheel
# through its find-links; elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
# Then nixl==1.5.1 keeps that torch. It runs without a GPU: UCX backend, host (DRAM) memory.
# Running it again on a ready environment only checks it (a few seconds).
set -euo pipefail

VENV="${1:-.venv-nixl}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NIXL_VERSION="1.5.1"
TORCH_VERSION="2.13.0"

ready() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$NIXL_VERSION" <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
assert md.version("nixl") == sys.argv[1]
assert "+cpu" in md.version("torch"), "a CUDA build of torch"
from nixl._api import nixl_agent, nixl_agent_config  # noqa: F401
import dynamo.backends.mocker.nixl_transfer, aiohttp, openai, pytest  # noqa: F401
EOF
}

# pip warns once per package about find-links/index locations it cannot read: noise, not news
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

start=$(date +%s)
if ready; then
    echo "nixl_setup: $VENV already has nixl $NIXL_VERSION, CPU torch and dynamo"
else
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    PIP=(quiet "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    TORCH_INDEX=()
    [ -n "${TORCH_INDEX_URL:-}" ] && TORCH_INDEX=(--index-url "$TORCH_INDEX_URL")
    "${PIP[@]}" "${TORCH_INDEX[@]}" "torch==$TORCH_VERSION"
    "${PIP[@]}" "nixl==$NIXL_VERSION"
    "${PIP[@]}" -e "$REPO[test,nixl]"
    if ! ready; then
        echo "nixl_setup: the environment in $VENV does not import nixl and dynamo with CPU torch" >&2
        "$VENV/bin/python" -c "import torch; print('torch', torch.__version__); from nixl._api import nixl_agent" >&2 || true
        exit 1
    fi
fi
echo "nixl_setup: ready in $(( $(date +%s) - start ))s: $VENV/bin/python -m pytest -m nixl tests/backends/test_mocker_nixl.py"
