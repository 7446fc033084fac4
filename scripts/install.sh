#!/usr/bin/env bash
# Installs what fedmq needs on a fresh Debian/Ubuntu machine, skipping whatever is already there.
#   bash scripts/install.sh          runtime: rabbitmq-server, CPU torch 2.13.0, the fedmq package
#   bash scripts/install.sh --demo   also matplotlib (the plots extra), for the demo's accuracy plot
#   bash scripts/install.sh --test   also prometheus/promtool, docker-compose, the test tools and the plots extra
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
with_plots=0
[ "${1:-}" = "--test" ] && with_tests=1 && with_plots=1
[ "${1:-}" = "--demo" ] && with_plots=1
python=${PYTHON:-python3}
sudo=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo"

apt_packages=()
[ -x /usr/sbin/rabbitmq-server ] || command -v rabbitmq-server >/dev/null || apt_packages+=(rabbitmq-server)
if [ "$with_tests" = 1 ]; then
    command -v promtool >/dev/null || apt_packages+=(prometheus)
    command -v docker-compose >/dev/null || apt_packages+=(docker-compose)
fi
if [ "${#apt_packages[@]}" -gt 0 ]; then
    echo "installing ${apt_packages[*]} (apt-get)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi
# The Debian package may start a default node on 5672; fedmq runs its own nodes on other ports and names.

# CPU torch first and pinned: an unpinned torch would pull several GB of CUDA packages.
if ! "$python" -c "import torch" 2>/dev/null; then
    "$python" -m pip install -q torch==2.13.0 || "$python" -m pip install -q torch==2.13.0 \
        --index-url https://download.pytorch.org/whl/cpu
fi
extras=()
[ "$with_tests" = 1 ] && extras+=(test)
[ "$with_plots" = 1 ] && extras+=(plots)
if [ "${#extras[@]}" -gt 0 ]; then
    "$python" -m pip install -q -e ".[$(IFS=,; echo "${extras[*]}")]"
else
    "$python" -m pip install -q -e .
fi
