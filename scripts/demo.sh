#!/usr/bin/env bash
# The main job on a fresh machine: set up, then the offline demo (CPU, no network, no ../shared needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
zsq-fast demo "$@"
