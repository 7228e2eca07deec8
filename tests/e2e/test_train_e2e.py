"""End-to-end on the real MiniLM and real GLUE/text data: train, resume, CLI verbs, causal LM."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
from deltatune.errors import ConfigError, DataError
from deltatune.methods.registry import TrainHook
from deltatune.train import loop, run_record
from deltatune.train.config import TrainConfig

SMALL = dict(train_limit=600, eval_limit=64, eval_every=0, eval_before=False, max_length=32, batch_size=8,
             progress=False)


def test_exact_resume_matches_uninterrupted_run(tmp_path, monkeypatch, data_dir):
    """Crash mid selection window, resume from the checkpoint: bit-identical final delta."""
    from deltatune.methods import sparse as sparse_method

    kw = dict(SMALL, max_steps=16, checkpoint_every=7, lr=3e-3)
    mc = dt.SparseConfig(density=0.002, reselection_steps=6, accumulation_steps=2)
    full = loop.train(TrainConfig(out_dir=str(tmp_path / "a"), **kw), mc)

    armed = [True]

    class Crash(TrainHook):
        def after_step(self, step):
            if armed[0] and step == 9:  # checkpoint at 7 is inside the window [6, 8)
                raise KeyboardInterrupt

    original = sparse_method.Sparse.hooks
    monkeypatch.setattr(sparse_method.Sparse, "hooks", lambda self, *a, **k: original(self, *a, **k) + [Crash()])
    with pytest.raises(KeyboardInterrupt):
        loop.train(TrainConfig(out_dir=str(tmp_path / "b"), **kw), mc)
    armed[0] = False
    resumed = loop.train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **kw), mc)
    assert resumed.delta.metrics["digest"] == full.delta.metrics["digest"]
    a, b = dt.load_delta(tmp_path / "a" / "delta"), dt.load_delta(tmp_path / "b" / "delta")
    for name in a.parts:
        assert torch.equal(a.parts[name].indices, b.parts[name].indices)
        assert torch.equal(a.parts[name].values, b.parts[name].values)


def test_resume_with_other_settings_or_method_config_is_refused(tmp_path, monkeypatch, data_dir):
    """A checkpoint records its run: a resume with another batch size, task, LR or method config would continue a
    different run silently (wrong data offset, schedule, labels), so it is refused naming the setting."""
    from deltatune.errors import ConfigError
    from deltatune.methods import lora as lora_method

    kw = dict(SMALL, train_limit=64, max_steps=4, checkpoint_every=2, out_dir=str(tmp_path / "r"))
    mc = dt.LoRAConfig(r=2, targets=["query"])
    armed = [True]

    class Crash(TrainHook):
        def after_step(self, step):
            if armed[0] and step == 3:
                raise KeyboardInterrupt

    original = lora_method.LoRA.hooks
    monkeypatch.setattr(lora_method.LoRA, "hooks", lambda self, *a, **k: original(self, *a, **k) + [Crash()])
    with pytest.raises(KeyboardInterrupt):
        loop.train(TrainConfig(**kw), mc)
    armed[0] = False
    for change, needle in (({"batch_size": 4}, "batch_size"), ({"task": "mrpc"}, "task"), ({"lr": 1e-2}, "lr")):
        with pytest.raises(ConfigError, match=needle):
            loop.train(TrainConfig(**{**kw, **change}, resume=True), mc)
    with pytest.raises(ConfigError, match="config"):
        loop.train(TrainConfig(**kw, resume=True), dt.LoRAConfig(r=4, targets=["query"]))
    resumed = loop.train(TrainConfig(**{**kw, "eval_every": 2}, resume=True), mc)  # free to change on resume
    assert resumed.delta is not None


def _crash_as_the_code_before_in_place_training(monkeypatch, method: str, out, kw: dict, config) -> None:
    """Train ``config`` into ``out`` as the code before in-place training did — no ``InPlaceTraining`` hook state
    and no ``in_place`` field in the recorded run — and crash after step 3 (its checkpoint at step 2 stays).  The
    method's hooks keep a disarmed crash hook after (its state is in the checkpoint: a resume needs it)."""
    from deltatune.methods import get_method

    armed = [True]

    class Crash(TrainHook):
        def after_step(self, step):
            if armed[0] and step == 3:
                raise KeyboardInterrupt

    cls = type(get_method(method))
    hooks, settings = cls.hooks, loop.run_settings

    def old_settings(cfg, delta):
        run = settings(cfg, delta)
        run["config"].pop("in_place")
        return run

    def with_crash(self, *a, **k):  # while armed, the code before: no stateless in-place hook
        return [h for h in hooks(self, *a, **k) if not armed[0] or not h.stateless] + [Crash()]

    monkeypatch.setattr(cls, "hooks", with_crash)
    with monkeypatch.context() as then:
        then.setattr(loop, "run_settings", old_settings)
        with pytest.raises(KeyboardInterrupt):
            loop.train(TrainConfig(out_dir=str(out), **kw), config)
    armed[0] = False


