#!/usr/bin/env bash
# Run the README's CLI tour (and examples/hf_trainer.py) on the inputs of scripts/make_examples.sh, printing
# each command and its output.
# Usage: bash scripts/readme_tour.sh [WORKDIR]   (outputs go to WORKDIR, default runs/tour; E and MINILM from
# runs/examples/env.sh unless already set). Exits non-zero if a command fails that should succeed, or succeeds
# where the tour shows an error.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export HF_HUB_OFFLINE=1 COLUMNS="${COLUMNS:-100}"
[ -n "${E:-}" ] || . "$ROOT/runs/examples/env.sh"
case "$E" in /*) ;; *) E="$ROOT/$E" ;; esac
export E MINILM
PATH="$ROOT/.venv/bin:$PATH"
WORK="${1:-$ROOT/runs/tour}"
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK" || exit 1   # a fresh folder: no output exists yet
[ -e examples ] || ln -s "$ROOT/examples" examples
bad=0
ok() { echo "\$ $*"; eval "$@" || { echo "!! FAILED ($?): $*"; bad=1; }; }
fails() { echo "\$ $*"; if eval "$@"; then echo "!! SHOULD HAVE FAILED: $*"; bad=1; fi; }

ok deltatune info '$E/sst2-sparse/delta' --no-layers
ok deltatune eval '$E/sst2-sparse/delta' --base
ok deltatune predict '$E/sst2-sparse/delta' --data examples/reviews.csv --top-k 2
ok deltatune generate '$E/shakespeare-full/delta' --prompt '"ROMEO:"' --max-new-tokens 20
ok python examples/hf_trainer.py --model '$MINILM' --out hf-sst2
ok deltatune eval hf-sst2/delta --task sst2
ok deltatune apply '$E/sst2-sparse/delta' --out merged --shard-size 50MB
ok deltatune export '$E/sst2-lora/delta' --format peft --out peft-adapter/
ok deltatune merge '$E/ties.yaml' --out merged-ties/ --no-progress
ok deltatune merge '$E/ties.yml' --out merged-llama/ --no-progress
ok deltatune compress '$E/sst2-lora/delta' --method compeft --density 0.1 --scope tensor --calibration-rows 100 --out lora-c/
ok deltatune rebase '$E/sst2-full/delta' --from '$MINILM' --to '$E/minilm-v2' --out sst2-on-v2/
fails deltatune rebase '$E/sst2-full/delta' --from '$E/minilm-v2' --to '$E/minilm-v2' --out x/
rm -rf notes && mkdir notes && echo "my notes" > notes/todo.txt
fails deltatune export '$E/sst2-lora/delta' --out notes
ok deltatune export '$E/sst2-lora/delta' --out adapter
ok deltatune export '$E/sst2-lora/delta' --out adapter
exit $bad
