#!/usr/bin/env bash
# The habits CI holds the tree to, before the tests: ruff's lint rules and formatting, and mypy on the package
# (settings in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m mypy