def test_a_checkpoint_from_before_in_place_sparse_training_resumes(tmp_path, monkeypatch, data_dir):
    """A sparse run checkpointed by the code before in-place training (no ``InPlaceTraining`` hook state, no
    ``in_place`` field in its recorded config) resumes to the uninterrupted run's delta; asking now for another value
    than the default the old run trained with is refused."""
    from deltatune.errors import ConfigError

    kw = dict(SMALL, train_limit=64, max_steps=4, checkpoint_every=2, lr=3e-3)
    mc = dt.SparseConfig(density=0.002, reselection_steps=3, accumulation_steps=1)
    full = loop.train(TrainConfig(out_dir=str(tmp_path / "a"), **kw), mc)
    _crash_as_the_code_before_in_place_training(monkeypatch, "sparse", tmp_path / "b", kw, mc)
    with pytest.raises(ConfigError, match="config"):
        loop.train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **kw),
                   dt.SparseConfig(density=0.002, reselection_steps=3, accumulation_steps=1, in_place=False))
    resumed = loop.train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **kw), mc)
    assert resumed.delta.metrics["digest"] == full.delta.metrics["digest"]


@pytest.mark.parametrize("method", ["full", "hft"])
def test_a_checkpoint_from_before_in_place_dense_training_resumes_without_touching_the_base(
        tmp_path, monkeypatch, data_dir, method):
    """A full or HFT run checkpointed by the code before in-place training holds Δθ; resumed in place now, the parts
    are bound (θ trains in the base's storage), and the checkpoint's Δθ is read as θ₀ + Δθ, not copied over θ (which
    wrote Δθ into the base weights)."""
    kw = dict(SMALL, train_limit=64, max_steps=4, checkpoint_every=2, lr=1e-4)
    old = dt.make_config(method, {"in_place": False})  # the code before: a separate Δθ
    full = loop.train(TrainConfig(out_dir=str(tmp_path / "a"), **kw), old)
    _crash_as_the_code_before_in_place_training(monkeypatch, method, tmp_path / "b", kw, old)
    resumed = loop.train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **kw), dt.make_config(method, {}))
    assert [round(h["loss"], 4) for h in resumed.history] == [round(h["loss"], 4) for h in full.history]
    worst = max((t - resumed.delta.parts[n].state()[k]).abs().max().item()
                for n, p in full.delta.parts.items() for k, t in p.state().items())
    assert worst <= 1e-5  # θ in place against a separate Δθ: rounding only (Δ itself is ~1e-4 here)


