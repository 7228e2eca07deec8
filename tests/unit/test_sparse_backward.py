"""The sparse backward computes only the k needed weight-gradient entries (SDDMM), equal to the dense reference."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import RecordingObserver
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune.parts.sparse as sparse_mod
import deltatune.parts.sparse_grad as grad_mod
from deltatune.parts.layers import LayerKind, weight_grad
from deltatune.parts.sparse import SparseDeltaFunction, SparsePart
from deltatune.parts.sparse_grad import (
    SAMPLED_GRAD_MAX_DENSITY,
    live_tokens,
    sampled_weight_grad,
    token_major,
    use_sampled_grad,
)


def _support(numel: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _base(kind: LayerKind, d_in: int, d_out: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    module = nn.Linear(d_in, d_out) if kind is LayerKind.LINEAR else Conv1D(d_out, d_in)
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    return module.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("kind", [LayerKind.LINEAR, LayerKind.CONV1D])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sampled_grad_equals_dense_gather(kind, index_dtype):
    d_in, d_out, tokens = 24, 40, 37
    shape = (d_out, d_in) if kind is LayerKind.LINEAR else (d_in, d_out)
    g = torch.Generator().manual_seed(1)
    x, grad_out = torch.randn(3, tokens, d_in, generator=g), torch.randn(3, tokens, d_out, generator=g)
    idx = _support(d_in * d_out, 50, 2).to(index_dtype)
    got = sampled_weight_grad(kind, x, grad_out, shape, idx)
    ref = weight_grad(kind, x, grad_out, torch.Size(shape)).reshape(-1)[idx.long()]
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    got64 = sampled_weight_grad(kind, x.double(), grad_out.double(), shape, idx)
    ref64 = weight_grad(kind, x.double(), grad_out.double(), torch.Size(shape)).reshape(-1)[idx.long()]
    assert got64.dtype == torch.float64 and torch.allclose(got64, ref64, rtol=1e-12, atol=1e-12)
    # the entries are where they belong: a 1-entry support picks exactly that (r, c) of the dense gradient
    one = sampled_weight_grad(kind, x, grad_out, shape, idx[7:8])
    assert torch.allclose(one, ref[7:8], rtol=1e-5, atol=0)


@pytest.mark.parametrize("width", [48, 40])  # a multiple of the strip (two-pass copy) and not (plain transpose)
def test_token_major_is_the_transpose_of_the_kept_rows(width):
    m = torch.randn(29, width, generator=torch.Generator().manual_seed(5))
    assert torch.equal(token_major(m), m.t()) and token_major(m).is_contiguous()
    rows = torch.tensor([0, 3, 4, 17, 28])
    kept = token_major(m, rows)
    assert kept.shape == (width, 5) and kept.is_contiguous() and torch.equal(kept, m[rows].t())
    assert torch.equal(token_major(m.t().contiguous().t()), m.t())  # a strided source: the plain transpose
    assert token_major(m, torch.zeros(0, dtype=torch.long)).shape == (width, 0)
    first, second = token_major(m), token_major(m * 2)  # the strips' scratch buffer is reused: results own memory
    assert torch.equal(first, m.t()) and torch.equal(second, 2 * m.t())


@pytest.mark.parametrize("tokens", [1, 5])
def test_token_major_of_one_strip_owns_its_memory(tokens):
    """One 16-wide strip (or one token): the transposed strips would reshape to a view of the scratch buffer, which
    the next call overwrites."""
    m = torch.randn(tokens, 16)
    first = token_major(m)
    token_major(torch.zeros(tokens, 16))
    assert torch.equal(first, m.t()) and first.is_contiguous()


def test_live_tokens_finds_all_zero_rows_only_when_worth_a_gather():
    g = torch.randn(40, 16, generator=torch.Generator().manual_seed(6))
    assert live_tokens(g) is None  # no dead row
    g[[1, 5, 6, 7, 30]] = 0  # 5 of 40 = 12.5 %: gathered
    g[9, 0] = 0  # zero in column 0 only: live
    g[11, 3] = float("nan")
    g[11, 0] = 0  # a NaN row stays live (its NaN must reach the gradient)
    live = live_tokens(g)
    assert live is not None and set(range(40)) - set(live.tolist()) == {1, 5, 6, 7, 30}
    g[30] = 1.0  # 4 of 40 dead: not worth a gather
    assert live_tokens(g) is None


@pytest.mark.parametrize("kind", [LayerKind.LINEAR, LayerKind.CONV1D])
def test_sampled_grad_skips_dead_tokens_exactly(kind):
    """A padded batch: positions whose output gradient is all zero are left out of the SDDMM (strip-width
    features, so the two-pass transposes run), and the entries equal the dense reference; a batch of dead
    positions only gives zeros."""
    d_in, d_out, tokens = 32, 48, 50
    shape = (d_out, d_in) if kind is LayerKind.LINEAR else (d_in, d_out)
    g = torch.Generator().manual_seed(7)
    x, grad_out = torch.randn(2, tokens, d_in, generator=g), torch.randn(2, tokens, d_out, generator=g)
    grad_out[0, 20:] = 0
    grad_out[1, 35:] = 0
    idx = _support(d_in * d_out, 90, 8).to(torch.int32)
    assert live_tokens(grad_out.reshape(-1, d_out)).numel() == 55
    got = sampled_weight_grad(kind, x, grad_out, shape, idx)
    ref = weight_grad(kind, x, grad_out, torch.Size(shape)).reshape(-1)[idx.long()]
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    zeros = sampled_weight_grad(kind, x, torch.zeros_like(grad_out), shape, idx)
    assert zeros.shape == (90,) and not bool(zeros.any())


def _parts_with_values(n: int, d_in: int = 32, d_out: int = 48) -> tuple[list[SparsePart], list[nn.Module]]:
    bases = [_base(LayerKind.LINEAR, d_in, d_out) for _ in range(n)]
    parts = [SparsePart((d_out, d_in), _support(d_out * d_in, 60, seed), LayerKind.LINEAR) for seed in range(n)]
    for p in parts:
        with torch.no_grad():
            p.values.normal_()
    return parts, bases


def _dense_values_grad(part: SparsePart, base: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    w = base.weight.detach() + part.delta_weight()
    return weight_grad(LayerKind.LINEAR, x.detach(), g, w.shape).reshape(-1)[part.indices.long()]


def test_layers_reading_one_input_transpose_it_once(monkeypatch):
    """q, k and v read the same hidden states: their backward makes the token-major copy of that input once
    (and the gradients still equal the dense reference); another input is transposed afresh."""
    calls = []
    real = grad_mod.token_major
    monkeypatch.setattr(grad_mod, "token_major", lambda m, tokens=None: calls.append(m.shape) or real(m, tokens))
    parts, bases = _parts_with_values(3)
    leaf = torch.randn(2, 9, 32, requires_grad=True)
    x = leaf * 1.0  # an activation, as hidden states are
    loss = sum((p(x, b) * (i + 1)).square().sum() for i, (p, b) in enumerate(zip(parts, bases, strict=True)))
    loss.backward()
    assert len(calls) == 4  # three output gradients, one input
    for i, (p, b) in enumerate(zip(parts, bases, strict=True)):
        w = b.weight.detach() + p.delta_weight()
        g = 2 * (i + 1) ** 2 * (x.detach() @ w.t() + b.bias)
        assert torch.allclose(p.values.grad, _dense_values_grad(p, b, x, g), rtol=1e-5, atol=1e-4)
    calls.clear()
    x2 = leaf.detach().clone().requires_grad_() * 1.0  # another input: transposed afresh
    parts[0](x2, bases[0]).sum().backward()
    assert len(calls) == 2


def test_an_input_refilled_in_place_is_not_served_from_an_old_copy():
    """A leaf input reused across steps and refilled without a version change (``.data.copy_``): each step's
    gradient is that step's, not one computed from the previous batch's transposed copy."""
    parts, bases = _parts_with_values(2)
    x = torch.randn(3, 8, 32)
    for step in range(2):
        x.data.copy_(torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(step)))
        for p in parts:
            p.values.grad = None
        sum(p(x, b).sum() for p, b in zip(parts, bases, strict=True)).backward()
        for p, b in zip(parts, bases, strict=True):
            ref = _dense_values_grad(p, b, x, torch.ones(3, 8, 48))
            assert torch.allclose(p.values.grad, ref, rtol=1e-5, atol=1e-4)


def test_the_shared_copy_of_a_one_token_input_does_not_outlive_it():
    """With one token, ``x``'s token-major copy is a view of ``x``; kept in the cache it would keep its own weak key
    alive, one entry per step."""
    parts, bases = _parts_with_values(1)
    for _ in range(3):
        x = torch.randn(1, 32, requires_grad=True) * 1.0
        parts[0](x, bases[0]).sum().backward()
        del x
        assert len(grad_mod._SHARED_INPUTS) == 0


def test_embedding_sampled_grad_equals_dense_gather():
    vocab, dim = 50, 8
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 20, (2, 9), generator=g)  # rows 20..49 are never looked up
    grad_out = torch.randn(2, 9, dim, generator=g)
    idx = _support(vocab * dim, 120, 4).to(torch.int32)
    got = sampled_weight_grad(LayerKind.EMBEDDING, ids, grad_out, (vocab, dim), idx)
    ref = weight_grad(LayerKind.EMBEDDING, ids, grad_out, torch.Size((vocab, dim))).reshape(-1)[idx.long()]
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert bool((ref == 0).any()) and bool((ref != 0).any())


def _values_grad(part: SparsePart, base: nn.Module, x: torch.Tensor, observer, autocast: bool = False) -> torch.Tensor:
    part.values.grad = None
    part.grad_observer = observer
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # forward only, as in training
        out = part(x, base)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    return part.values.grad.clone()


@pytest.mark.parametrize("kind", [LayerKind.LINEAR, LayerKind.CONV1D])
def test_part_backward_never_forms_dense_gradient_outside_a_window(kind, monkeypatch):
    d_in, d_out = 32, 48
    base = _base(kind, d_in, d_out)
    part = SparsePart(tuple(base.weight.shape), _support(d_in * d_out, 30, 5), kind)  # density 2 %
    with torch.no_grad():
        part.values.normal_()
    x = torch.randn(4, 6, d_in, requires_grad=True)
    observer = RecordingObserver()
    dense = _values_grad(part, base, x, observer)  # an observer that wants the dense gradient
    assert [g.shape for g in observer.dense] == [base.weight.shape]

    def no_dense(*args, **kwargs):
        raise AssertionError("dense weight gradient formed outside a selection window")

    monkeypatch.setattr(sparse_mod, "weight_grad", no_dense)
    x.grad = None
    sampled = _values_grad(part, base, x, None)
    assert (sampled - dense).abs().max() <= 1e-5 * dense.abs().max()
    # the reference: autograd through W + scatter(values)
    vals = part.values.detach().clone().requires_grad_(True)
    w = base.weight + sparse_mod.scatter_delta(base.weight.shape, part.indices, vals)
    out = nn.functional.linear(x, w, base.bias) if kind is LayerKind.LINEAR else x @ w + base.bias
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    assert (sampled - vals.grad).abs().max() <= 1e-5 * vals.grad.abs().max()


@pytest.mark.parametrize("kind", [LayerKind.LINEAR, LayerKind.CONV1D, LayerKind.EMBEDDING])
def test_an_observer_with_candidates_gets_their_gradient_and_no_dense_one(kind, monkeypatch):
    """After a window's first backward, the later ones compute the gradient at the candidates beside the values'
    own, equal to the dense gradient at those positions, and form no dense gradient (issue 10)."""
    d_in, d_out = 32, 48
    if kind is LayerKind.EMBEDDING:
        base, x = nn.Embedding(d_out, d_in).requires_grad_(False), torch.randint(0, d_out, (4, 6))
    else:
        base, x = _base(kind, d_in, d_out), torch.randn(4, 6, d_in)
    shape = tuple(base.weight.shape)
    part = SparsePart(shape, _support(d_in * d_out, 30, 5), kind)  # density 2 %
    with torch.no_grad():
        part.values.normal_()
    dense_observer = RecordingObserver()
    reference = _values_grad(part, base, x, dense_observer)
    candidates = _support(d_in * d_out, 25, 9).to(torch.int32)  # overlapping the part's entries or not
    dense_at = dense_observer.dense[0].reshape(-1)[candidates.long()]
    assert bool((dense_at != 0).any())

    def no_dense(*args, **kwargs):
        raise AssertionError("dense weight gradient formed after the candidates were chosen")

    monkeypatch.setattr(sparse_mod, "weight_grad", no_dense)
    observer = RecordingObserver(wanted=(candidates, grad_mod.csr_support(candidates, shape)))
    got = _values_grad(part, base, x, observer)
    assert not observer.dense and len(observer.at) == 1
    assert (observer.at[0] - dense_at).abs().max() <= 1e-5 * dense_at.abs().max()
    assert (got - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("kind", [LayerKind.LINEAR, LayerKind.CONV1D])
def test_gradcheck_float64(kind, monkeypatch):
    d_in, d_out = 5, 7
    base = _base(kind, d_in, d_out, torch.float64)
    idx = _support(d_in * d_out, 6, 6).to(torch.int32)
    x = torch.randn(2, 3, d_in, dtype=torch.float64, requires_grad=True)
    values = torch.randn(6, dtype=torch.float64, requires_grad=True)
    weight = base.weight.detach().clone()
    fn = lambda x_, v_: SparseDeltaFunction.apply(x_, v_, idx, weight, base, kind, None, False)  # noqa: E731
    monkeypatch.setattr(grad_mod, "SAMPLED_GRAD_MAX_DENSITY", 1.0)  # 6 of 35 entries: take the sampled path
    monkeypatch.setattr(sparse_mod, "weight_grad", None)  # … and only that one
    assert torch.autograd.gradcheck(fn, (x, values), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", [LayerKind.LINEAR, LayerKind.CONV1D])
def test_bf16_autocast_sampled_equals_dense(kind, monkeypatch):
    d_in, d_out = 32, 64
    base = _base(kind, d_in, d_out)
    part = SparsePart(tuple(base.weight.shape), _support(d_in * d_out, 40, 7), kind)
    x = torch.randn(3, 5, d_in, requires_grad=True)
    dense = _values_grad(part, base, x, RecordingObserver(), autocast=True)
    sampled = _values_grad(part, base, x, None, autocast=True)
    assert sampled.dtype == torch.float32
    assert (sampled - dense).abs().max() <= 1e-5 * dense.abs().max()


@pytest.mark.parametrize("kind", [LayerKind.LINEAR, LayerKind.CONV1D])
def test_blocked_path_above_the_density_threshold(kind, monkeypatch):
    """A dense support takes matmuls over blocks of rows (never the layer's whole dense gradient, never the
    SDDMM), equal to the dense reference, for any block size."""
    assert not use_sampled_grad(LayerKind.LINEAR, 64, 64)
    assert use_sampled_grad(LayerKind.LINEAR, int(SAMPLED_GRAD_MAX_DENSITY * 6400), 6400)
    assert use_sampled_grad(LayerKind.EMBEDDING, 64, 64)
    d_in, d_out = 12, 10
    base = _base(kind, d_in, d_out)
    idx = _support(d_in * d_out, 70, 3)  # 58 % dense
    x = torch.randn(3, 4, d_in)
    g = torch.randn(3, 4, d_out)
    reference = weight_grad(kind, x, g, base.weight.shape).reshape(-1)[idx.long()]
    for block in (1, 7, 12, 40, 10**6):  # fewer entries than a row, rows not dividing, one block
        got = grad_mod.blocked_weight_grad(kind, x, g, tuple(base.weight.shape), idx, block)
        assert torch.allclose(got, reference, atol=1e-6)
    part = SparsePart(tuple(base.weight.shape), idx, kind)
    monkeypatch.setattr(sparse_mod, "sampled_weight_grad", None)
    monkeypatch.setattr(sparse_mod, "weight_grad", None)  # the dense gradient is for observers only
    monkeypatch.setattr(grad_mod, "GRAD_BLOCK_ENTRIES", 2 * max(base.weight.shape))  # several blocks
    x = x.requires_grad_(True)
    (part(x, base) * g).sum().backward()
    assert torch.allclose(part.values.grad, reference, atol=1e-6)
    blocks = part.support()  # the row blocks, found once for the support: no search (a CUDA sync) per backward
    assert isinstance(blocks, grad_mod.RowBlocks) and part.support() is blocks and len(blocks.bounds) > 2
    monkeypatch.setattr(sparse_mod, "row_blocks", None)
    monkeypatch.setattr(grad_mod, "row_blocks", None)
    part.values.grad = None
    (part(x, base) * g).sum().backward()
    assert torch.allclose(part.values.grad, reference, atol=1e-6)


@pytest.mark.parametrize("kind", [LayerKind.LINEAR, LayerKind.CONV1D])
def test_training_pass_patches_the_base_in_place_and_restores_it_bit_for_bit(kind):
    """The training forward/backward adds the values into ``W`` for one kernel call (no dense copy) and writes
    the saved entries back: the base is bit-identical afterwards, outputs and gradients equal the copy path."""
    base = _base(kind, 24, 40)
    before = base.weight.detach().clone()
    version = base.weight._version
    part = SparsePart(tuple(base.weight.shape), _support(24 * 40, 30, 8), kind)
    with torch.no_grad():
        part.values.normal_()
    x = torch.randn(2, 5, 24, requires_grad=True)
    out = part(x, base)
    assert torch.equal(base.weight, before)  # restored right after the forward kernel
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    assert torch.equal(base.weight, before) and base.weight._version == version
    with torch.no_grad():  # the copy path (no gradients): the same output
        assert torch.equal(part(x, base), out.detach())
    vals = part.values.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w = base.weight + sparse_mod.scatter_delta(base.weight.shape, part.indices, vals)
    ref = nn.functional.linear(x_ref, w, base.bias) if kind is LayerKind.LINEAR else x_ref @ w + base.bias
    (ref * torch.linspace(-1, 1, ref.shape[-1])).sum().backward()
    assert (out.detach() - ref.detach()).abs().max() <= 1e-5
    assert (x.grad - x_ref.grad).abs().max() <= 1e-5 and (part.values.grad - vals.grad).abs().max() <= 1e-4


def test_csr_support_is_cached_until_the_indices_change():
    part = SparsePart((40, 24), _support(40 * 24, 30, 9), LayerKind.LINEAR)
    first = part.support()
    assert part.support() is first  # cached

    def flat(support):
        crow, col = support.crow, support.col
        return torch.repeat_interleave(torch.arange(40), crow.diff().long()) * 24 + col.long()

    assert int(first.crow[-1]) == 30 and torch.equal(flat(first), part.indices.long())
    assert first.pattern(torch.float32) is first.pattern(torch.float32)  # the SDDMM's CSR tensor, built once
    assert torch.equal(first.pattern(torch.float32).crow_indices(), first.crow)
    assert copy.deepcopy(part).support() is not None  # a copy rebuilds what it cannot copy
    free = next(i for i in range(40 * 24) if i not in set(part.indices.tolist()))
    with torch.no_grad():  # a reselection writes the indices in place
        part.indices[0] = free
        part.indices.copy_(part.indices.sort().values)
    again = part.support()
    assert again is not first and torch.equal(flat(again), part.indices.long())


def test_the_cached_layout_follows_the_indices_tensor_not_its_address(monkeypatch):
    """Indices replaced twice between two backwards: the second tensor may get the freed first one's address,
    version and length, and must still get its own row blocks (a stale layout gathers the wrong entries)."""
    monkeypatch.setattr(grad_mod, "GRAD_BLOCK_ENTRIES", 24)  # two rows a block
    part = SparsePart((10, 12), torch.arange(0, 70), LayerKind.LINEAR)
    first = part.support()
    for _ in range(200):  # the allocator soon hands a freed address out again
        part.indices = torch.arange(50, 120, dtype=part.indices.dtype)
        part.indices = torch.arange(50, 120, dtype=part.indices.dtype)
        assert part.support().bounds == grad_mod.row_blocks(part.indices, (10, 12)).bounds
        part.indices = torch.arange(0, 70, dtype=part.indices.dtype)
        first = part.support()
    assert first.bounds == grad_mod.row_blocks(part.indices, (10, 12)).bounds


@pytest.mark.parametrize("dense_window", [False, True], ids=["sampled", "dense"])
def test_embedding_padding_row_gets_no_gradient_as_in_f_embedding(dense_window: bool):
    """``nn.Embedding(padding_idx=p)`` never trains row ``p`` (``F.embedding``'s backward leaves it zero; GPT-2-style
    models often pad with EOS): a sparse part's entries in that row get no gradient either, on the sampled path and
    through a selection window's dense gradient."""
    from deltatune.parts.layers import layer_kind
    from deltatune.parts.sparse import SparsePart

    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, padding_idx=0)
    part = SparsePart((10, 4), torch.arange(40), layer_kind(emb))
    observer = RecordingObserver() if dense_window else None
    part.grad_observer = observer
    with torch.no_grad():
        part.values.normal_()
    ids = torch.tensor([[0, 1, 2, 0, 3], [4, 0, 0, 1, 9]])
    part(ids, emb).pow(2).sum().backward()
    if observer is not None:
        assert len(observer.dense) == 1 and torch.equal(observer.dense[0][0], torch.zeros(4))
    ref = (emb.weight.detach().clone() + part.values.detach().view(10, 4)).requires_grad_(True)
    nn.functional.embedding(ids, ref, padding_idx=0).pow(2).sum().backward()
    assert torch.equal(part.values.grad.view(10, 4)[0], torch.zeros(4))
    assert torch.allclose(part.values.grad.view(10, 4), ref.grad, atol=1e-6)
