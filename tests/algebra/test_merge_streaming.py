"""The streamed checkpoint path (reused workspace buffers, in-place kernels) gives the same bytes as fresh tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_delta, tiny_bert, tiny_gpt2, tiny_llama
from merge_fixtures import checkpoints, save_finetune  # noqa: F401  (fixture)

import deltatune
from deltatune.algebra import engine, merge
from deltatune.algebra.checkpoint import INDEX, CheckpointReader
from deltatune.algebra.methods import TensorJob
from deltatune.algebra.output import RECORD_FILE
from deltatune.algebra.stats import lines_norms
from deltatune.algebra.workspace import Workspace
from deltatune.commands.process import keep_freed_memory
from deltatune.errors import DeltaFormatError
from deltatune.io.outputs import MARKER

pytestmark = pytest.mark.usefixtures("one_thread")
#: every tokenizer artifact transformers may save next to a model (a chat model's template included)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "special_tokens_map.json", "spiece.model")

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


# --- delta inputs → checkpoint: the streamed output is the model path's (apply_to_checkpoint), tensor for tensor ---

LLAMA_LORA = deltatune.LoRAConfig(r=2, alpha=4.0, targets=["q_proj", "v_proj"])
BERT_LORA = deltatune.LoRAConfig(r=2, alpha=4.0, targets=["query", "value"])
GPT2_LORA = deltatune.LoRAConfig(r=2, alpha=4.0, targets=["c_attn"])
MERGE = dict(weights=[0.6, 0.4], params={"lambda": 0.8})


def _mixed_llama() -> torch.nn.Module:
    """Attention and MLP in bf16, norms (not bf16-representable) and embeddings in fp32."""
    model = tiny_llama(0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    for layer in model.model.layers:
        layer.self_attn.to(torch.bfloat16)
        layer.mlp.to(torch.bfloat16)
    return model


def _save_with_dtype(model: torch.nn.Module, path: Path, dtype: str | None, **kw) -> None:
    """``save_pretrained``, then the config's ``dtype`` set to ``dtype`` (removed for ``None``)."""
    model.save_pretrained(path, **kw)
    config = json.loads((path / "config.json").read_text())
    config.pop("dtype", None)
    (path / "config.json").write_text(json.dumps(config if dtype is None else {**config, "dtype": dtype}))


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Base checkpoints: a Llama stored in fp32, bf16 and fp16, one whose config has no dtype, one stored in
    mixed dtypes (loaded as fp32 or bf16, as its config says), a sharded bf16 one; a bare BERT encoder; a BERT
    classifier (names with a ``bert.`` prefix); a GPT-2 with tied embeddings and a tokenizer file."""
    root = tmp_path_factory.mktemp("bases")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        tiny_llama(0).to(dtype).save_pretrained(root / name)
    _save_with_dtype(tiny_llama(0), root / "no_dtype", None)
    _save_with_dtype(_mixed_llama(), root / "mixed_fp32", "float32")
    _save_with_dtype(_mixed_llama(), root / "mixed_bf16", "bfloat16")
    tiny_llama(0).to(torch.bfloat16).save_pretrained(root / "sharded", max_shard_size="60KB")
    tiny_bert(0).bert.save_pretrained(root / "bert")
    tiny_bert(0).save_pretrained(root / "bert_cls")
    tiny_gpt2(0).save_pretrained(root / "gpt2")
    for name in TOKENIZER_FILES:  # tokenizer files: copied as the model path copies them
        (root / "gpt2" / name).write_text("{}")
    return {p.name: p for p in root.iterdir()}


def _deltas(base: Path, cls_name: str, config, seeds=(1, 2)) -> list[deltatune.Delta]:
    """Random LoRA deltas trained on ``base`` as ``from_pretrained`` loads it into ``cls_name`` (a classifier:
    3 labels, a different fresh head per input), so their fingerprint is the loaded base's."""
    import transformers

    deltas = []
    for seed in seeds:
        torch.manual_seed(seed)
        kw = {"num_labels": 3} if "Classification" in cls_name else {}
        model = getattr(transformers, cls_name).from_pretrained(base, **kw).float().eval()
        deltas.append(randomize_delta(model, config, seed, 0.02))
    return deltas