def test_cli_train_info_eval_apply_export(tmp_path, data_dir, minilm_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train", "--method", "lora", "--out", str(out), "--steps", "8", "--set", "r=4",
            "--set", "targets=query,value"] + [f"--set={k}={v}" for k, v in SMALL.items()]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    delta_dir = out / "delta"
    info = runner.invoke(app, ["info", str(delta_dir), "--json"])
    assert info.exit_code == 0, info.output
    described = json.loads(info.output)
    assert described["method"] == "lora" and described["trainable"] == 6 * 2 * 4 * (384 + 384)
    assert described["part_kinds"] == {"lora": 12}

    ev = runner.invoke(app, ["eval", str(delta_dir), "--limit", "64"])
    assert ev.exit_code == 0 and "accuracy" in ev.output

    ckpt = tmp_path / "merged"
    ap = runner.invoke(app, ["apply", str(delta_dir), "--out", str(ckpt), "--shard-size", "30MB"])
    assert ap.exit_code == 0, ap.output
    assert (ckpt / "model.safetensors.index.json").is_file()
    tok = AutoTokenizer.from_pretrained(ckpt)
    batch = tok(["a fine film", "dull and slow"], padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    dt.apply_delta(base, dt.load_delta(delta_dir))
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, base(**batch).logits, atol=1e-5)

    peft_dir = tmp_path / "peft"
    ex = runner.invoke(app, ["export", str(delta_dir), "--format", "peft", "--out", str(peft_dir)])
    assert ex.exit_code == 0, ex.output
    fresh = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    peft_model = PeftModel.from_pretrained(fresh, peft_dir).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, base(**batch).logits, atol=1e-5)


@pytest.mark.parametrize("task", ["mrpc", "rte", "cola", "stsb", "wnli"])
def test_every_glue_task_trains_with_its_metric(tmp_path, task, data_dir):
    cfg = TrainConfig(task=task, out_dir=str(tmp_path), max_steps=2, train_limit=32, eval_limit=32,
                      eval_every=0, eval_before=False, max_length=32, batch_size=8, progress=False)
    result = loop.train(cfg, dt.LoRAConfig(r=2, targets=["query"]))
    expected = {"mrpc": {"f1", "accuracy"}, "rte": {"accuracy"}, "cola": {"matthews"},
                "stsb": {"pearson", "spearman"}, "wnli": {"accuracy"}}[task]
    assert expected <= set(result.final)


def test_qnli_has_no_train_split(tmp_path, data_dir):
    with pytest.raises(DataError, match="QNLI|qnli"):
        loop.train(TrainConfig(task="qnli", out_dir=str(tmp_path), max_steps=1, progress=False), dt.LoRAConfig())


@pytest.mark.parametrize("method", ["lora", "sparse"])
def test_causal_lm_on_plain_text_learns(tmp_path, tiny_lm_dir, data_dir, method):
    text = tmp_path / "shakespeare.txt"
    text.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:60_000])
    cfg = TrainConfig(model=str(tiny_lm_dir), task="text", data=str(text), out_dir=str(tmp_path / "o"),
                      max_steps=25, max_length=32, batch_size=8, eval_every=0, eval_limit=16, progress=False,
                      lr=1e-2)
    mc = dt.LoRAConfig(r=4) if method == "lora" else dt.SparseConfig(num_tunable=20_000)
    result = loop.train(cfg, mc)
    assert result.final["loss"] < result.before["loss"] - 0.05


