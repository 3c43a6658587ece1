#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install the project into it.
# torch==2.13.0 goes in first: on this project's machines it is a CPU wheel on local disk,
# while a bare "torch" requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${UNLEARNATK_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet -e ".[test]"
