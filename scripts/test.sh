#!/usr/bin/env bash
# The test command: the wheel check, lint (ruff, and the import layers of
# pyproject.toml's [tool.importlinter]), then the whole suite (unit + real-engine
# integration).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${SYMRAM_VENV:-.venv}"
bash scripts/wheel_check.sh || exit 1
"$VENV/bin/ruff" check symram_vllm tests loadtest || exit 1
"$VENV/bin/lint-imports" --no-cache || exit 1
"$VENV/bin/python" -m pytest -q --timeout=900 --durations=25 "$@"
rc=$?
# pytest exits 5 when it collected no tests: that is a broken suite, say so.
if [ "$rc" = 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
