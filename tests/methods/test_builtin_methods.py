"""LoRA, sparse and full fine-tuning specifics on tiny random Llama, GPT-2 (Conv1D) and BERT models (the
contract every method keeps is tests/methods/test_matrix.py, driven by the registry).

For every combination: the output is unchanged at attach time; a few optimiser steps change the output
and only the delta (and the task head); save → load → apply on a fresh base reproduces the trained
logits; merging into a fresh base gives the same logits and reverting restores the base weights; the
trainable count is what the method promises.  Mixed batches (one delta per row) match running each row
alone with only its delta.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import TINY_MODELS, base_state, logits, max_diff, randomize_delta, tiny_inputs
from torch import nn

import deltatune
from deltatune.errors import DeltaFormatError
from deltatune.fingerprint import base_parameters
from deltatune.layer import DeltaLayer
from deltatune.model import attach_parts, load_heads, tied_aliases
from deltatune.parts import LoRAPart, SparsePart

ARCHS = ("llama", "gpt2", "bert")
EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}
EMBEDDING_PATH = {"llama": "model.embed_tokens", "gpt2": "transformer.wte",
                  "bert": "bert.embeddings.word_embeddings"}
HEADS = {"llama": [], "gpt2": [], "bert": ["classifier"]}
NUM_TUNABLE = 777
STEPS = 3
LR = 1e-2
INIT_TOL = 1e-6
TOL = 1e-5

# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    method: str
    variant: str
    arch: str

    @property
    def id(self) -> str:
        return f"{self.method}{'-' + self.variant if self.variant else ''}-{self.arch}"

    def config(self) -> Any:
        emb = [EMBEDDING[self.arch]]
        if self.method == "lora":
            if self.variant == "rslora":
                return deltatune.LoRAConfig(r=4, alpha=4.0, rslora=True)
            if self.variant == "embedding":
                return deltatune.LoRAConfig(r=2, alpha=4.0, targets=emb)
            return deltatune.LoRAConfig(r=2, alpha=4.0)
        if self.method == "sparse":
            targets = emb if self.variant == "embedding" else ["all-linear"]
            return deltatune.SparseConfig(num_tunable=NUM_TUNABLE, regrow=False, targets=targets)
        return deltatune.FullConfig()

pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [Case(m, v, a) for m, v in [("lora", ""), ("lora", "rslora"), ("lora", "embedding"), ("sparse", ""),
                                    ("sparse", "embedding"), ("full", "")] for a in ARCHS]


def params(xfail: dict[str, str] | None = None) -> list[Any]:
    xfail = xfail or {}
    return [pytest.param(c, id=c.id,
                         marks=[pytest.mark.xfail(strict=True, reason=xfail[c.id])] if c.id in xfail else [])
            for c in CASES]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def base_count(model: nn.Module, heads: list[str]) -> int:
    """Every base parameter (tied tensors once), task heads excluded — independent of deltatune."""
    return sum(p.numel() for n, p in model.named_parameters()
               if not any(n.startswith(h + ".") for h in heads))


def linear_targets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``all-linear`` as documented: Linear/Conv1D modules except the LM head and task heads → (in, out)."""
    out = {}
    for name, m in model.named_modules():
        if name in ("lm_head", "classifier"):
            continue
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif type(m).__name__ == "Conv1D":
            out[name] = tuple(m.weight.shape)
    return out


def expected_lora_targets(case: Case, model: nn.Module) -> dict[str, tuple[int, int]]:
    if case.variant == "embedding":
        emb = model.get_submodule(EMBEDDING_PATH[case.arch])
        return {EMBEDDING_PATH[case.arch]: (emb.num_embeddings, emb.embedding_dim)}
    return linear_targets(model)


def make_optimizer(method: str, model: nn.Module, config: Any) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return deltatune.get_method(method).optimizer(trainable, LR, 0.0, config)


@dataclass
class Trained:
    case: Case
    base: nn.Module  # untouched deepcopy taken before attach
    model: nn.Module  # base + attached, trained delta
    delta: deltatune.Delta
    inputs: dict[str, torch.Tensor]
    before: torch.Tensor  # base logits
    at_init: torch.Tensor  # logits right after attach
    after: torch.Tensor  # logits after training
    heads_before: dict[str, torch.Tensor] = field(default_factory=dict)
    zero_at_init: bool = True


