#!/usr/bin/env bash
# Installs what the end-to-end browser test (tests/search/test_browser.py) needs: Debian's
# `chromium` and the Python `playwright` package. Idempotent and quiet; skips what is present.
# Never runs `playwright install` (that downloads its own browser build, which cannot work here):
# the test drives /usr/bin/chromium through executable_path.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
    echo "install-browser: installing chromium (apt)"
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

PY="${PYTHON:-python}"
if ! "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
    echo "install-browser: installing playwright (pip)"
    "$PY" -m pip install -q --disable-pip-version-check playwright
fi

echo "install-browser: chromium $(chromium --version 2>/dev/null | awk '{print $2}') + playwright ready"
