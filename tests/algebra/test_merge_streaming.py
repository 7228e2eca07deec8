"""The streamed checkpoint path (reused workspace buffers, in-place kernels) gives the same bytes as fresh tensors."""

from __future__ import annotations

import pytest
import torch
from merge_fixtures import checkpoints, save_finetune  # noqa: F401  (fixture)

from deltatune.algebra import engine, merge
from deltatune.algebra.checkpoint import CheckpointReader
from deltatune.algebra.methods import TensorJob
from deltatune.algebra.stats import lines_norms
from deltatune.algebra.workspace import Workspace
from deltatune.commands.process import keep_freed_memory
from deltatune.errors import DeltaFormatError

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    ("ties", "mergekit", {"density": 0.3}, None),
    ("ties", "paper", {"density": 0.3}, None),
    ("dare_ties", "mergekit", {"density": 0.4}, None),
    ("dare_linear", "paper", {"density": 0.4}, None),
    ("task_arithmetic", "mergekit", {}, {"alpha": "auto", "beta": 0.5}),
    ("linear", "mergekit", {}, None),
    ("breadcrumbs_ties", "paper", {"density": 0.5}, None),
    ("della", "paper", {"density": 0.5}, None),
]


def _same_checkpoints(a, b) -> None:
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert ra.names() == rb.names()
    for key in ra.names():
        assert torch.equal(ra.get(key), rb.get(key)), key


@pytest.mark.parametrize(("method", "preset", "params", "lines"), CASES)
def test_workspace_path_writes_the_same_checkpoint(checkpoints, tmp_path, monkeypatch,  # noqa: F811
                                                   method, preset, params, lines) -> None:
    ins = [checkpoints[f"ft{i}"] for i in range(3)]
    kw = dict(base=checkpoints["base"], params=params, preset=preset, output="checkpoint", seed=3, lines=lines,
              weights=[1.0, 0.7, 1.3])
    streamed = merge(ins, method, out=tmp_path / "ws", **kw)
    monkeypatch.setattr(engine, "Workspace", lambda: None)  # every tensor allocated afresh, as before
    fresh = merge(ins, method, out=tmp_path / "fresh", **kw)
    _same_checkpoints(streamed, fresh)


def test_workspace_path_handles_vocabulary_extension(checkpoints, tmp_path, monkeypatch) -> None:  # noqa: F811
    from transformers import LlamaForCausalLM

    grown = save_finetune(LlamaForCausalLM.from_pretrained(checkpoints["base"]), tmp_path / "grown", 7, vocab=70)
    kw = dict(base=checkpoints["base"], params={"density": 0.5}, preset="mergekit", output="checkpoint",
              vocab="extend")
    streamed = merge([checkpoints["ft0"], grown], "ties", out=tmp_path / "ws", **kw)
    monkeypatch.setattr(engine, "Workspace", lambda: None)
    _same_checkpoints(streamed, merge([checkpoints["ft0"], grown], "ties", out=tmp_path / "fresh", **kw))


def test_workspace_reuses_one_buffer_per_role() -> None:
    ws = Workspace()
    a = ws.take("x", (4, 8), torch.float32)
    b = ws.take("x", (16,), torch.bfloat16)  # smaller: a view of the same bytes
    assert b.data_ptr() == a.data_ptr() and ws.nbytes == 128
    c = ws.take("x", (100,), torch.float32)  # larger: the buffer grows
    assert c.shape == (100,) and ws.nbytes == 400
    assert ws.take("y", (3,), torch.float16).data_ptr() != c.data_ptr()


def test_reader_fills_a_given_buffer_or_says_why_not(checkpoints) -> None:  # noqa: F811
    reader = CheckpointReader(checkpoints["base"])
    key = "model.layers.0.mlp.up_proj.weight"
    buffer = torch.empty(reader.shape(key), dtype=reader.dtype(key))
    assert reader.get(key, into=buffer) is buffer and torch.equal(buffer, reader.get(key))
    with pytest.raises(ValueError, match="cannot hold"):
        reader.get(key, into=torch.empty(3, dtype=reader.dtype(key)))
    with pytest.raises(DeltaFormatError, match="no tensor named"):
        reader.get("missing.weight", into=buffer)


def test_lines_norms_sum_the_task_vectors_before_the_kernel_trims_them() -> None:
    job = TensorJob("k", [torch.ones(3), torch.full((3,), 2.0)], {}, [{}, {}], lambda: torch.zeros(3),
                    lambda i: torch.Generator())

    def trimming_kernel(j: TensorJob) -> torch.Tensor:
        out = j.taus[0].clone()
        for t in j.taus:
            t.zero_()  # what TIES' in-place trim does to the job's task vectors
        return out

    assert lines_norms(iter([job]), trimming_kernel) == (9.0, 3.0)


def test_cli_keeps_freed_memory_on_glibc() -> None:
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory() is True


def test_cli_process_ends_after_writing_and_reporting(checkpoints, tmp_path) -> None:  # noqa: F811
    """The console entry point skips interpreter teardown after a merge: output complete, exit status 0;
    a failing run still reports its error with status 2."""
    import subprocess
    import sys

    recipe = tmp_path / "ties.yml"
    recipe.write_text(f"merge_method: ties\nbase_model: {checkpoints['base']}\nmodels:\n"
                      + "".join(f"  - model: {checkpoints[f'ft{i}']}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
                                for i in range(3))
                      + "parameters: {normalize: true}\ndtype: float32\n")
    cmd = [sys.executable, "-m", "deltatune.cli", "merge", str(recipe), "--out", str(tmp_path / "m"), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(str(tmp_path / "m")) and "checkpoint in" in done.stderr
    in_process = merge([checkpoints[f"ft{i}"] for i in range(3)], "ties", base=checkpoints["base"],
                       params={"density": 0.3}, preset="mergekit", output="checkpoint", out=tmp_path / "api")
    _same_checkpoints(tmp_path / "m", in_process)
    bad = subprocess.run(cmd[:4] + [str(tmp_path / "missing.yml"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error" in bad.stderr


def test_workspace_reads_a_tensor_once_until_its_buffer_is_taken(checkpoints, monkeypatch) -> None:  # noqa: F811
    reader = CheckpointReader(checkpoints["base"])
    key = "model.layers.0.mlp.up_proj.weight"
    reads = []
    get = reader.get
    monkeypatch.setattr(reader, "get", lambda name, into=None: reads.append(name) or get(name, into))
    ws = Workspace()
    first = ws.read_float(reader, key, "base")
    again = ws.read_float(reader, key, "base")
    assert len(reads) == 1 and again.data_ptr() == first.data_ptr() and torch.equal(again, get(key).float())
    ws.take("base", (2,), torch.float32)  # someone else's use of the buffer: the next read is real
    assert torch.equal(ws.read_float(reader, key, "base"), get(key).float()) and len(reads) == 2
