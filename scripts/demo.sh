#!/usr/bin/env bash
# The end-to-end CPU demo: bash scripts/demo.sh [nnUNetv2_ssl_demo options, e.g. --workdir DIR]
set -euo pipefail
# shellcheck source=scripts/setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec "$VENV_BIN/nnUNetv2_ssl_demo" "$@"