_CACHE: dict[str, Trained] = {}




def trained(case: Case) -> Trained:
    """Attach ``case`` to a fresh tiny model and take a few optimiser steps (cached per module: read only)."""
    if case.id in _CACHE:
        return _CACHE[case.id]
    model = TINY_MODELS[case.arch]()
    base = copy.deepcopy(model)
    inputs = tiny_inputs(case.arch)
    before = logits(model, inputs)
    config = case.config()
    delta = deltatune.attach(model, config)
    at_init = logits(model, inputs)
    with torch.no_grad():
        zero_at_init = all(float(p.delta_weight().abs().max()) == 0.0 for p in delta.parts.values())
    heads_before = {f"{h}.{k}": v.detach().clone() for h in HEADS[case.arch]
                    for k, v in model.get_submodule(h).state_dict().items()}
    opt = make_optimizer(case.method, model, config)
    for _ in range(STEPS):
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = logits(model, inputs)
    delta.snapshot_heads(model)
    _CACHE[case.id] = Trained(case, base, model, delta, inputs, before, at_init, after, heads_before,
                              zero_at_init)
    return _CACHE[case.id]


# --------------------------------------------------------------------------------------------------
# (a) … (e) per case
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", params())
def test_output_unchanged_at_init(case: Case) -> None:
    t = trained(case)
    assert t.zero_at_init, "every part's ΔW must be exactly zero right after attach"
    assert max_diff(t.at_init, t.before) <= INIT_TOL
    assert t.delta.method == case.method
    assert set(t.delta.heads) == set(HEADS[case.arch])
    wrapped = {n for n, m in t.model.named_modules() if isinstance(m, DeltaLayer)}
    aliases = {a for n in t.delta.parts for a in tied_aliases(t.model, n)}  # GPT-2: lm_head shares wte.weight
    assert wrapped == set(t.delta.parts) | aliases


@pytest.mark.parametrize("case", params())
def test_training_changes_only_the_delta_and_heads(case: Case) -> None:
    t = trained(case)
    assert max_diff(t.after, t.before) > 1e-3, "training did not change the output"
    heads = HEADS[case.arch]
    # base tensors: bit-identical to the copy taken before attach, and frozen
    now = dict(base_parameters(t.model, heads))
    ref = base_state(t.base, heads)
    assert set(now) == set(ref)
    changed = [n for n in ref if not torch.equal(now[n], ref[n])]
    assert not changed, f"base tensors modified by training: {changed[:5]}"
    assert not any(p.requires_grad for p in now.values())
    # what is trainable is exactly the parts plus the heads
    part_ids = {id(p) for part in t.delta.parts.values() for p in part.parameters()}
    head_ids = {id(p) for h in heads for p in t.model.get_submodule(h).parameters()}
    trainable_ids = {id(p) for p in t.model.parameters() if p.requires_grad}
    assert trainable_ids == part_ids | head_ids
    with torch.no_grad():
        assert any(float(p.delta_weight().abs().max()) > 0 for p in t.delta.parts.values())
    for key, value in t.heads_before.items():
        h, k = key.split(".", 1)
        assert not torch.equal(t.delta.heads[h][k], value), f"head tensor {key} was not trained"


@pytest.mark.parametrize("case", params())
def test_save_load_apply_reproduces_trained_logits(case: Case, tmp_path) -> None:
    t = trained(case)
    path = deltatune.save_delta(t.delta, tmp_path / "delta")
    loaded = deltatune.load_delta(path)
    assert loaded.method == case.method
    assert set(loaded.parts) == set(t.delta.parts)
    assert loaded.trainable_count == t.delta.trainable_count
    assert loaded.fingerprint == t.delta.fingerprint
    fresh = copy.deepcopy(t.base)
    deltatune.apply_delta(fresh, loaded)
    assert max_diff(logits(fresh, t.inputs), t.after) <= TOL




