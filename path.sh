# Source me (ESPnet style): activates the project environment.
# shellcheck shell=bash
HDMOLE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export HDMOLE_ROOT
if [ ! -x "${HDMOLE_ROOT}/.venv/bin/python" ] && [ -z "${HDMOLE_VENV:-}" ]; then
    echo "path.sh: no environment yet; run tools/setup_env.sh (run.sh does it for you)" >&2
fi
# shellcheck disable=SC1091
[ -f "${HDMOLE_VENV:-${HDMOLE_ROOT}/.venv}/bin/activate" ] && . "${HDMOLE_VENV:-${HDMOLE_ROOT}/.venv}/bin/activate"
export PYTHONPATH="${HDMOLE_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export LC_ALL=C.UTF-8
export PYTHONIOENCODING=UTF-8
# Real checkpoints are local directories; never reach for a hub.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1
# OpenMP/MKL threads: every core unless the caller set OMP_NUM_THREADS (torch's data-loader
# workers run one thread each anyway); train.num_threads > 0 sets a run's torch threads.
nproc_="$(nproc 2>/dev/null || echo 2)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${nproc_}}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-${OMP_NUM_THREADS}}"
export TOKENIZERS_PARALLELISM=false
unset nproc_
