#!/usr/bin/env bash
# Static checks, failing at the first that fails: ruff lint, ruff format check, mypy over
# sd2_ray (settings in pyproject.toml). Installs (or refreshes) .venv first, as infra/test.sh does;
# the tools come with the [dev] extra.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/infra/install.sh"
venv="${SD2_VENV:-$here/.venv}"
py="$venv/bin/python"
cd "$here"
step() {
  local name="$1"
  shift
  echo "sd2 check: $name"
  "$@" || { echo "sd2 check: $name FAILED" >&2; exit 1; }
}
step "ruff check" "$py" -m ruff check --quiet .
step "ruff format --check" "$py" -m ruff format --check --quiet .
step "mypy" "$py" -m mypy --no-error-summary
echo "sd2 check: all passed"
