"""LT-SFT learns: the masked phase runs on a restarted learning-rate schedule (the reference's fresh scheduler per
phase), and on real SST-2 rows the final sparse delta clearly beats the head-only score and keeps up with phase 1's
full fine-tuning.

The bug (issue 10, benchmarks/results/composability.md): the masked phase, which makes the saved delta, ran on the
tail of the run's one linear decay (from about half the peak LR down to 0), so its K entries barely moved and the
delta scored like the task head alone (SST-2 0.524 against head-only 0.512)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_MODELS, hooked_steps, tiny_inputs

import deltatune
from deltatune.errors import ConfigError
from deltatune.methods import get_method
from deltatune.methods.lt_sft import LTSFTPhases, replay_step
from deltatune.train.integration import param_groups
from deltatune.train.loop import lr_lambda

pytestmark = pytest.mark.usefixtures("one_thread")


def test_replay_step_compresses_the_run_into_the_masked_phase_and_never_looks_ahead() -> None:
    for total in (2, 3, 10, 97, 300):
        for switch in range(1, total):
            steps = total - switch
            got = [replay_step(j, steps, total) for j in range(steps)]
            assert got[0] == 0 and got == sorted(got)
            assert all(at <= switch + j for j, at in enumerate(got)), "replays a step whose LR was not seen yet"
            assert got[-1] >= total - total // steps - 1  # the replay reaches the end of the run's schedule
    with pytest.raises(ConfigError):
        replay_step(5, 5, 10)
    with pytest.raises(ConfigError):
        replay_step(0, 11, 10)


def _train_tiny(schedule: str, total: int = 12, switch: int = 4, warmup_ratio: float = 0.25):
    """Tiny BERT with the loop's parameter groups, its LR schedule (``loop.lr_lambda``) and LambdaLR; returns the LRs
    each AdamW step used (one per group), the schedule function, the phase hook, the optimiser and the scheduler."""
    from deltatune.train.config import TrainConfig

    model = TINY_MODELS["bert"]()
    inputs = tiny_inputs("bert")
    config = deltatune.make_config("lt-sft", {"num_tunable": 300, "full_steps": switch, "phase_schedule": schedule})
    delta = deltatune.attach(model, config)
    method = get_method("lt-sft")
    optimizer = method.optimizer(param_groups(model, delta, 1e-3), 1e-3, 0.0, config)
    cfg = TrainConfig(out_dir="unused", max_steps=total, warmup_ratio=warmup_ratio, lr_schedule="linear")
    fn = lr_lambda(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
    hooks = method.hooks(model, delta, config, optimizer, total, 1)
    used: list[list[float]] = []
    parent = torch.optim.AdamW.step

    def parent_step(self, closure=None):  # what the parent AdamW step sees: LTSFTAdamW's override is in place
        used.append([g["lr"] for g in self.param_groups])
        return parent(self, closure)

    model.train()
    torch.optim.AdamW.step = parent_step
    try:
        for step in range(total):
            hooked_steps(model, optimizer, hooks, inputs, step, step + 1)
            scheduler.step()
    finally:
        torch.optim.AdamW.step = parent
    return used, fn, hooks[0], optimizer, scheduler


def test_masked_phase_restarts_the_schedule_for_every_group() -> None:
    total, switch = 12, 4
    used, fn, hook, optimizer, scheduler = _train_tiny("restart", total, switch)
    peak = [g["initial_lr"] for g in optimizer.param_groups]
    assert len(peak) == 2 and peak[1] > peak[0], "expected the delta group and the (faster) head group"
    for step in range(switch):  # phase 1: the run's own schedule
        assert used[step] == pytest.approx([p * fn(step) for p in peak])
    for j in range(total - switch):  # masked phase: the run's schedule replayed over its own steps
        want = fn(replay_step(j, total - switch, total))
        assert used[switch + j] == pytest.approx([p * want for p in peak])
    assert used[switch] == pytest.approx(used[0]), "the masked phase does not start over from the warm-up"
    assert max(u[0] for u in used[switch:]) == pytest.approx(peak[0]), "the masked phase never reaches the peak LR"
    # the override lasts one step: the groups hold the scheduler's own values again
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(scheduler.get_last_lr())
    # the masked phase's LR mass is the run's, not the tail's
    mass_restart = sum(u[0] for u in used[switch:])
    assert mass_restart > 1.1 * sum(peak[0] * fn(s) for s in range(switch, total))


def test_continue_keeps_the_tail_of_the_run_schedule() -> None:
    total, switch = 12, 4
    used, fn, _, optimizer, _ = _train_tiny("continue", total, switch)
    peak = [g["initial_lr"] for g in optimizer.param_groups]
    for step in range(total):
        assert used[step] == pytest.approx([p * fn(step) for p in peak])


def test_hook_state_carries_the_lr_record_and_a_missing_record_is_a_config_error() -> None:
    _, _, hook, optimizer, _ = _train_tiny("restart", 12, 4)
    state = hook.state_dict()
    assert len(state["lr_factors"]) == 12
    model = TINY_MODELS["bert"]()
    config = deltatune.make_config("lt-sft", {"num_tunable": 300, "full_steps": 4})
    delta = deltatune.attach(model, config)
    method = get_method("lt-sft")
    opt = method.optimizer(param_groups(model, delta, 1e-3), 1e-3, 0.0, config)
    fresh = method.hooks(model, delta, config, opt, 12, 1)[0]
    assert isinstance(fresh, LTSFTPhases)
    fresh.load_state_dict(state)
    assert fresh.lr_factors == state["lr_factors"] and fresh.phase == 2
    fresh.load_state_dict({**state, "lr_factors": []})  # a record without the LR factors (older checkpoint)
    with pytest.raises(ConfigError, match="never recorded"):
        fresh.before_step(6)


@pytest.mark.parametrize("bad", ["restart-all", ""])
def test_bad_phase_schedule_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="phase_schedule"):
        deltatune.make_config("lt-sft", {"phase_schedule": bad})


def _sst2_run(tmp_path, monkeypatch, steps: int, mapping: dict) -> dict[str, float]:
    """LT-SFT on SST-2 through ``loop.train`` (the benchmarks' code path): MiniLM, batch 16, max length 64, LR 5e-4,
    accuracy on the first 400 dev rows after phase 1 (full FT), at the end (the sparse delta), and of the trained
    head alone on the base."""
    from deltatune.api import evaluate_delta
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig
    from deltatune.train.evaluate import evaluate
    from deltatune.train.tasks import build_task

    cfg = TrainConfig(task="sst2", out_dir=str(tmp_path / "run"), max_steps=steps, batch_size=16, max_length=64,
                      lr=5e-4, eval_limit=400, eval_every=0, eval_before=False, checkpoint_every=0, keep_best=False,
                      progress=False)
    task = build_task(cfg)
    seen: dict[str, float] = {}
    switch = LTSFTPhases.after_step

    def after_step(self, step: int) -> None:
        if self.phase == 1 and step >= self.switch_at:
            seen["full_ft"] = evaluate(self.model, task, 64, torch.device("cpu"))["accuracy"]
            self.model.train()
        switch(self, step)

    monkeypatch.setattr(LTSFTPhases, "after_step", after_step)
    result = loop.train(cfg, deltatune.make_config("lt-sft", {"num_tunable": 337_920, **mapping}))
    seen["final"] = result.final["accuracy"]
    head = dataclasses.replace(result.delta, parts={})
    seen["head_only"] = evaluate_delta(head, task="sst2", limit=400)["delta"]["accuracy"]
    return seen


@pytest.mark.slow
def test_lt_sft_learns_sst2(tmp_path, data_dir, monkeypatch) -> None:
    """120 steps (30 full FT + 90 masked), K = 337,920 (the composability benchmark's budget).  Measured 2026-12-06
    (1 thread, shared 2-core CPU, ~4 min): full FT after phase 1 0.605, final sparse delta 0.7475;
    before the fix (phase_schedule "continue", full_fraction 0.5, LR 2e-4 as the benchmark passed) final 0.52."""
    got = _sst2_run(tmp_path, monkeypatch, 120, {})
    assert got["final"] >= got["head_only"] + 0.12, got
    assert got["final"] >= got["full_ft"] - 0.05, got
