#!/usr/bin/env bash
# Installs the pinned dependencies and builds zsq_fast._C in place (CPU kernels always, CUDA kernels when nvcc is
# found; ZSQ_FAST_CUDA=0 skips them). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-test.txt
# PEP 660 editable install without build isolation: builds _C in place against the installed torch.
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation --no-deps --use-pep517 -e .
python -c "import zsq_fast, json; print('zsq_fast backends:', json.dumps(zsq_fast.ops.backend()))"
