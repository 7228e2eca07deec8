#!/usr/bin/env bash
# Make the inputs of the README's CLI tour (runs/examples/…, $MINILM, minilm-v2/) (four short MiniLM runs, a few CPU-minutes).
# Usage: bash scripts/make_examples.sh [--out DIR] [--overwrite]; then: source runs/examples/env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/deltatune ] || bash scripts/setup.sh demo
export HF_HUB_OFFLINE=1
.venv/bin/python scripts/make_examples.py "$@"
