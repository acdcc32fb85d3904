#!/usr/bin/env bash
# The test suite (CPU; GPU-only tests are marked `gpu` and skipped without CUDA).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
tools/setup_env.sh
. ./path.sh
exec python -m pytest -q "$@" tests