@pytest.mark.parametrize("case", params())
def test_detach_then_merge_into_fresh_base_matches(case: Case) -> None:
    t = trained(case)
    model, delta = copy.deepcopy((t.model, t.delta))
    parts = deltatune.detach(model)
    assert set(parts) == set(delta.parts)
    assert all(parts[n] is delta.parts[n] for n in parts)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    # the detached model is the base again (plus the trained head)
    heads = HEADS[case.arch]
    ref = base_state(t.base, heads)
    assert all(torch.equal(p, ref[n]) for n, p in base_parameters(model, heads))
    fresh = copy.deepcopy(t.base)
    load_heads(fresh, delta)
    deltatune.merge_delta(fresh, delta)
    assert not any(isinstance(m, DeltaLayer) for m in fresh.modules())
    assert max_diff(logits(fresh, t.inputs), t.after) <= TOL


@pytest.mark.parametrize("case", params())
def test_revert_restores_base_weights(case: Case) -> None:
    t = trained(case)
    heads = HEADS[case.arch]
    fresh = copy.deepcopy(t.base)
    deltatune.merge_delta(fresh, t.delta)
    ref = base_state(t.base, heads)
    merged = base_state(fresh, heads)
    assert any(not torch.equal(merged[n], ref[n]) for n in ref), "merge changed no base weight"
    deltatune.revert_delta(fresh, t.delta)
    worst = max(max_diff(p, ref[n]) for n, p in base_parameters(fresh, heads))
    assert worst <= 1e-6


@pytest.mark.parametrize("case", params())
def test_trainable_count(case: Case) -> None:
    t = trained(case)
    heads = HEADS[case.arch]
    head_numel = sum(p.numel() for h in heads for p in t.model.get_submodule(h).parameters())
    live = sum(p.numel() for p in t.model.parameters() if p.requires_grad) - head_numel
    assert live == t.delta.trainable_count
    assert t.delta.head_count == head_numel
    if case.method == "lora":
        cfg = case.config()
        targets = expected_lora_targets(case, t.base)
        assert set(t.delta.parts) == set(targets)
        assert t.delta.trainable_count == sum(cfg.r * (i + o) for i, o in targets.values())
        for name, part in t.delta.parts.items():
            assert isinstance(part, LoRAPart)
            assert (part.in_features, part.out_features, part.rank) == (*targets[name], cfg.r)
    elif case.method == "sparse":
        assert t.delta.trainable_count == NUM_TUNABLE
        allowed = (set(expected_lora_targets(case, t.base)) if case.variant == "embedding"
                   else set(linear_targets(t.base)))
        assert set(t.delta.parts) <= allowed
        for part in t.delta.parts.values():
            assert isinstance(part, SparsePart)
            idx = part.indices
            assert idx.unique().numel() == idx.numel(), "duplicate sparse indices"
            assert bool((idx[1:] > idx[:-1]).all()), "sparse indices are not sorted"
            assert int(idx.min()) >= 0 and int(idx.max()) < part.numel_base
    else:
        assert t.delta.trainable_count == base_count(t.base, heads)


@pytest.mark.parametrize("arch", ARCHS)
def test_rslora_scale_is_alpha_over_sqrt_r(arch: str) -> None:
    model = TINY_MODELS[arch]()
    delta = deltatune.attach(model, deltatune.LoRAConfig(r=4, alpha=6.0, rslora=True))
    plain = deltatune.attach(TINY_MODELS[arch](), deltatune.LoRAConfig(r=4, alpha=6.0))
    assert {p.scale for p in delta.parts.values()} == {6.0 / math.sqrt(4)}
    assert {p.scale for p in plain.parts.values()} == {6.0 / 4}


# --------------------------------------------------------------------------------------------------
# sparse specifics
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_density_gives_exact_count(arch: str) -> None:
    model = TINY_MODELS[arch]()
    n = base_count(model, HEADS[arch])
    delta = deltatune.attach(model, deltatune.SparseConfig(density=0.01, regrow=False))
    assert delta.trainable_count == n // 100  # ⌊0.01 · N⌋ in exact integer arithmetic
    assert sum(p.numel() for part in delta.parts.values() for p in part.parameters()) == n // 100
    assert delta.fingerprint["num_params"] == n


