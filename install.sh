#!/usr/bin/env bash
# Install organics with everything the book and the tests need, into the active Python
# (use a virtual environment of your own if you like). Pins: see pyproject.toml.
#
# tests/test_book.py opens the built book in headless Chromium driven by chromedriver: on Debian
# they are the packages `chromium` and `chromium-driver` (Playwright's own browser download needs
# a network the CI does not have). They are installed with apt-get, as root or through sudo,
# unless /usr/bin/chromium and /usr/bin/chromedriver are already there.
set -euo pipefail
cd "$(dirname "$0")"

install_chromium() {
    if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
        return 0
    fi
    local as_root=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            as_root=(sudo)
        else
            echo "install.sh: cannot install chromium and chromium-driver: not root and no sudo." >&2
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install.sh: cannot install chromium and chromium-driver: apt-get not found (not Debian?)." >&2
        return 1
    fi
    "${as_root[@]}" apt-get update -q &&
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends chromium chromium-driver
}

if ! install_chromium; then
    echo "install.sh: WARNING: without /usr/bin/chromium and /usr/bin/chromedriver the browser checks" \
        "of the book (tests/test_book.py) fail; install Debian's chromium and chromium-driver." >&2
fi

python -m pip install -e ".[dev]"
