#!/usr/bin/env bash
# Create .venv and install deltatune with the given extras (default: demo,test).
# torch is pinned to the local CPU build 2.13.0 first, so nothing pulls the multi-GB CUDA wheels.
# On a GPU machine, install the CUDA torch build you want first, then: pip install -e '.[demo]'.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo,test}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