@pytest.mark.parametrize("targets", ["all-linear", "embedding"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_backward_leaves_no_grad_on_base_weights(arch: str, targets: str) -> None:
    model = TINY_MODELS[arch]()
    config = deltatune.SparseConfig(num_tunable=NUM_TUNABLE, regrow=False,
                                    targets=[EMBEDDING[arch] if targets == "embedding" else targets])
    delta = deltatune.attach(model, config)
    model.train()
    model(**tiny_inputs(arch)).loss.backward()
    heads = HEADS[arch]
    with_grad = [n for n, p in base_parameters(model, heads) if p.grad is not None]
    assert not with_grad, f"base tensors got a .grad: {with_grad[:5]}"
    for name, part in delta.parts.items():
        g = part.values.grad
        assert g is not None, f"{name}: no gradient on the sparse values"
        assert g.shape == part.values.shape == (part.indices.numel(),)
        assert bool(torch.isfinite(g).all())
    assert any(float(part.values.grad.abs().max()) > 0 for part in delta.parts.values())
    # the wrapped base modules' own weights have no grad either (seen through the DeltaLayer)
    for name in delta.parts:
        assert model.get_submodule(name).base.weight.grad is None


# --------------------------------------------------------------------------------------------------
# mixed batches
# --------------------------------------------------------------------------------------------------
MIXED = ["a", None, "b"]


def saved_random_delta(arch: str, config: Any, seed: int, std: float, tmp_path, name: str) -> deltatune.Delta:
    """A delta on a fresh base copy with random (non-zero) part tensors, saved and loaded back."""
    delta = randomize_delta(TINY_MODELS[arch](), config, seed, std)
    return deltatune.load_delta(deltatune.save_delta(delta, tmp_path / name))


MIXED_CASES = [
    ("lora", "llama"), ("lora", "bert"), ("lora", "gpt2"),
    ("lora-embedding", "llama"), ("lora-embedding", "bert"),
    ("sparse", "llama"), ("sparse", "bert"), ("sparse", "gpt2"),
]


@pytest.mark.parametrize(("kind", "arch"), MIXED_CASES, ids=[f"{k}-{a}" for k, a in MIXED_CASES])
def test_mixed_batch_matches_each_row_alone(kind: str, arch: str, tmp_path) -> None:
    if kind == "lora":  # different ranks: exercises the zero padding to r_max
        cfg_a, cfg_b, std = deltatune.LoRAConfig(r=2), deltatune.LoRAConfig(r=4), 0.1
    elif kind == "lora-embedding":
        cfg_a = deltatune.LoRAConfig(r=2, targets=[EMBEDDING[arch]])
        cfg_b = deltatune.LoRAConfig(r=3, targets=[EMBEDDING[arch]])
        std = 0.1
    else:  # generic Part.mixed_forward path, different random supports
        cfg_a = deltatune.SparseConfig(num_tunable=NUM_TUNABLE, regrow=False, seed=1)
        cfg_b = deltatune.SparseConfig(num_tunable=NUM_TUNABLE, regrow=False, seed=2)
        std = 0.5
    da = saved_random_delta(arch, cfg_a, 10, std, tmp_path, "a")
    db = saved_random_delta(arch, cfg_b, 20, std, tmp_path, "b")
    model = TINY_MODELS[arch]()
    attach_parts(model, da.parts, "a")
    attach_parts(model, db.parts, "b")
    inputs = tiny_inputs(arch)
    with deltatune.mixed_batch(model, MIXED):
        mixed = logits(model, inputs)

    bare = TINY_MODELS[arch]()
    for i, delta in enumerate([da, None, db]):
        ref_model = TINY_MODELS[arch]()
        if delta is not None:
            deltatune.apply_delta(ref_model, delta)  # only this delta attached (and active)
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        ref = logits(ref_model, row)
        assert max_diff(mixed[i:i + 1], ref) <= TOL, f"row {i} ({MIXED[i]})"
        if delta is not None:
            assert max_diff(ref, logits(bare, row)) > 1e-3, "the delta does not change this row (vacuous)"


def test_mixed_batch_unknown_name_is_refused() -> None:
    model = TINY_MODELS["llama"]()
    deltatune.attach(model, deltatune.LoRAConfig(r=2), name="a")
    with pytest.raises(DeltaFormatError, match="nope"), deltatune.mixed_batch(model, ["a", "nope"]):
        pass
