"""The accelerate configs in ``configs/accelerate`` parse with accelerate's own loader and say what they claim.

``fsdp_cpu.yaml`` runs (tests/e2e/test_fsdp.py).  ``zero2.yaml`` needs GPUs and DeepSpeed: here it is parsed,
its DeepSpeed file is loaded through accelerate's ``DeepSpeedPlugin``, and deltatune's checks
(:mod:`deltatune.train.zero`) are exercised; the real two-GPU run is the last test, skipped without both.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from deltatune.errors import ConfigError
from deltatune.train.zero import check_deepspeed

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"


def test_fsdp_config_is_full_shard_fsdp1_with_orig_params():
    cfg = load_config_from_file(str(CONFIGS / "fsdp_cpu.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.num_processes == 2 and not cfg.use_cpu
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_version"] == 1 and fsdp["fsdp_reshard_after_forward"] == "FULL_SHARD"
    assert fsdp["fsdp_use_orig_params"] is True and fsdp["fsdp_offload_params"] is False
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def _zero2() -> tuple[object, dict]:
    cfg = load_config_from_file(str(CONFIGS / "zero2.yaml"))
    ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
    return cfg, json.loads(ds_file.read_text())


def test_zero2_config_parses_and_names_stage_2():
    cfg, ds = _zero2()
    assert cfg.distributed_type == DistributedType.DEEPSPEED and not cfg.use_cpu
    assert cfg.deepspeed_config["zero3_init_flag"] is False
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert "optimizer" not in ds and "scheduler" not in ds  # deltatune's own optimizer and LR schedule
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.0
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_zero2_file_loads_through_accelerates_deepspeed_plugin():
    from accelerate.utils import DeepSpeedPlugin

    _, ds = _zero2()
    plugin = DeepSpeedPlugin(hf_ds_config=copy.deepcopy(ds))  # accelerate's own reading of a DeepSpeed file
    assert plugin.zero_stage == 2 and plugin.gradient_accumulation_steps == 1
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2


def test_deltatune_fills_and_checks_the_deepspeed_config():
    _, ds = _zero2()
    out = check_deepspeed(copy.deepcopy(ds), grad_accum=1, hooks=[], batch_size=16)
    assert out["train_micro_batch_size_per_gpu"] == 16 and out["gradient_clipping"] == 0.0
    with pytest.raises(ConfigError, match="grad_accum"):
        check_deepspeed(copy.deepcopy(ds), grad_accum=4, hooks=[], batch_size=16)
    with pytest.raises(ConfigError, match="regrow=false"):
        check_deepspeed(copy.deepcopy(ds), grad_accum=1, hooks=[object()], batch_size=16)

    class PaddingMask:  # a hook that leaves the delta alone (MixLoRA's padding mask) passes
        pass

    check_deepspeed(copy.deepcopy(ds), grad_accum=1, hooks=[PaddingMask()], batch_size=16)
    stage3 = copy.deepcopy(ds)
    stage3["zero_optimization"]["stage"] = 3
    with pytest.raises(ConfigError, match="stage"):
        check_deepspeed(stage3, grad_accum=1, hooks=[], batch_size=16)
    half = copy.deepcopy(ds)
    half["bf16"]["enabled"] = True
    with pytest.raises(ConfigError, match="bf16"):
        check_deepspeed(half, grad_accum=1, hooks=[], batch_size=16)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(torch.cuda.device_count() < 2 or importlib.util.find_spec("deepspeed") is None,
                    reason="ZeRO-2 needs two GPUs and deepspeed (not available on this machine)")
def test_zero2_trains_a_lora_delta_on_two_gpus(tmp_path):  # pragma: no cover - GPU machines only
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    cmd = [exe, "launch", "--config_file", str(CONFIGS / "zero2.yaml"), "-m", "deltatune.cli", "train",
           "--method", "lora", "--steps", "6", "--out", str(tmp_path / "run"), "--set", "train_limit=200",
           "--set", "eval_limit=32", "--set", "max_length=32", "--set", "batch_size=8", "--set", "eval_every=0",
           "--set", "checkpoint_every=0", "--set", "progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "delta" / "manifest.json").read_text())["metrics"]
    assert metrics["world_size"] == 2 and metrics["rank_digests_equal"] is True
