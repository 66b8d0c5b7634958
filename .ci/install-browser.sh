#!/usr/bin/env bash
# Installs what the end-to-end browser test (tests/search/test_browser.py) needs: Debian's
# `chromium` and the Python `playwright` package. Idempotent and quiet; skips what is present.
# Never runs `playwright install` (that downloads its own browser build, which cannot work here):
# the test drives /usr/bin/chromium through executable_path.
set -euo pipefail

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
run_quiet() {  # run a command, show its output only when it fails
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        return 1
    fi
}

if ! command -v chromium >/dev/null 2>&1; then
    echo "install-browser: installing chromium (apt)"
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    run_quiet $SUDO apt-get update -qq
    run_quiet $SUDO apt-get install -y -qq chromium fonts-dejavu-core
fi

PY="${PYTHON:-python}"
if ! "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
    echo "install-browser: installing playwright (pip)"
    PIP_ROOT_USER_ACTION=ignore run_quiet "$PY" -m pip install -q --disable-pip-version-check playwright
fi

echo "install-browser: chromium $(chromium --version 2>/dev/null | awk '{print $2}') + playwright ready"
