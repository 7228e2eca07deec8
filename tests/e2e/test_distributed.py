"""``accelerate launch`` with two CPU processes (DDP over gloo) trains and writes one delta.

Every rank hashes its final delta; training fails unless all hashes agree, and the manifest records
``world_size`` and ``rank_digests_equal``.  The two launch routes must also agree with each other.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.dist

TRAIN = ["-m", "deltatune.cli", "train", "--method", "sparse", "--steps", "12",
         "--set", "train_limit=400", "--set", "eval_limit=32", "--set", "max_length=32", "--set", "batch_size=8",
         "--set", "eval_every=0", "--set", "checkpoint_every=5", "--set", "reselection_steps=6",
         "--set", "accumulation_steps=2", "--set", "progress=false", "--set", "density=0.002"]


def _accelerate() -> list[str]:
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if exe is None:
        pytest.skip("accelerate CLI not found")
    return [exe, "launch"]


def _run(cmd: list[str], out) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + TRAIN + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "delta" / "manifest.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def torchrun_metrics(tmp_path_factory, data_dir):
    if torch.cuda.is_available():
        pytest.skip("the --multi_gpu route would use the GPUs here")
    out = tmp_path_factory.mktemp("ddp-torchrun")
    return _run(_accelerate() + ["--multi_gpu", "--num_processes", "2"], out)


def test_two_processes_train_one_delta_all_ranks_agree(torchrun_metrics):
    assert torchrun_metrics["world_size"] == 2
    assert torchrun_metrics["rank_digests_equal"] is True
    assert torchrun_metrics["steps"] == 12


def test_accelerate_cpu_launcher_matches(tmp_path, torchrun_metrics):
    """The literal ``accelerate launch --num_processes 2 --cpu`` route (needs OpenMPI's mpirun)."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (apt-get install openmpi-bin)")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    metrics = _run(_accelerate() + ["--num_processes", "2", "--cpu", "--mpirun_hostfile", str(hostfile)],
                   tmp_path / "out")
    assert metrics["world_size"] == 2 and metrics["rank_digests_equal"] is True
    assert metrics["digest"] == torchrun_metrics["digest"]
