#!/usr/bin/env bash
# Lint and tests: bash scripts/test.sh [pytest options, e.g. -m "not slow"]
set -uo pipefail
# shellcheck source=scripts/setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" || exit 1
cd "$REPO_ROOT" || exit 1

"$VENV_BIN/ruff" check .
ruff_status=$?
# any non-zero pytest status fails, including 5 ("no tests collected"): an empty run must not pass
"$VENV_BIN/pytest" -q "$@"
pytest_status=$?

if [ "$ruff_status" -ne 0 ]; then
    echo "test.sh: ruff check failed (exit $ruff_status)" >&2
fi
if [ "$pytest_status" -ne 0 ]; then
    echo "test.sh: pytest failed (exit $pytest_status)" >&2
fi
if [ "$ruff_status" -ne 0 ] || [ "$pytest_status" -ne 0 ]; then
    exit 1
fi