def _model_path(deltas, base: Path, out: Path, out_dtype=None, shard_size="5GB", **kw) -> Path:
    """What the engine's fallback writes: the merged delta applied to the loaded base model."""
    from deltatune.api import apply_to_checkpoint

    merged = merge(deltas, "task_arithmetic", base=str(base), **MERGE, **kw)
    apply_to_checkpoint(merged, out, model=str(base), dtype=out_dtype, shard_size=shard_size)
    return out


def _refuse_models(monkeypatch) -> None:
    """No model is loaded and the model path is never taken."""
    from transformers import PreTrainedModel

    from deltatune import api

    def refuse(*args, **kwargs):
        raise AssertionError("the streamed path loaded a model")

    monkeypatch.setattr(api, "apply_to_checkpoint", refuse)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def _streamed(deltas, base: Path, out: Path, monkeypatch, out_dtype=None, **kw) -> Path:
    with monkeypatch.context() as m:
        _refuse_models(m)
        return merge(deltas, "task_arithmetic", base=str(base), output="checkpoint", out=out, out_dtype=out_dtype,
                     **MERGE, **kw)


def _same_output(streamed: Path, model_path: Path) -> None:
    """Every tensor equal (name, dtype, bits), the same config and the same copied files."""
    a, b = CheckpointReader(streamed), CheckpointReader(model_path)
    assert sorted(a.names()) == sorted(b.names())
    for key in b.names():
        x, y = a.get(key), b.get(key)
        assert x.dtype == y.dtype and torch.equal(x, y), key
    assert json.loads((streamed / "config.json").read_text()) == json.loads((model_path / "config.json").read_text())
    assert (streamed / "config.json").read_bytes() == (model_path / "config.json").read_bytes()
    skip = {"config.json", RECORD_FILE, INDEX, MARKER}  # the marker lists the files, the record is the merge's
    files = {p.name for p in model_path.iterdir() if not p.name.endswith(".safetensors")} - skip
    assert files == {p.name for p in streamed.iterdir() if not p.name.endswith(".safetensors")} - skip
    for name in files:
        assert (streamed / name).read_bytes() == (model_path / name).read_bytes(), name


LLAMA_CASES = [  # (stored base, out_dtype, classifier head)
    ("fp32", torch.bfloat16, False),
    ("fp32", torch.float16, True),
    ("bf16", None, False),
    ("bf16", torch.float32, True),
    ("fp16", None, True),
    ("fp16", torch.bfloat16, False),
    ("no_dtype", None, False),
    ("mixed_fp32", None, False),
    ("mixed_bf16", None, True),
]


@pytest.mark.parametrize(("stored", "out_dtype", "head"), LLAMA_CASES)
def test_delta_merge_streams_what_the_model_path_writes(bases, tmp_path, monkeypatch, stored, out_dtype,
                                                        head) -> None:
    base = bases[stored]
    deltas = _deltas(base, "LlamaForSequenceClassification" if head else "LlamaForCausalLM", LLAMA_LORA)
    assert all(("score" in d.heads) == head for d in deltas)
    expected = _model_path(deltas, base, tmp_path / "model", out_dtype)
    _same_output(_streamed(deltas, base, tmp_path / "streamed", monkeypatch, out_dtype), expected)
    written = CheckpointReader(expected)
    if head:
        assert "score.weight" in written and "lm_head.weight" not in written
        labels = json.loads((expected / "config.json").read_text())["id2label"]
        assert labels == {str(i): f"LABEL_{i}" for i in range(3)}
    if out_dtype is not None:  # the config says what was written: transformers loads in the config's dtype
        assert {written.dtype(k) for k in written.names()} == {out_dtype}
        assert json.loads((expected / "config.json").read_text())["dtype"] == str(out_dtype).removeprefix("torch.")


def test_classifier_head_on_a_bare_encoder_streams_with_the_prefixed_names(bases, tmp_path, monkeypatch) -> None:
    """A BERT classifier delta on a ``BertModel`` checkpoint: the written names carry the ``bert.`` prefix
    loading adds, the merged head is written under ``classifier.*``, the config is the classifier's."""
    base = bases["bert"]
    deltas = _deltas(base, "BertForSequenceClassification", BERT_LORA)
    expected = _model_path(deltas, base, tmp_path / "model")
    _same_output(_streamed(deltas, base, tmp_path / "streamed", monkeypatch), expected)
    names = CheckpointReader(expected).names()
    assert "classifier.weight" in names and all(n.startswith(("bert.", "classifier.")) for n in names)


