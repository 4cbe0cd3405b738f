#!/usr/bin/env bash
# Install (or refresh) .venv, run the static checks, then the default suite in one pytest process.
# Extra args go
# to pytest, e.g. `bash infra/test.sh -m slow` for the long suites, or a test path to run just that.
# The closing line is "N passed, N failed, N skipped" (printed by tests/conftest.py).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# With no arguments (the README's command, CI): the static checks first (infra/check.sh
# installs too). With arguments (a path, -m slow, -k …): just install and run those tests.
if [ "$#" -eq 0 ]; then bash "$here/infra/check.sh"; else bash "$here/infra/install.sh"; fi
venv="${SD2_VENV:-$here/.venv}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
cd "$here"
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
