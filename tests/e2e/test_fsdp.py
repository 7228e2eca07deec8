"""FSDP (FULL_SHARD, accelerate config ``configs/accelerate/fsdp_cpu.yaml``) trains the same delta as DDP.

Default tier: in one process (a gloo group of one), :func:`deltatune.train.fsdp.wrap` shards the frozen base of
tiny Llama, GPT-2 and BERT models with a LoRA or sparse delta into FSDP units, keeps every trainable tensor whole
and outside the flat parameters, and gives the unwrapped model's outputs and gradients.  Slow tier: two processes
over gloo, ``accelerate launch --config_file configs/accelerate/fsdp_cpu.yaml`` against
``accelerate launch --multi_gpu --num_processes 2`` (DDP), for LoRA and for sparse with SpIEL drop/regrow,
gradient accumulation and checkpoints; the two deltas must agree, and an FSDP run resumed from its checkpoint
must end where the uninterrupted one did.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.train import fsdp
from tests.conftest import TINY_MODELS, tiny_inputs

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "accelerate" / "fsdp_cpu.yaml"
DELTAS = {"lora": lambda: dt.LoRAConfig(r=4, targets=["all-linear"]),
          "sparse": lambda: dt.SparseConfig(num_tunable=777, regrow=False)}


def _plugin(**kw):
    from accelerate.utils import FullyShardedDataParallelPlugin

    args = {"fsdp_version": 1, "reshard_after_forward": "FULL_SHARD", "auto_wrap_policy": "transformer_based_wrap",
            "use_orig_params": True, **kw}
    return FullyShardedDataParallelPlugin(**args)


@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("method", sorted(DELTAS))
def test_wrap_shards_the_base_and_keeps_the_delta_whole(one_rank_group, arch, method):
    model = TINY_MODELS[arch]()
    delta = dt.attach(model, DELTAS[method]())
    with torch.no_grad():  # a non-zero delta, so that a wrong forward shows
        for p in fsdp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    plain = copy.deepcopy(model)
    trainable = {id(p): tuple(p.shape) for p in fsdp.trainable_parameters(model)}

    wrapped = fsdp.wrap(model, _plugin(), torch.device("cpu"))

    info = fsdp.layout(wrapped)
    assert info["units"] >= 3  # each transformer layer (the model's _no_split_modules) and the root
    assert info["base_total"] == sum(p.numel() for p in plain.parameters() if not p.requires_grad)
    assert info["replicated"] == sum(p.numel() for p in fsdp.trainable_parameters(plain))
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    flat = [m._handle.flat_param for m in FSDP.fsdp_modules(wrapped) if m._handle is not None]
    assert not any(f.requires_grad for f in flat)  # only the frozen base is flattened and sharded
    after = fsdp.trainable_parameters(wrapped)  # the same tensors, whole (ignored by FSDP)
    assert {id(p): tuple(p.shape) for p in after} == trainable
    assert all(id(p) in trainable for part in delta.parts.values() for p in part.parameters() if p.requires_grad)

    inputs = tiny_inputs(arch)
    wrapped.eval(), plain.eval()  # no dropout: the two must see the same computation
    out, ref = wrapped(**inputs), plain(**inputs)
    assert torch.allclose(out.logits, ref.logits, atol=1e-6, rtol=0)
    out.loss.backward()
    ref.loss.backward()
    for p, q in zip(fsdp.trainable_parameters(wrapped), fsdp.trainable_parameters(plain), strict=True):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-6, rtol=0)


def test_shard_under_bf16_runs_the_forward_in_autocast_and_keeps_the_delta_fp32(one_rank_group):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        model = TINY_MODELS["llama"]()
        dt.attach(model, DELTAS["lora"]())
        optimizer = torch.optim.AdamW(fsdp.trainable_parameters(model), lr=1e-3)
        wrapped = fsdp.shard(accelerator, model, optimizer)
        out = wrapped(**tiny_inputs("llama"))
        assert out.logits.dtype == torch.bfloat16  # autocast, as accelerator.prepare would set it up
        out.loss.backward()
        optimizer.step()  # through the gradient-averaging pre-hook (a no-op for one rank)
        assert all(p.dtype == torch.float32 and p.grad is not None for p in fsdp.trainable_parameters(wrapped))
    finally:
        AcceleratorState._reset_state()


def test_a_base_tensor_that_starts_training_mid_run_is_refused(one_rank_group):
    model = TINY_MODELS["bert"]()
    dt.attach(model, DELTAS["lora"]())
    wrapped = fsdp.wrap(model, _plugin(), torch.device("cpu"))
    guard = fsdp.ReplicatedGradients(fsdp.trainable_parameters(wrapped), wrapped)
    guard()  # nothing changed
    name, p = next((n, p) for n, p in wrapped.named_parameters() if not p.requires_grad)
    p.requires_grad_(True)  # what a layer-sampling schedule would do
    with pytest.raises(ConfigError, match="started training during an FSDP run"):
        guard()


def test_settings_this_route_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match="fsdp_version"):
        fsdp.check_plugin(_plugin(fsdp_version=2, reshard_after_forward=True))
    with pytest.raises(ConfigError, match="fsdp_offload_params"):
        fsdp.check_plugin(_plugin(cpu_offload=True))
    assert fsdp.check_plugin(_plugin()).fsdp_version == 1


def test_wrap_without_a_process_group_is_a_config_error():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with pytest.raises(ConfigError, match="accelerate launch"):
        fsdp.wrap(TINY_MODELS["bert"](), _plugin(), torch.device("cpu"))


# --- two processes -----------------------------------------------------------------------------------------------
COMMON = ["--set", "train_limit=400", "--set", "eval_limit=32", "--set", "max_length=32", "--set", "batch_size=8",
          "--set", "eval_every=0", "--set", "progress=false"]
RUNS = {
    "lora": ["--method", "lora", "--steps", "6", "--set", "checkpoint_every=0", *COMMON],
    "sparse": ["--method", "sparse", "--steps", "12", "--set", "checkpoint_every=5", "--set", "reselection_steps=6",
               "--set", "accumulation_steps=2", "--set", "grad_accum=2", "--set", "density=0.002", *COMMON],
}


def _launcher() -> str:
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if exe is None:
        pytest.skip("accelerate CLI not found")
    return exe


def _launch(route: str, method: str, out: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    how = ["--config_file", str(CONFIG)] if route == "fsdp" else ["--multi_gpu", "--num_processes", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_FSDP", None)
    cmd = [_launcher(), "launch", *how, "-m", "deltatune.cli", "train", *RUNS[method], "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc.stderr = " ".join(proc.stderr.split())  # rich wraps long lines at the terminal width
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    if torch.cuda.is_available():
        pytest.skip("the CPU comparison; on GPUs the same config runs over NCCL")
    base = tmp_path_factory.mktemp("fsdp-vs-ddp")
    done = {}
    for method in RUNS:
        for route in ("ddp", "fsdp"):
            proc = _launch(route, method, base / f"{route}-{method}")
            done[route, method] = (base / f"{route}-{method}", proc.stderr)
    return done


def _metrics(run: Path) -> dict:
    return json.loads((run / "delta" / "manifest.json").read_text())["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(RUNS))
def test_fsdp_writes_the_ddp_delta(runs, method):
    (ddp, ddp_log), (sharded, fsdp_log) = runs["ddp", method], runs["fsdp", method]
    assert "FSDP FULL_SHARD" in fsdp_log and "FSDP" not in ddp_log
    assert "this rank holds" in fsdp_log  # the base really is split over the two ranks
    a, b = _metrics(ddp), _metrics(sharded)
    assert a["world_size"] == b["world_size"] == 2 and b["rank_digests_equal"] is True
    assert a["steps"] == b["steps"]
    da, db = dt.load_delta(ddp / "delta"), dt.load_delta(sharded / "delta")  # one unsharded delta each
    assert sorted(da.parts) == sorted(db.parts) and sorted(da.heads) == sorted(db.heads)
    for name, part in da.parts.items():
        sa, sb = part.state(), db.parts[name].state()
        for key, t in sa.items():
            if t.dtype.is_floating_point:
                assert torch.allclose(t, sb[key], atol=1e-6, rtol=1e-5), (name, key)
            else:  # sparse indices after drop/regrow: the same support
                assert torch.equal(t, sb[key]), (name, key)
    for name, head in da.heads.items():
        for key, t in head.items():
            assert torch.allclose(t, db.heads[name][key], atol=1e-6, rtol=1e-5), (name, key)
    assert any(float(t.abs().max()) > 0 for p in db.parts.values() for t in p.state().values()
               if t.dtype.is_floating_point)  # it trained
    # on this CPU the two routes agree bit for bit (N = 2: dividing by N then summing is exact)
    assert a["digest"] == b["digest"]


@pytest.mark.slow
def test_fsdp_resume_is_exact(runs, tmp_path):
    done, _ = runs["fsdp", "sparse"]
    resumed = tmp_path / "resumed"
    shutil.copytree(done, resumed)
    shutil.rmtree(resumed / "delta")
    proc = _launch("fsdp", "sparse", resumed, ("--resume",))
    assert "resumed from" in proc.stderr and "at step 10" in proc.stderr
    assert _metrics(resumed)["digest"] == _metrics(done)["digest"]
