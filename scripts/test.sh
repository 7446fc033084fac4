#!/usr/bin/env bash
# The test command (CI runs exactly this): install what is missing, then lint, type-check and test.
# Unit tests need no broker; integration tests start their own RabbitMQ node (and Prometheus) on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
python=${PYTHON:-python3}
"$python" -m ruff check .
"$python" -m ruff format --check .
"$python" -m mypy
"$python" -m pytest -q "$@"
