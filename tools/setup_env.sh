#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv (idempotent).
# Everything is resolved in ONE pip command, `pip install -e .[test]`: hdmole (editable) with
# its install requirements (requirements.txt, torch pinned, so pip takes the CPU wheel and
# never a multi-GB CUDA build) and the test tools (setup.py's "test" extra). Re-running with
# unchanged requirements.txt, setup.py and this script is a no-op.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HDMOLE_VENV:-${root}/.venv}"
python="${PYTHON:-python3}"
stamp="${venv}/.hdmole-requirements.sha256"
want="$(cat "${root}/requirements.txt" "${root}/setup.py" "${root}/tools/setup_env.sh" | sha256sum | cut -d' ' -f1)"

if [ -f "${stamp}" ] && [ "$(cat "${stamp}")" = "${want}" ] && [ -x "${venv}/bin/python" ]; then
    echo "[setup_env] ${venv} is up to date"
    exit 0
fi
echo "[setup_env] creating/updating ${venv} (about 1 minute, 1.5 GB)"
[ -x "${venv}/bin/python" ] || "${python}" -m venv "${venv}"
"${venv}/bin/python" -m pip install -q --upgrade pip
# setuptools builds the editable install in the venv itself (no build isolation): 70.1 or
# newer has bdist_wheel built in (Python 3.11's venv ships 65 without `wheel`; 3.12's none).
"${venv}/bin/python" -m pip install -q "setuptools>=70.1"
"${venv}/bin/python" -m pip install -q --no-build-isolation -e "${root}[test]"
"${venv}/bin/python" -m pip check
echo "${want}" > "${stamp}"
echo "[setup_env] done"
