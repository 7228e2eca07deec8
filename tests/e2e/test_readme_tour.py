"""The README's CLI tour runs from a fresh clone: ``scripts/make_examples.py`` makes its inputs and
``scripts/readme_tour.sh`` runs its commands on them (slow tier: a few minutes on 2 cores).

The README's tour commands that use the example inputs (``$E/…``, ``$MINILM``) must each be a command of
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
        m = re.match(r"^(?:ok|fails) (deltatune .*)$", line)
        if m:
            out.add(" ".join(m.group(1).replace("'", "").split()))
    return out


def _readme_commands() -> set[str]:
    text = (ROOT / "README.md").read_text()
    out = set()
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ deltatune ") and ("$E" in line or "$MINILM" in line):
                out.add(" ".join(line[2:].split("  #")[0].split()))
    return out


def test_the_tour_script_runs_every_example_command_of_the_readme():
    """Vacuous until the README shows the tour on the example inputs; then every such command must be in the
    script, character for character (quotes and spacing aside)."""
    missing = _readme_commands() - _script_commands()
    assert not missing, f"README tour commands that scripts/readme_tour.sh does not run: {sorted(missing)}"
    assert len(_script_commands()) >= 12


@pytest.mark.slow
def test_examples_then_tour_run_from_scratch(tmp_path, data_dir, minilm_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    examples = tmp_path / "examples"
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_examples.py"), "--out", str(examples)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    for need in ("sst2-sparse/delta", "sst2-lora/delta", "sst2-full/delta", "mrpc-full/delta", "minilm-v2",
                 "llama-base", "ties.yaml", "ties.yml", "env.sh"):
        assert (examples / need).exists(), need
    assert f"export MINILM={minilm_path}" in (examples / "env.sh").read_text()

    tour = subprocess.run(["bash", str(TOUR), str(tmp_path / "tour")], cwd=ROOT, capture_output=True, text=True,
                          env=dict(env, E=str(examples), MINILM=minilm_path, COLUMNS="100"), timeout=1800)
    said = tour.stdout + tour.stderr
    assert tour.returncode == 0, said[-4000:]
    for expected in ("ties (paper) of 2 inputs", "ties (mergekit) of 3 inputs", "error (FingerprintMismatch)",
                     "error (OutputExists)", "wrote", '"label"'):
        assert expected in said, expected
    assert "!!" not in said
    work = tmp_path / "tour"
    for out in ("merged/config.json", "peft-adapter/adapter_config.json", "merged-ties/manifest.json",
                "merged-llama/config.json", "lora-c", "sst2-on-v2/manifest.json", "adapter"):
        assert (work / out).exists(), out
    assert not (work / "x").exists()  # the refused rebase wrote nothing