def test_prefixed_checkpoint_streams_into_the_bare_model_names(bases, tmp_path, monkeypatch) -> None:
    """Head-less deltas on ``BertModel`` with a base saved by a classifier (``bert.`` prefix, a classifier to
    drop): loading strips the prefix and drops the classifier, so does the stream."""
    base = bases["bert_cls"]
    deltas = _deltas(base, "BertModel", BERT_LORA)
    expected = _model_path(deltas, base, tmp_path / "model")
    _same_output(_streamed(deltas, base, tmp_path / "streamed", monkeypatch), expected)
    assert not any(n.startswith(("bert.", "classifier.")) for n in CheckpointReader(expected).names())


def test_sharded_base_and_first_head_stream_into_shards(bases, tmp_path, monkeypatch) -> None:
    """A sharded bf16 base, ``heads="first"`` (the first input's head as stored), several output shards."""
    base = bases["sharded"]
    assert (base / INDEX).is_file()
    deltas = _deltas(base, "LlamaForSequenceClassification", LLAMA_LORA)
    kw = dict(heads="first", shard_size="60KB")
    expected = _model_path(deltas, base, tmp_path / "model", **kw)
    streamed = _streamed(deltas, base, tmp_path / "streamed", monkeypatch, **kw)
    _same_output(streamed, expected)
    assert (streamed / INDEX).is_file() and torch.equal(CheckpointReader(streamed).get("score.weight"),
                                                        deltas[0].heads["score"]["weight"].to(torch.bfloat16))


def test_tied_embeddings_stream_once_with_the_tokenizer_files(bases, tmp_path, monkeypatch) -> None:
    deltas = _deltas(bases["gpt2"], "GPT2LMHeadModel", GPT2_LORA)
    expected = _model_path(deltas, bases["gpt2"], tmp_path / "model", torch.bfloat16)
    streamed = _streamed(deltas, bases["gpt2"], tmp_path / "streamed", monkeypatch, torch.bfloat16)
    _same_output(streamed, expected)
    assert "lm_head.weight" not in CheckpointReader(streamed)
    assert all((out / name).is_file() for out in (streamed, expected) for name in TOKENIZER_FILES)


def test_streamed_delta_merge_writes_the_merged_parameters(bases, tmp_path, monkeypatch) -> None:
    """The comparisons above are not vacuous: merged tensors differ from the base, untouched ones do not."""
    deltas = _deltas(bases["bf16"], "LlamaForCausalLM", LLAMA_LORA)
    out = CheckpointReader(_streamed(deltas, bases["bf16"], tmp_path / "s", monkeypatch))
    base = CheckpointReader(bases["bf16"])
    assert not torch.equal(out.get("model.layers.0.self_attn.q_proj.weight"),
                           base.get("model.layers.0.self_attn.q_proj.weight"))
    assert torch.equal(out.get("model.layers.0.mlp.up_proj.weight"), base.get("model.layers.0.mlp.up_proj.weight"))


def _falls_back(deltas, base: Path, out: Path, monkeypatch) -> list[str]:
    """The outputs the model path wrote during a merge of ``deltas`` into ``base``."""
    from deltatune import api

    calls: list[str] = []
    real = api.apply_to_checkpoint
    monkeypatch.setattr(api, "apply_to_checkpoint", lambda *a, **k: calls.append(str(a[1])) or real(*a, **k))
    merge(deltas, "task_arithmetic", base=str(base), output="checkpoint", out=out, force=True, **MERGE)
    return calls


def test_delta_merge_falls_back_where_the_stream_could_differ(bases, tmp_path, monkeypatch) -> None:
    """No single load dtype (mixed storage, no dtype in the config: the loader takes the first floating tensor
    it meets), or a model tensor the checkpoint lacks (the loader would initialise it at random)."""
    from safetensors.torch import load_file, save_file

    deltas = _deltas(bases["fp32"], "LlamaForCausalLM", LLAMA_LORA)
    _save_with_dtype(_mixed_llama(), tmp_path / "mixed", None)
    assert _falls_back(deltas, tmp_path / "mixed", tmp_path / "o1", monkeypatch) == [str(tmp_path / "o1")]
    missing = tmp_path / "missing"
    tiny_llama(0).save_pretrained(missing)
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    assert _falls_back(deltas, missing, tmp_path / "o2", monkeypatch) == [str(tmp_path / "o2")]
