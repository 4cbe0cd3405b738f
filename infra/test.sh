#!/usr/bin/env bash
# Install (or refresh) .venv and run the default test suite. Extra args go to pytest,
# e.g. `bash infra/test.sh -m slow` for the long suites, or a test path to run just that.
# Each test file runs in its own interpreter: Ray, DeepSpeed and torch keep process-wide state
# (threads, initialised runtimes) that made some files pass alone and fail after others.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/infra/install.sh"
venv="${SD2_VENV:-$here/.venv}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/sd2/torch_extensions}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
cd "$here"
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then exec "$venv/bin/python" -m pytest "$@"; fi
done
passed=0; failed=0; bad_files=()
for file in tests/test_*.py; do
  log="$(mktemp)"
  set +e
  "$venv/bin/python" -m pytest -p no:cacheprovider "$file" "$@" 2>&1 | tee "$log"
  code=${PIPESTATUS[0]}
  set -e
  summary="$(tail -n 1 "$log")"
  rm -f "$log"
  p=$(awk '{for (i = 2; i <= NF; i++) if ($i ~ /^passed/) s += $(i - 1)} END {print s + 0}' <<<"$summary")
  f=$(awk '{for (i = 2; i <= NF; i++) if ($i ~ /^(failed|error)/) s += $(i - 1)} END {print s + 0}' <<<"$summary")
  passed=$((passed + p)); failed=$((failed + ${f:-0}))
  # 5 = nothing collected (every test of the file is in a deselected suite): not a failure.
  if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then bad_files+=("$file"); [ "${f:-0}" -gt 0 ] || failed=$((failed + 1)); fi
done
[ ${#bad_files[@]} -eq 0 ] || echo "failing files: ${bad_files[*]}"
echo "$passed passed, $failed failed"
[ ${#bad_files[@]} -eq 0 ]
