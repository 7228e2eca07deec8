"""The contract every registered method keeps, discovered from the registry: method × example config × arch.

For each method in ``METHODS``, each of its ``examples`` and each tiny architecture (Llama, GPT-2 with Conv1D,
BERT with a classifier head): attaching leaves the output unchanged (where the method says so); a few optimiser
steps change the output and only the delta (and the task head); save → load → apply on a fresh base reproduces
the trained logits; merging into a fresh base gives the unmerged logits and reverting restores the base (or,
for a method that is not additive, merging is refused with :class:`NotMergeable` and nothing is written);
detaching restores the base; in a mixed batch beside a LoRA, a sparse and a bare-base row every row equals the
same row run alone; and a run resumed from a checkpoint (hooks restored before the trainable state) continues
bit-exactly.  Nothing here names a method: a new one is tested by registering it with ``examples``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import TINY_MODELS, base_state, logits, max_diff, randomize_delta, tiny_inputs
from torch import nn

import deltatune
from deltatune.errors import NotMergeable
from deltatune.fingerprint import base_parameters
from deltatune.layer import DeltaLayer
from deltatune.methods import METHODS, get_method
from deltatune.train import checkpoint as ckpt

ARCHS = ("llama", "gpt2", "bert")
HEADS = {"llama": [], "gpt2": [], "bert": ["classifier"]}
STEPS = 3
LR = 1e-2
TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Case:
    method: str
    variant: str
    arch: str

    @property
    def id(self) -> str:
        return f"{self.method}{'-' + self.variant if self.variant else ''}-{self.arch}"

    @property
    def spec(self):
        return get_method(self.method)

    def config(self) -> Any:
        return deltatune.make_config(self.method, dict(self.spec.examples[self.variant]))


CASES = [Case(name, variant, arch) for name in sorted(METHODS) for variant in METHODS[name].examples
         for arch in ARCHS]
IDS = [c.id for c in CASES]


def train_steps(model: nn.Module, delta: deltatune.Delta, config: Any, inputs, steps: int, start: int = 0,
                optimizer=None, hooks=None, total: int = STEPS):
    """``steps`` optimiser steps (with the method's hooks and the parts' auxiliary losses)."""
    method = get_method(config.method)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or method.optimizer(trainable, LR, 0.0, config)
    hooks = method.hooks(model, delta, config, optimizer, total, 1) if hooks is None else hooks
    model.train()
    for step in range(start, start + steps):
        for hook in hooks:
            hook.before_step(step)
        loss = model(**inputs).loss
        aux = delta.aux_loss()
        (loss if aux is None else loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for hook in hooks:
            hook.after_step(step + 1)
    model.eval()
    return optimizer, hooks


@dataclass
class Trained:
    case: Case
    base: nn.Module
    model: nn.Module
    delta: deltatune.Delta
    inputs: dict[str, torch.Tensor]
    before: torch.Tensor
    at_init: torch.Tensor
    after: torch.Tensor
    heads_before: dict[str, torch.Tensor]


_CACHE: dict[str, Trained] = {}


def trained(case: Case) -> Trained:
    """``case`` attached to a fresh tiny model and trained a few steps (cached: read only)."""
    if case.id in _CACHE:
        return _CACHE[case.id]
    model = TINY_MODELS[case.arch]().eval()
    base = copy.deepcopy(model)
    inputs = tiny_inputs(case.arch)
    before = logits(model, inputs)
    config = case.config()
    delta = deltatune.attach(model, config)
    at_init = logits(model, inputs)
    heads_before = {f"{h}.{k}": v.detach().clone() for h in HEADS[case.arch]
                    for k, v in model.get_submodule(h).state_dict().items()}
    _, hooks = train_steps(model, delta, config, inputs, STEPS)
    for hook in hooks:
        hook.close()  # training is over (in-place training gives the base its tensors back)
    after = logits(model, inputs)
    delta.snapshot_heads(model)
    _CACHE[case.id] = Trained(case, base, model, delta, inputs, before, at_init, after, heads_before)
    return _CACHE[case.id]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_attach_then_train_changes_only_the_delta(case: Case) -> None:
    t = trained(case)
    if case.spec.identity_at_init:
        assert max_diff(t.at_init, t.before) <= 1e-6, "the output changed at attach time"
    assert max_diff(t.after, t.at_init) > 1e-4, "training did not change the output"
    heads = HEADS[case.arch]
    now, ref = dict(base_parameters(t.model, heads)), base_state(t.base, heads)
    assert set(now) == set(ref)
    changed = [n for n in ref if not torch.equal(now[n], ref[n])]
    assert not changed, f"base tensors modified by training: {changed[:5]}"
    part_ids = {id(p) for part in t.delta.parts.values() for p in part.parameters()}
    head_ids = {id(p) for h in heads for p in t.model.get_submodule(h).parameters()}
    trainable = {id(p) for p in t.model.parameters() if p.requires_grad}
    assert trainable == part_ids | head_ids
    assert t.delta.trainable_count == sum(p.numel() for p in t.model.parameters() if p.requires_grad) - sum(
        p.numel() for h in heads for p in t.model.get_submodule(h).parameters())
    for key, value in t.heads_before.items():
        h, k = key.split(".", 1)
        assert not torch.equal(t.delta.heads[h][k], value), f"head tensor {key} was not trained"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_apply_reproduces_trained_logits(case: Case, tmp_path) -> None:
    t = trained(case)
    loaded = deltatune.load_delta(deltatune.save_delta(t.delta, tmp_path / "delta"))
    assert loaded.method == case.method and set(loaded.parts) == set(t.delta.parts)
    for name, part in t.delta.parts.items():
        got = loaded.parts[name].state()
        assert all(torch.equal(got[k], v) for k, v in part.state().items()), f"{name}: tensors changed"
    fresh = copy.deepcopy(t.base)
    deltatune.apply_delta(fresh, loaded)
    assert max_diff(logits(fresh, t.inputs), t.after) <= TOL


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_matches_unmerged_or_is_refused(case: Case) -> None:
    t = trained(case)
    heads = HEADS[case.arch]
    fresh = copy.deepcopy(t.base)
    ref = base_state(t.base, heads)
    if not case.spec.capabilities()["additive"]:
        with pytest.raises(NotMergeable) as err:
            deltatune.apply_delta(fresh, t.delta, merge=True)
        assert err.value.kind and err.value.module is not None
        assert all(torch.equal(p, ref[n]) for n, p in base_parameters(fresh, heads)), "merge wrote weights"
        return
    deltatune.model.load_heads(fresh, t.delta)
    deltatune.merge_delta(fresh, t.delta)
    assert not any(isinstance(m, DeltaLayer) for m in fresh.modules())
    assert max_diff(logits(fresh, t.inputs), t.after) <= TOL
    deltatune.revert_delta(fresh, t.delta)
    worst = max(max_diff(p, ref[n]) for n, p in base_parameters(fresh, heads))
    assert worst <= 1e-6


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_detach_restores_the_base(case: Case) -> None:
    t = trained(case)
    model, delta = copy.deepcopy((t.model, t.delta))
    parts = deltatune.detach(model)
    assert set(parts) == set(delta.parts)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert not any(n.startswith("deltatune_") for n, _ in model.named_modules())
    for h, tensors in t.heads_before.items():  # the trained head stays in the model; put the initial one back
        mod, k = h.split(".", 1)
        model.get_submodule(mod).state_dict()[k].copy_(tensors)
    assert max_diff(logits(model, t.inputs), t.before) == 0.0


MIXED = ["case", None, "lora", "sparse"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mixed_batch_matches_each_row_alone(case: Case) -> None:
    t = trained(case)
    others = {"lora": deltatune.LoRAConfig(r=3), "sparse": deltatune.SparseConfig(num_tunable=777, regrow=False)}
    deltas = {"case": t.delta}
    for i, (name, cfg) in enumerate(others.items()):
        deltas[name] = randomize_delta(TINY_MODELS[case.arch](), cfg, 10 + i, 0.1 if name == "lora" else 0.5)
    inputs = tiny_inputs(case.arch, batch=len(MIXED), seed=5)
    model = copy.deepcopy(t.base)
    for name, d in deltas.items():
        deltatune.apply_delta(model, d, name=name)
    with deltatune.mixed_batch(model, MIXED):
        mixed = logits(model, inputs)
    for i, name in enumerate(MIXED):
        alone = copy.deepcopy(t.base)
        if name is not None:
            deltatune.apply_delta(alone, deltas[name])
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        assert max_diff(mixed[i:i + 1], logits(alone, row)) <= 1e-6, f"row {i} ({name})"
    assert max_diff(mixed[0:1], logits(t.base, {k: v[0:1] for k, v in inputs.items()})) > 1e-4, "vacuous"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_resume_from_checkpoint_is_bit_exact(case: Case, tmp_path) -> None:
    """4 steps straight = 2 steps, checkpoint, a fresh process-like restart (hooks first, then the trainable
    state, then the optimizer), 2 more steps."""
    config = case.config()
    inputs = tiny_inputs(case.arch)

    def fresh() -> tuple[nn.Module, deltatune.Delta]:
        torch.manual_seed(0)
        model = TINY_MODELS[case.arch]()
        return model, deltatune.attach(model, config)

    straight, d_straight = fresh()
    train_steps(straight, d_straight, config, inputs, 4, total=4)

    first, d_first = fresh()
    opt, hooks = train_steps(first, d_first, config, inputs, 2, total=4)
    payload = {"trainable": ckpt.trainable_state(first, d_first), "optimizer": opt.state_dict(), "scheduler": {},
               "hooks": [h.state_dict() for h in hooks], "step": 2, "epoch": 0, "offset": 0, "before": {},
               "best": None, "history": [], "rng": [ckpt.rng_state()]}
    ckpt.save_checkpoint(tmp_path / "ckpt", payload)

    resumed, d_resumed = fresh()
    method = get_method(config.method)
    opt2 = method.optimizer([p for p in resumed.parameters() if p.requires_grad], LR, 0.0, config)
    hooks2 = method.hooks(resumed, d_resumed, config, opt2, 4, 1)
    state = ckpt.load_checkpoint(tmp_path / "ckpt")
    for hook, hs in zip(hooks2, state["hooks"], strict=True):
        hook.load_state_dict(hs)
    ckpt.restore_trainable(resumed, state["trainable"], tmp_path, d_resumed)
    opt2.load_state_dict(state["optimizer"])
    ckpt.set_rng_state(state["rng"][0], tmp_path)  # dropout continues where it stopped
    train_steps(resumed, d_resumed, config, inputs, 2, start=2, optimizer=opt2, hooks=hooks2, total=4)
    for name, part in d_straight.parts.items():
        got = d_resumed.parts[name].state()
        for k, v in part.state().items():
            assert torch.equal(got[k], v), f"{name}.{k} differs after resuming"


def test_every_method_has_examples_and_capabilities() -> None:
    for name, method in METHODS.items():
        assert method.examples, f"{name} declares no example configs"
        assert method.part_kinds, f"{name} declares no part kinds"
        for mapping in method.examples.values():
            deltatune.make_config(name, dict(mapping))  # every example is a valid config
