"""AdamWRows: a row-sparse gradient (``nn.Embedding(sparse=True)``) trained with exact AdamW and state only for the
rows looked up; dense parameters beside it take AdamW's own step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.adamw_rows import AdamWRows

BATCHES = [[3, 7, 7, 1], [7, 9], [0, 3, 3, 3], [12], [5, 1, 9, 12, 13], [2]]


def _pair(wd: float, lr: float = 1e-2, vocab: int = 32, **options):
    torch.manual_seed(0)
    dense = nn.Embedding(vocab, 4)
    rows = nn.Embedding(vocab, 4, sparse=True)
    rows.load_state_dict(dense.state_dict())
    head_d, head_r = nn.Linear(4, 1), nn.Linear(4, 1)
    head_r.load_state_dict(head_d.state_dict())
    opt_d = torch.optim.AdamW([*dense.parameters(), *head_d.parameters()], lr=lr, weight_decay=wd, **options)
    opt_r = AdamWRows([*rows.parameters(), *head_r.parameters()], lr=lr, weight_decay=wd, **options)
    return (dense, head_d, opt_d), (rows, head_r, opt_r)


def _step(emb, head, opt, ids, target):
    loss = (head(emb(torch.tensor(ids))).squeeze(-1) - target).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_row_sparse_steps_equal_dense_adamw_with_state_for_looked_up_rows_only(wd):
    (dense, head_d, opt_d), (rows, head_r, opt_r) = _pair(wd)
    seen: set[int] = set()
    for i, ids in enumerate(BATCHES):
        _step(dense, head_d, opt_d, ids, float(i))
        _step(rows, head_r, opt_r, ids, float(i))
        seen |= set(ids)
        st = opt_r.state[rows.weight]
        assert st["rows"].tolist() == sorted(seen)  # a row joins when first looked up, and stays
        assert st["exp_avg"].shape == (len(seen), 4)
        # a row looked up earlier keeps moving on momentum alone, as in dense AdamW
        torch.testing.assert_close(rows.weight, dense.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(head_r.weight, head_d.weight, rtol=1e-6, atol=1e-7)
    never = sorted(set(range(32)) - seen)
    torch.manual_seed(0)
    start = nn.Embedding(32, 4).weight.detach()
    decay = (1 - 1e-2 * wd) ** len(BATCHES)
    torch.testing.assert_close(rows.weight.detach()[never], start[never] * decay)  # never looked up: decay alone


def test_state_survives_a_save_and_load_with_int64_rows():
    (_, _, _), (rows, head, opt) = _pair(0.0)
    (_, _, _), (rows2, head2, opt2) = _pair(0.0)
    for i, ids in enumerate(BATCHES[:3]):
        _step(rows, head, opt, ids, float(i))
        _step(rows2, head2, opt2, ids, float(i))
    saved = opt.state_dict()
    (_, _, _), (rows3, head3, opt3) = _pair(0.0)
    rows3.load_state_dict(rows.state_dict())
    head3.load_state_dict(head.state_dict())
    opt3.load_state_dict(saved)
    assert opt3.state[rows3.weight]["rows"].dtype == torch.long
    for i, ids in enumerate(BATCHES[3:]):
        _step(rows2, head2, opt2, ids, float(i))
        _step(rows3, head3, opt3, ids, float(i))
    assert torch.equal(rows3.weight, rows2.weight)


def test_a_dense_gradient_after_row_steps_continues_as_dense_adamw():
    (dense, head_d, opt_d), (rows, head_r, opt_r) = _pair(0.0)
    for i, ids in enumerate(BATCHES[:3]):
        _step(dense, head_d, opt_d, ids, float(i))
        _step(rows, head_r, opt_r, ids, float(i))
    rows.sparse = False  # now read densely (as a tied weight would be)
    for i, ids in enumerate(BATCHES[3:]):
        _step(dense, head_d, opt_d, ids, float(i))
        _step(rows, head_r, opt_r, ids, float(i))
    assert "rows" not in opt_r.state[rows.weight]
    torch.testing.assert_close(rows.weight, dense.weight, rtol=1e-6, atol=1e-7)


def test_past_half_the_rows_every_row_is_kept_and_the_steps_still_equal_dense_adamw():
    (dense, head_d, opt_d), (rows, head_r, opt_r) = _pair(0.0, vocab=16)
    for i, ids in enumerate(BATCHES):  # 9 of 16 rows looked up by the fifth batch
        _step(dense, head_d, opt_d, ids, float(i))
        _step(rows, head_r, opt_r, ids, float(i))
        known = opt_r.state[rows.weight]["rows"]
        assert known.numel() in (len({j for b in BATCHES[:i + 1] for j in b}), 16)
    assert torch.equal(known, torch.arange(16))
    torch.testing.assert_close(rows.weight, dense.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("option", ["amsgrad", "maximize"])
def test_options_the_row_step_lacks_are_refused(option):
    _, (rows, head, opt) = _pair(0.0, **{option: True})
    with pytest.raises(ConfigError, match=option):
        _step(rows, head, opt, [1, 2], 0.0)


def test_under_a_grad_scaler_rows_are_unscaled_and_an_inf_step_is_skipped():
    (dense, head_d, opt_d), (rows, head_r, opt_r) = _pair(0.0, fused=True)
    scaler_d, scaler_r = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    for i, ids in enumerate(BATCHES):
        target = float("inf") if i == 2 else float(i)  # an overflowing step: skipped by both
        for emb, head, opt, scaler in ((dense, head_d, opt_d, scaler_d), (rows, head_r, opt_r, scaler_r)):
            loss = (head(emb(torch.tensor(ids))).squeeze(-1) - target).pow(2).mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        assert torch.isfinite(rows.weight).all()
        torch.testing.assert_close(rows.weight, dense.weight, rtol=1e-6, atol=1e-7)


def test_step_hooks_run_once_and_never_see_a_hidden_gradient():
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])  # a plain AdamW exists: torch has wrapped AdamW.step too
    _, (rows, head, opt) = _pair(0.0)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", rows.weight.grad is not None)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", rows.weight.grad is not None)))
    _step(rows, head, opt, [1, 2], 0.0)
    assert calls == [("pre", True), ("post", True)]


def test_a_closure_is_evaluated_with_gradients_on_and_its_loss_returned():
    _, (rows, head, opt) = _pair(0.0)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = head(rows(torch.tensor([1, 2]))).sum()
        loss.backward()
        return loss

    before = rows.weight.detach().clone()
    loss = opt.step(closure)
    assert loss.requires_grad and not torch.equal(rows.weight, before)