def test_a_relative_model_folder_is_recorded_absolute(tmp_path, tiny_lm_dir, monkeypatch):
    """Trained from the folder above the model with ``--model llama``, the delta still finds its base (and its
    data) when used from anywhere else (``deltatune generate/eval/apply`` load the recorded base)."""
    rows = [{"prompt": f"Q: {i}?", "response": f" A: {i}"} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    shutil.copytree(tiny_lm_dir, tmp_path / "llama")
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(model="llama", task="jsonl", data="train.jsonl", eval_data="train.jsonl", out_dir="o",
                      max_steps=1, max_length=16, batch_size=4, eval_every=0, eval_before=False, eval_limit=4,
                      progress=False, checkpoint_every=0)
    loop.train(cfg, dt.LoRAConfig(r=2))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    delta = dt.load_delta(tmp_path / "o" / "delta")
    assert delta.provenance.base == delta.provenance.train["model"] == str((tmp_path / "llama").resolve())
    assert delta.provenance.train["data"] == delta.provenance.train["eval_data"] == str(tmp_path / "train.jsonl")
    assert dt.generate(tmp_path / "o" / "delta", "Q: 3?", max_new_tokens=2)  # the base is found from here


def test_a_relative_json_split_reference_is_recorded_absolute_with_its_split(tmp_path, monkeypatch):
    """``--data rows.json:train`` (a JSON object of splits, as CLINC150 ships) names a file that exists only without
    its split: the delta records the file's absolute path with the split, so eval and predict find it from any
    folder, and a resume spelling it absolute continues the run."""
    from deltatune.delta import Delta
    from deltatune.provenance import path_reference
    from deltatune.train import checkpoint

    (tmp_path / "rows.json").write_text(json.dumps({"train": [["a", "x"], ["b", "y"]], "val": [["c", "x"]]}))
    monkeypatch.chdir(tmp_path)
    assert path_reference("rows.json:train") == f"{tmp_path / 'rows.json'}:train"
    assert path_reference("rows.json") == str(tmp_path / "rows.json")
    assert path_reference("no-such.json:train") == "no-such.json:train"  # a hub name or a typo: as given
    delta = Delta("lora", checkpoint.config_as_recorded({}, "lora"), {})
    relative = loop.run_settings(TrainConfig(task="classify", data="rows.json:train", eval_data="rows.json:val"),
                                 delta)
    absolute = loop.run_settings(TrainConfig(task="classify", data=f"{tmp_path / 'rows.json'}:train",
                                             eval_data=f"{tmp_path / 'rows.json'}:val"), delta)
    assert relative == absolute and relative["train"]["data"] == f"{(tmp_path / 'rows.json').resolve()}:train"
    older = json.loads(json.dumps(relative))  # recorded as given before the split was recorded resolved
    older["train"]["data"] = "rows.json:train"
    run_record.check_same_run(tmp_path, older, absolute)  # still resumes


def test_resume_refuses_a_base_model_folder_rewritten_since(tmp_path, tiny_lm_dir):
    """A checkpoint records the fingerprint of the base its delta trains on: a resume over another model saved
    under the same path (fine-tuned, re-downloaded) would continue the delta on other weights, so it is refused
    naming what differs; the model restored, the run resumes."""
    from transformers import AutoModelForCausalLM

    from deltatune.errors import FingerprintMismatch

    rows = [{"prompt": f"Q: {i}?", "response": f" A: {i}"} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    shutil.copytree(tiny_lm_dir, tmp_path / "llama")
    cfg = dict(model=str(tmp_path / "llama"), task="jsonl", data=str(tmp_path / "train.jsonl"),
               out_dir=str(tmp_path / "o"), max_steps=2, max_length=16, batch_size=4, eval_every=0,
               eval_before=False, eval_limit=4, progress=False, checkpoint_every=1)
    loop.train(TrainConfig(**cfg), dt.LoRAConfig(r=2))
    shutil.copytree(tmp_path / "llama", tmp_path / "kept")
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    other.save_pretrained(tmp_path / "llama")
    with pytest.raises(FingerprintMismatch, match="--resume needs the base model the run started on"):
        loop.train(TrainConfig(**cfg, resume=True), dt.LoRAConfig(r=2))
    shutil.rmtree(tmp_path / "llama")
    shutil.copytree(tmp_path / "kept", tmp_path / "llama")
    assert loop.train(TrainConfig(**cfg, resume=True), dt.LoRAConfig(r=2)).delta is not None


def test_a_hook_that_finds_divergence_is_told_the_last_checkpoint(tmp_path, tiny_lm_dir, monkeypatch):
    """A method's hook that stops a run (LT-SFT's non-finite phase-1 delta) does not know the run's checkpoints: the
    loop names the last one in the error it passes on."""
    from deltatune.errors import TrainingDiverged
    from deltatune.methods import lora as lora_method

    class Diverges(TrainHook):
        def after_step(self, step):
            if step == 3:
                raise TrainingDiverged(step, float("nan"), None, tensor="a method's tensor")

    original = lora_method.LoRA.hooks
    monkeypatch.setattr(lora_method.LoRA, "hooks", lambda self, *a, **k: original(self, *a, **k) + [Diverges()])
    rows = [{"prompt": f"Q: {i}?", "response": f" A: {i}"} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = TrainConfig(model=str(tiny_lm_dir), task="jsonl", data=str(tmp_path / "train.jsonl"),
                      out_dir=str(tmp_path / "o"), max_steps=4, max_length=16, batch_size=4, eval_every=0,
                      eval_before=False, eval_limit=4, progress=False, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match=r"tensor.* step 3; last good checkpoint kept at .*checkpoint"):
        loop.train(cfg, dt.LoRAConfig(r=2))


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_a_base_stored_in_bf16_trains_in_fp32_and_its_delta_applies_to_the_bf16_checkpoint(tmp_path, tiny_lm_dir,
                                                                                          method):
    """transformers 5 loads a checkpoint in its stored dtype: a delta created on a bf16 base would train in bf16
    (AdamW loses updates under 2⁻⁸ of a value). The loop trains in fp32; the upcast is exact, so the delta's base
    fingerprint is the bf16 checkpoint's and it applies there."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_lm_dir, tmp_path / "bf16")  # its tokenizer; the weights saved again in bf16
    AutoModelForCausalLM.from_pretrained(tiny_lm_dir).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    rows = [{"prompt": f"Q: {i}?", "response": f" A: {i}"} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = TrainConfig(model=str(tmp_path / "bf16"), task="jsonl", data=str(tmp_path / "train.jsonl"),
                      out_dir=str(tmp_path / "o"), max_steps=2, max_length=16, batch_size=4, eval_every=0,
                      eval_before=False, eval_limit=4, progress=False, checkpoint_every=0)
    result = loop.train(cfg, dt.make_config(method, {"r": 2} if method == "lora" else {}))
    saved = dt.load_delta(result.delta_dir)
    assert all(t.dtype == torch.float32 for part in saved.parts.values() for t in part.state().values())
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    dt.apply_delta(base, saved)  # the fingerprint of the bf16 checkpoint: no FingerprintMismatch


def test_jsonl_masks_prompt_and_trains(tmp_path, tiny_lm_dir):
    rows = [{"prompt": f"Q: what is {i} plus {i}?", "response": f" A: {2 * i}"} for i in range(64)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = TrainConfig(model=str(tiny_lm_dir), task="jsonl", data=str(path), eval_data=str(path),
                      out_dir=str(tmp_path / "o"), max_steps=20, max_length=32, batch_size=8, eval_every=0,
                      eval_limit=16, progress=False, lr=1e-2)
    result = loop.train(cfg, dt.LoRAConfig(r=4))
    assert result.final["loss"] < result.before["loss"]
    from deltatune.api import evaluate_delta  # eval --data evaluates that file, not the recorded eval file

    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"prompt": f"say {w}", "response": f" {w} {w}"}) for w in ("red", "blue")))
    recorded = evaluate_delta(result.delta_dir, limit=16)["delta"]["loss"]
    assert recorded == pytest.approx(result.final["loss"], rel=1e-5)
    on_other = evaluate_delta(result.delta_dir, data=str(other))["delta"]["loss"]
    moved = dt.load_delta(result.delta_dir)
    moved.provenance.train = {**moved.provenance.train, "eval_data": str(other)}
    assert on_other == pytest.approx(evaluate_delta(moved.save(tmp_path / "moved"))["delta"]["loss"], rel=1e-6)
    assert on_other != pytest.approx(recorded, rel=1e-3)
    moved.provenance.train = {**moved.provenance.train, "eval_data": None}
    with pytest.raises(ConfigError, match="records no eval file: pass --data"):
        evaluate_delta(moved.save(tmp_path / "no_eval"))


def test_resume_is_exact_when_a_schedule_changes_what_trains(tmp_path, monkeypatch, data_dir):
    """A hook freezes every LoRA A after step 3; a crash at step 7 resumes from the step-5 checkpoint. The frozen
    A (trained for 3 steps) must come back from the checkpoint, and the hook's state must be restored before the
    trainable tensors are: the resumed delta equals the uninterrupted one bit for bit."""
    from deltatune.methods import lora as lora_method

    class FreezeA(TrainHook):
        def __init__(self, delta) -> None:
            self.delta, self.frozen = delta, False

        def _freeze(self) -> None:
            self.frozen = True
            for part in self.delta.parts.values():
                part.lora_A.requires_grad_(False)

        def after_step(self, step):
            if step == 3:
                self._freeze()

        def state_dict(self):
            return {"frozen": self.frozen}

        def load_state_dict(self, state):
            if state["frozen"]:
                self._freeze()

    armed = [False]

    class Crash(TrainHook):
        def after_step(self, step):
            if armed[0] and step == 7:
                raise KeyboardInterrupt

    monkeypatch.setattr(lora_method.LoRA, "hooks", lambda self, model, delta, *a, **k: [FreezeA(delta), Crash()])
    kw = dict(SMALL, max_steps=9, checkpoint_every=5, lr=3e-3)
    mc = dt.LoRAConfig(r=2, targets=["query", "value"])
    full = loop.train(TrainConfig(out_dir=str(tmp_path / "a"), **kw), mc)
    armed[0] = True
    with pytest.raises(KeyboardInterrupt):
        loop.train(TrainConfig(out_dir=str(tmp_path / "b"), **kw), mc)
    armed[0] = False
    resumed = loop.train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **kw), mc)
    assert resumed.delta.metrics["digest"] == full.delta.metrics["digest"]


def test_a_refused_resume_gives_the_base_its_tensors_back(tmp_path, monkeypatch, data_dir):
    """The hooks exist before the checks of a resume: when one refuses (another run's settings), in-place training
    is still closed — the base gets θ₀ back and the temporary file holding it is deleted — not left to the
    garbage collector (a notebook's last traceback keeps the frame alive)."""
    from deltatune.errors import ConfigError
    from deltatune.methods import full, in_place

    kw = dict(SMALL, train_limit=32, max_steps=4, checkpoint_every=2, out_dir=str(tmp_path / "r"))
    mc = dt.make_config("full", {"targets": ["query"]})

    class Crash(TrainHook):
        def after_step(self, step):
            if step == 3:
                raise KeyboardInterrupt

    original_hooks = full.Full.hooks
    monkeypatch.setattr(full.Full, "hooks", lambda self, *a, **k: original_hooks(self, *a, **k) + [Crash()])
    with pytest.raises(KeyboardInterrupt):
        loop.train(TrainConfig(**kw), mc)  # leaves the checkpoint of step 2
    closed = []
    original = in_place.InPlaceTraining.close

    def close(self):
        closed.append((len(self.bound), self.spill is not None))
        original(self)

    monkeypatch.setattr(in_place.InPlaceTraining, "close", close)
    with pytest.raises(ConfigError, match="lr"):
        loop.train(TrainConfig(**{**kw, "lr": 1e-2}, resume=True), mc)
    assert closed == [(6, True)]  # the six bound query weights, and their θ₀ file


def test_resume_refuses_adding_or_dropping_eval_data_where_it_changes_the_training_rows(tmp_path):
    """A user task without ``eval_data`` holds 10 % of ``data`` out: adding ``--eval-data`` on resume would train on
    other rows from the saved offset. Another eval file is free, so is a GLUE task's, and a checkpoint written before
    runs recorded this still resumes."""
    from deltatune.delta import Delta
    from deltatune.errors import ConfigError

    data, other = tmp_path / "train.csv", tmp_path / "eval.csv"
    for f in (data, other):
        f.write_text("text,label\na,x\nb,y\n")
    from deltatune.train import checkpoint

    delta = Delta("lora", checkpoint.config_as_recorded({}, "lora"), {})

    def run(**kw):
        return loop.run_settings(TrainConfig(out_dir=str(tmp_path / "o"), **kw), delta)

    held = run(task="classify", data=str(data))
    with pytest.raises(ConfigError, match="holds_out: True in the checkpoint, False now"):
        run_record.check_same_run(tmp_path, held, run(task="classify", data=str(data), eval_data=str(other)))
    given = run(task="classify", data=str(data), eval_data=str(other))
    # another file
    run_record.check_same_run(tmp_path, given, run(task="classify", data=str(data), eval_data=str(data)))
    run_record.check_same_run(tmp_path, run(task="sst2"), run(task="sst2", eval_data=str(other)))
    older = json.loads(json.dumps(held))
    del older["train"]["holds_out"]
    run_record.check_same_run(tmp_path, older, run(task="classify", data=str(data)))
