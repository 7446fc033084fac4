#!/usr/bin/env bash
# The main job: install what is missing, then federate the four heart-disease hospitals locally.
# Extra arguments go to `fedmq demo` (e.g. --strategy fedasync --slow switzerland=10 --seed 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --demo
exec "${PYTHON:-python3}" -m fedmq demo "$@"
