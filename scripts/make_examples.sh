#!/usr/bin/env bash
# Make the inputs of the README's CLI tour (runs/examples/…, $MINILM, minilm-v2/, a Tiny Shakespeare causal-LM delta)
# (four short MiniLM runs and one tiny Llama run: about a CPU-minute).
# Usage: bash scripts/make_examples.sh [--out DIR] [--overwrite]; then: source runs/examples/env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/deltatune ] || bash scripts/setup.sh demo
export HF_HUB_OFFLINE=1
.venv/bin/python scripts/make_examples.py "$@"
