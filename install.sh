#!/usr/bin/env bash
# Install organics with everything the book and the tests need, into the active Python
# (use a virtual environment of your own if you like). Pins: see pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -e ".[dev]"
