"""The README's CLI tour runs from a fresh clone: ``scripts/make_examples.py`` makes its inputs and
``scripts/readme_tour.sh`` runs its commands on them (slow tier: a few minutes on 2 cores).

The README's tour commands that use the example inputs (``$E/…``, ``$MINILM``), that run an example script
(``python examples/…``) or that read what such a script wrote (its ``--out``) must each be a command of
``scripts/readme_tour.sh``, so that the script runs exactly what the README shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOUR = ROOT / "scripts" / "readme_tour.sh"


def _script_commands() -> set[str]:
    out = set()
    for line in TOUR.read_text().splitlines():
        m = re.match(r"^(?:ok|fails) ((?:deltatune|python examples/).*)$", line)
        if m:
            out.add(" ".join(m.group(1).replace("'", "").split()))
    return out


def _readme_commands(text: str | None = None) -> set[str]:
    text = (ROOT / "README.md").read_text() if text is None else text
    lines = [" ".join(line[2:].split("  #")[0].split())
             for block in re.findall(r"```console\n(.*?)```", text, flags=re.S) for line in block.splitlines()
             if line.startswith(("$ deltatune ", "$ python examples/"))]
    scripts = [line for line in lines if line.startswith("python examples/")]
    written = {m.group(1).rstrip("/") for line in scripts for m in [re.search(r"--out (\S+)", line)] if m}
    return {line for line in lines if "$E" in line or "$MINILM" in line or line in scripts
            or any(re.search(rf"(^| ){re.escape(w)}(/|\s|$)", line) for w in written)}


def test_readme_commands_in_the_tour_scope():
    """What the check above collects: the example inputs, the example scripts and what they wrote."""
    readme = """```console
$ deltatune info $E/a/delta
$ deltatune info runs/other/delta
$ python examples/x.py --model $MINILM --out hf-x
$ deltatune eval hf-x/delta --task sst2
$ deltatune eval hf-xy/delta
```"""
    assert _readme_commands(readme) == {"deltatune info $E/a/delta", "python examples/x.py --model $MINILM --out hf-x",
                                        "deltatune eval hf-x/delta --task sst2"}


def test_the_tour_script_runs_every_example_command_of_the_readme():
    """Vacuous until the README shows the tour on the example inputs; then every such command must be in the
    script, character for character (quotes and spacing aside)."""
    missing = _readme_commands() - _script_commands()
    assert not missing, f"README tour commands that scripts/readme_tour.sh does not run: {sorted(missing)}"
    assert len(_script_commands()) >= 15


@pytest.mark.slow
def test_examples_then_tour_run_from_scratch(tmp_path, data_dir, minilm_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    examples = tmp_path / "examples"
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_examples.py"), "--out", str(examples)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    for need in ("sst2-sparse/delta", "sst2-lora/delta", "sst2-full/delta", "mrpc-full/delta", "minilm-v2",
                 "llama-base", "llama-base/tokenizer.json", "shakespeare-full/delta", "ties.yaml", "ties.yml",
                 "env.sh"):
        assert (examples / need).exists(), need
    assert f"export MINILM={minilm_path}" in (examples / "env.sh").read_text()

    tour = subprocess.run(["bash", str(TOUR), str(tmp_path / "tour")], cwd=ROOT, capture_output=True, text=True,
                          env=dict(env, E=str(examples), MINILM=minilm_path, COLUMNS="100"), timeout=1800)
    said = tour.stdout + tour.stderr
    assert tour.returncode == 0, said[-4000:]
    for expected in ("ties (paper) of 2 inputs", "ties (mergekit) of 3 inputs", "error (FingerprintMismatch)",
                     "error (OutputExists)", "wrote", '"label"', "'train_loss'"):
        assert expected in said, expected
    assert "!!" not in said
    work = tmp_path / "tour"
    assert re.search(r"sparse delta, [\d,]+ values \+ a 770-value head, written to hf-sst2/delta", said)

    def output_of(command: str) -> str:
        return said.split(f"$ {command}\n", 1)[1].split("\n$ ", 1)[0]

    assert output_of('deltatune generate $E/shakespeare-full/delta --prompt "ROMEO:" --max-new-tokens 20').strip()
    assert re.search(r"│ delta\s+│ 0\.\d+", output_of("deltatune eval hf-sst2/delta --task sst2"))
    for out in ("merged/config.json", "hf-sst2/delta/manifest.json", "peft-adapter/adapter_config.json",
                "merged-ties/manifest.json", "merged-llama/config.json", "lora-c", "sst2-on-v2/manifest.json",
                "adapter"):
        assert (work / out).exists(), out
    assert not (work / "x").exists()  # the refused rebase wrote nothing
