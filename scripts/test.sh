#!/usr/bin/env bash
# The test command: set up (pinned deps + build) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest -q -ra tests "$@"
