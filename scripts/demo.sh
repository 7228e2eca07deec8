#!/usr/bin/env bash
# The main job on the embedded default: MiniLM fine-tuned on SST-2 with a sparse (SpIEL) delta.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/deltatune ] || bash scripts/setup.sh demo
. .venv/bin/activate
export HF_HUB_OFFLINE=1
deltatune train --method sparse --task sst2 --out runs/sst2-sparse "$@"
deltatune info runs/sst2-sparse/delta --no-layers
