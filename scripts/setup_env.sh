# shellcheck shell=bash
# Sourced by the other scripts: makes sure .venv exists and holds this package (editable) with its test extras.
# After sourcing, REPO_ROOT and VENV_BIN are set and VENV_BIN is first on PATH.
# Plain pip on purpose: uv/poetry would resolve and download gigabytes of CUDA wheels here.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
VENV_BIN="$VENV/bin"
# written after a successful install; pyproject.toml newer than it means the install is stale
_SETUP_STAMP="$VENV/.nnunet_ssl_installed"

_nnunet_ssl_pick_python() {
    if command -v python3.11 >/dev/null 2>&1 && python3.11 -c '' >/dev/null 2>&1; then
        echo python3.11
    elif command -v python3 >/dev/null 2>&1 \
        && python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; then
        echo python3
    else
        return 1
    fi
}

_nnunet_ssl_setup() {
    if [ ! -x "$VENV_BIN/python" ]; then
        local py
        if ! py="$(_nnunet_ssl_pick_python)"; then
            echo "setup_env: need python3.11, or python3 >= 3.10, on PATH" >&2
            return 1
        fi
        echo "setup_env: creating $VENV with $py ($("$py" --version 2>&1))"
        "$py" -m venv "$VENV" || return 1
        rm -f "$_SETUP_STAMP"
    fi
    if [ ! -f "$_SETUP_STAMP" ] || [ "$REPO_ROOT/pyproject.toml" -nt "$_SETUP_STAMP" ]; then
        echo "setup_env: installing nnunet-ssl and its dependencies into $VENV (first run takes a few minutes) ..."
        local log="$VENV/pip-install.log"
        if ! (cd "$REPO_ROOT" && "$VENV_BIN/python" -m pip install --quiet -e '.[test]') >"$log" 2>&1; then
            echo "setup_env: pip install failed; last lines of $log:" >&2
            tail -n 30 "$log" >&2
            return 1
        fi
        touch "$_SETUP_STAMP"
    fi
    case ":$PATH:" in
        *":$VENV_BIN:"*) ;;
        *) export PATH="$VENV_BIN:$PATH" ;;
    esac
}

_nnunet_ssl_setup
