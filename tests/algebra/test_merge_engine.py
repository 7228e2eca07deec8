"""The streaming merge engine on tiny checkpoints and deltas: exact semantics, scopes, outputs, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from merge_fixtures import checkpoints, random_delta  # noqa: F401  (fixture)
from typer.testing import CliRunner

import deltatune
from deltatune.algebra import merge
from deltatune.algebra.checkpoint import CheckpointReader
from deltatune.algebra.engine import tensor_seed
from deltatune.algebra.quantile import RadixSelect
from deltatune.ops.merge import task_arithmetic, ties
from deltatune.ops.sparsify import dare

pytestmark = pytest.mark.usefixtures("one_thread")


def taus(paths, key):
    base = CheckpointReader(paths["base"]).get(key).float()
    return [CheckpointReader(paths[f"ft{i}"]).get(key).float() - base for i in range(3)]


def merged_delta(out, paths, key):
    return CheckpointReader(out).get(key).float() - CheckpointReader(paths["base"]).get(key).float()


def test_radix_select_equals_kthvalue_over_the_concatenation() -> None:
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(300, generator=g) * s for s in (1e-4, 1.0, 30.0)] + [torch.tensor([0.0, -0.0, 5.0, 5.0])]
    every = torch.cat(chunks)
    sel = RadixSelect()
    for c in chunks:
        sel.feed(c)
    ranks = [0, 1, 450, every.numel() - 2, every.numel() - 1]
    sel.resolve(ranks)
    for c in chunks:
        sel.feed(c)
    assert sel.values() == [float(every.sort().values[r]) for r in ranks]


def test_mergekit_preset_ties_equals_the_per_tensor_op(checkpoints, tmp_path) -> None:  # noqa: F811
    weights = [1.0, 0.5, 2.0]
    out = merge([checkpoints[f"ft{i}"] for i in range(3)], "ties", base=checkpoints["base"], weights=weights,
                params={"density": 0.2, "lambda": 0.7}, preset="mergekit", output="checkpoint", out=tmp_path / "m")
    reader = CheckpointReader(out)
    for key in CheckpointReader(checkpoints["base"]).names():
        expected = ties(taus(checkpoints, key), 0.2, weights, lam=0.7, preset="mergekit")
        assert torch.allclose(merged_delta(out, checkpoints, key), expected, atol=1e-7), key
    assert json.loads((out / "deltatune_merge.json").read_text())["preset"] == "mergekit"
    assert reader.dtype("lm_head.weight") == torch.float32


def test_paper_preset_trims_with_one_global_threshold_per_task(checkpoints, tmp_path) -> None:  # noqa: F811
    ins = [checkpoints[f"ft{i}"] for i in range(3)]
    out = merge(ins, "ties", base=checkpoints["base"], params={"density": 0.1}, preset="paper", output="checkpoint",
                out=tmp_path / "p")
    keys = CheckpointReader(checkpoints["base"]).names()
    flat = [torch.cat([taus(checkpoints, k)[i].reshape(-1) for k in keys]) for i in range(3)]
    # the TIES authors' topk_values_mask: kthvalue(d − int(d·k)) of |τ| over the whole model, keep |τ| ≥ it
    thresholds = [float(f.abs().kthvalue(f.numel() - int(f.numel() * 0.1)).values) for f in flat]
    for key in keys:
        t = [torch.where(x.abs() >= thr, x, torch.zeros_like(x)) for x, thr in zip(taus(checkpoints, key), thresholds,
                                                                                     strict=True)]
        stacked = torch.stack(t)
        sign = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        expected = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
        assert torch.allclose(merged_delta(out, checkpoints, key), expected, atol=1e-7), key
    # the global scope keeps different fractions per tensor (norm layers, whose deltas are as large, differ)
    kept = [(taus(checkpoints, k)[0].abs() >= thresholds[0]).float().mean() for k in keys]
    assert max(kept) - min(kept) > 0.05


def test_task_arithmetic_of_lora_and_sparse_deltas_sums_their_weights(tmp_path) -> None:
    a = random_delta(deltatune.LoRAConfig(r=2, alpha=4.0), seed=1)
    b = random_delta(deltatune.LoRAConfig(r=4, alpha=4.0, targets=["q_proj", "v_proj"]), seed=2)
    c = random_delta(deltatune.SparseConfig(num_tunable=500, regrow=False, targets=["all-linear"]), seed=3)
    merged = merge([a, b, c], "task_arithmetic", weights=[1.0, -0.5, 2.0], params={"lambda": 0.5})
    for module, part in merged.parts.items():
        expected = torch.zeros_like(part.delta_weight())
        for d, w in ((a, 1.0), (b, -0.5), (c, 2.0)):
            if module in d.parts:
                expected += w * d.parts[module].delta_weight()
        assert torch.allclose(part.delta_weight(), 0.5 * expected, atol=1e-6), module
    assert merged.fingerprint == a.fingerprint
    sparse = merge([c], "task_arithmetic", output="sparse")
    assert {p.kind for p in sparse.parts.values()} == {"sparse"}
    assert sum(p.trainable_count for p in sparse.parts.values()) == c.trainable_count


def test_merged_delta_saves_and_applies_like_its_inputs(tmp_path) -> None:
    from conftest import tiny_inputs, tiny_llama

    a = random_delta(deltatune.LoRAConfig(r=2, alpha=4.0), seed=1)
    b = random_delta(deltatune.SparseConfig(num_tunable=400, regrow=False, targets=["all-linear"]), seed=2)
    merge([a, b], "task_arithmetic", out=tmp_path / "sum")
    merged = deltatune.load_delta(tmp_path / "sum")
    inputs = tiny_inputs("llama")
    one, two = tiny_llama(), tiny_llama()
    deltatune.apply_delta(one, merged, merge=True)
    deltatune.apply_delta(two, a, merge=True)
    deltatune.apply_delta(two, b, merge=True, force=True)  # two already holds a
    with torch.no_grad():
        assert torch.allclose(one(**inputs).logits, two(**inputs).logits, atol=1e-5)


def test_random_masks_do_not_depend_on_order_or_sharding(checkpoints, tmp_path) -> None:  # noqa: F811
    ins = [checkpoints[f"ft{i}"] for i in range(3)]
    kw = dict(base=checkpoints["base"], params={"density": 0.3}, preset="mergekit", output="checkpoint", seed=7)
    one = CheckpointReader(merge(ins, "dare_ties", out=tmp_path / "a", **kw))
    sharded = CheckpointReader(merge(ins, "dare_ties", out=tmp_path / "b", shard_size="20KB", **kw))
    other_seed = CheckpointReader(merge(ins, "dare_ties", out=tmp_path / "c", **{**kw, "seed": 8}))
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 1
    for key in one.names():
        assert torch.equal(one.get(key), sharded.get(key)), key
    key = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(one.get(key), other_seed.get(key))
    # each mask is a function of (seed, tensor, input) alone: recompute one tensor's in isolation
    single = CheckpointReader(merge(ins[:1], "dare_linear", out=tmp_path / "d", **kw))
    for key in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        alone = dare(taus(checkpoints, key)[0], 0.3, torch.Generator().manual_seed(tensor_seed(7, key, 0)), "l1")
        assert torch.allclose(merged_delta(single.path, checkpoints, key), alone, atol=1e-7), key
    assert tensor_seed(7, key, 0) == tensor_seed(7, key, 0) != tensor_seed(7, key, 1)


def test_dare_keeps_density_and_rescales_by_inverse_density(checkpoints, tmp_path) -> None:  # noqa: F811
    out = merge([checkpoints["ft0"]], "dare_linear", base=checkpoints["base"], params={"density": 0.25},
                preset="paper", output="checkpoint", out=tmp_path / "d")
    key = "model.layers.0.mlp.gate_proj.weight"
    got, tau = merged_delta(out, checkpoints, key), taus(checkpoints, key)[0]
    kept = got != 0
    assert abs(float(kept.float().mean()) - 0.25) < 0.03
    assert torch.allclose(got[kept], tau[kept] / 0.25, atol=1e-6)


def test_lines_scales_deeper_blocks_more(checkpoints, tmp_path) -> None:  # noqa: F811
    ins = [checkpoints["ft0"], checkpoints["ft1"]]
    out = merge(ins, "task_arithmetic", base=checkpoints["base"], output="checkpoint", out=tmp_path / "l",
                lines={"alpha": 0.2, "beta": 0.6})
    for key, factor in (("model.layers.0.mlp.up_proj.weight", 0.2), ("model.layers.1.mlp.up_proj.weight", 0.8),
                        ("lm_head.weight", 0.2)):
        expected = factor * task_arithmetic(taus(checkpoints, key)[:2])
        assert torch.allclose(merged_delta(out, checkpoints, key), expected, atol=1e-7), key


def test_lines_takes_the_models_block_count_for_deltas_that_skip_blocks() -> None:
    # a delta on block 0 of the 2-block tiny Llama: counted from its own names L would be 1 (block 0 gets α + β)
    d = random_delta(deltatune.LoRAConfig(r=2, targets=["model.layers.0.self_attn.q_proj"]), seed=1)
    name = "model.layers.0.self_attn.q_proj"
    for layers, factor in ((None, 0.2 + 0.6), (2, 0.2)):
        spec = {"alpha": 0.2, "beta": 0.6, **({} if layers is None else {"layers": layers})}
        merged = merge([d], "task_arithmetic", lines=spec)
        assert torch.allclose(merged.parts[name].delta_weight(), factor * d.parts[name].delta_weight(), atol=1e-6)
    for bad in (0, 1.5, True):
        with pytest.raises(deltatune.errors.ConfigError, match="layers"):
            merge([d], "task_arithmetic", lines={"alpha": 0.2, "beta": 0.6, "layers": bad})


def test_soup_of_same_task_deltas_averages_heads() -> None:
    from conftest import tiny_bert

    def delta(seed):
        model = tiny_bert()
        d = deltatune.attach(model, deltatune.LoRAConfig(r=2, alpha=4.0))
        with torch.no_grad():
            model.classifier.weight.add_(seed)
        d.snapshot_heads(model)
        return d

    a, b = delta(1), delta(3)
    soup = merge([a, b], "linear")
    assert torch.allclose(soup.heads["classifier"]["weight"], (a.heads["classifier"]["weight"]
                                                                + b.heads["classifier"]["weight"]) / 2)
    assert merge([a, b], "linear", heads="none").heads == {}


def test_cli_merges_a_native_recipe(tmp_path, monkeypatch) -> None:
    from deltatune.cli import app

    monkeypatch.chdir(tmp_path)  # the recipe's relative paths exist from the working folder

    a = random_delta(deltatune.LoRAConfig(r=2, alpha=4.0), seed=1)
    b = random_delta(deltatune.LoRAConfig(r=2, alpha=4.0), seed=2)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    (tmp_path / "r.yaml").write_text("method: ties\ninputs:\n  - {path: a, density: 0.5}\n  - {path: b, density: 0.5}\n"
                                     "params: {lambda: 1.0}\noutput: sparse\n")
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "m"),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    merged = deltatune.load_delta(tmp_path / "m")
    assert merged.method == "merge" and merged.config["method"] == "ties"
    assert {p.kind for p in merged.parts.values()} == {"sparse"}


def test_greedy_soup_keeps_only_ingredients_that_help() -> None:
    from deltatune.algebra.soup import greedy_soup

    lora = deltatune.LoRAConfig(r=2, alpha=4.0)
    a, b, far = random_delta(lora, seed=1), random_delta(lora, seed=2), random_delta(lora, seed=3, std=0.2)
    target = {m: (a.parts[m].delta_weight() + b.parts[m].delta_weight()) / 2 for m in a.parts}

    def score(d):  # held-out score: closeness to the a/b midpoint
        return -sum(float((d.parts[m].delta_weight() - target[m]).norm()) for m in target)

    soup, log = greedy_soup([far, a, b], score)
    assert soup.metrics["greedy_soup"]["chosen"] in ([1, 2], [2, 1])
    assert [e["accepted"] for e in log if e["phase"] == "greedy"] == [True, True, False]
    assert score(soup) > max(score(a), score(b))


def test_streamed_shards_load_in_transformers_and_safetensors(checkpoints, tmp_path) -> None:  # noqa: F811
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    out = merge([checkpoints["ft0"], checkpoints["ft1"]], "task_arithmetic", base=checkpoints["base"],
                output="checkpoint", out=tmp_path / "m", shard_size="30KB", out_dtype=torch.bfloat16)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    on_disk = {k: v for f in shards for k, v in load_file(f).items()}
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, value in model.state_dict().items():
        assert torch.equal(value, on_disk[name]), name
    key = "model.layers.0.self_attn.k_proj.weight"
    expected = (CheckpointReader(checkpoints["base"]).get(key).float()
                + task_arithmetic(taus(checkpoints, key)[:2])).to(torch.bfloat16)
    assert torch.equal(on_disk[key], expected)


TOKENIZER_FILES = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "special_tokens_map.json": "{}",
                   "added_tokens.json": "{}", "chat_template.jinja": "{{ messages }}", "chat_template.json": "{}",
                   "spiece.model": "sp", "sentencepiece.bpe.model": "bpe", "vocab.txt": "a", "merges.txt": "#",
                   "preprocessor_config.json": "{}", "processor_config.json": "{}"}


def test_checkpoint_merge_records_its_dtype_and_copies_every_tokenizer_file(checkpoints, tmp_path) -> None:  # noqa: F811
    """An fp32 base merged into bf16: ``config.json`` says bf16, so transformers (``dtype="auto"``) loads what was
    written; every tokenizer artifact of the base (chat templates, added tokens, SentencePiece models) is copied."""
    import shutil

    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(checkpoints["base"], base)
    for name, text in TOKENIZER_FILES.items():
        (base / name).write_text(text)
    out = merge([checkpoints["ft0"], checkpoints["ft1"]], "task_arithmetic", base=base, output="checkpoint",
                out=tmp_path / "m", out_dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).lm_head.weight.dtype == torch.bfloat16
    for name, text in TOKENIZER_FILES.items():
        assert (out / name).read_text() == text, name
    plain = merge([checkpoints["ft0"]], "task_arithmetic", base=base, output="checkpoint", out=tmp_path / "p")
    assert (plain / "config.json").read_bytes() == (base / "config.json").read_bytes()  # no out_dtype: unchanged


def test_parts_on_both_tied_modules_attach_like_they_merge() -> None:
    """GPT-2's lm_head shares wte's weight: with a part on each, both modules must see W + Δ_wte + Δ_head."""
    from conftest import tiny_gpt2, tiny_inputs

    from deltatune.parts.dense import DensePart

    model = tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    parts = {}
    for name in ("transformer.wte", "lm_head"):
        part = DensePart.for_module(model.get_submodule(name), names=["weight"])
        with torch.no_grad():
            part.delta_for("weight").copy_(torch.randn(part.shapes["weight"], generator=g) * 0.05)
        parts[name] = part
    inputs = tiny_inputs("gpt2")
    from deltatune.model import attach_parts

    attach_parts(model, parts, "d")
    with torch.no_grad():
        attached = model(**inputs).logits
    deltatune.detach(model)
    merged = tiny_gpt2()
    for name, part in parts.items():
        part.merge_into(merged.get_submodule(name))
    with torch.no_grad():
        assert torch.allclose(attached, merged(**inputs).logits, atol=1e-5)
    assert not any("DeltaLayer" in type(m).__name__ for m in model.modules())


def test_radix_select_on_magnitudes_batches_small_tensors() -> None:
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(n, generator=g).abs() * s for n, s in ((5, 1.0), (70_000, 1e-3), (3, 0.0), (400, 9.0))]
    every = torch.cat(chunks)
    sel = RadixSelect(nonnegative=True)
    for c in chunks:
        sel.feed(c)
    ranks = [0, 2, 3, 35_000, every.numel() - 1]
    sel.resolve(ranks)
    for c in chunks:
        sel.feed(c)
    assert sel.values() == [float(every.sort().values[r]) for r in ranks]


def test_sparsifying_merges_of_conv1d_and_embedding_lora_deltas_run_on_their_dense_updates() -> None:
    # a Conv1D (GPT-2) or Embedding LoRA's update is a transposed view of B·A: the in-place kernels need it contiguous
    from conftest import randomize_delta, tiny_gpt2

    config = deltatune.LoRAConfig(r=2, targets=["c_attn", "wte"])
    ds = [randomize_delta(tiny_gpt2(), config, seed, 0.05) for seed in (1, 2)]
    for method, params in (("ties", {"density": 0.3}), ("dare_linear", {"density": 0.5}),
                           ("dare_ties", {"density": 0.5}), ("ties", {"density": 1.0})):
        merged = merge(ds, method, params=params, preset="mergekit", seed=0, force=True)
        assert set(merged.parts) == set(ds[0].parts)
    full = merge(ds, "ties", params={"density": 1.0}, preset="mergekit", force=True)
    ta = merge(ds, "task_arithmetic", params={"lambda": 0.5}, force=True)  # density 1: a sign-agreeing mean
    for name in ds[0].parts:
        a, b = (d.parts[name].delta_weight() for d in ds)
        agree = torch.sign(a) == torch.sign(b)
        assert torch.allclose(full.parts[name].delta_weight()[agree], ta.parts[name].delta_weight()[agree],
                              atol=1e-6), name


def test_paper_dare_ties_takes_the_disjoint_mean_and_mergekit_sums() -> None:
    d = random_delta(deltatune.LoRAConfig(r=2, targets=["q_proj"]), seed=1)
    paper = merge([d, d], "dare_ties", params={"density": 1.0}, preset="paper", seed=0, force=True)
    kit = merge([d, d], "dare_ties", params={"density": 1.0}, preset="mergekit", seed=0, force=True)
    for name, part in d.parts.items():
        assert torch.allclose(paper.parts[name].delta_weight(), part.delta_weight(), atol=1e-6)
        assert torch.allclose(kit.parts[name].delta_weight(), 2 * part.delta_weight(), atol=1e-6)


def test_della_rescale_none_keeps_the_survivors_unscaled_and_density_one_keeps_all() -> None:
    d = random_delta(deltatune.LoRAConfig(r=2, targets=["q_proj"]), seed=1)
    params = {"density": 0.5, "epsilon": 0.1}
    plain = merge([d], "della_linear", params={**params, "rescale": "none"}, preset="paper", seed=0, force=True)
    l1 = merge([d], "della_linear", params={**params, "rescale": "l1"}, preset="paper", seed=0, force=True)
    for name, part in d.parts.items():
        got, ref = plain.parts[name].delta_weight(), part.delta_weight()
        kept = got != 0
        assert torch.equal(got[kept], ref[kept])  # survivors as they were
        assert float(got.abs().sum()) < 0.8 * float(ref.abs().sum()) and not torch.equal(got, l1.parts[name]
                                                                                          .delta_weight())
    whole = merge([d, d], "della", preset="mergekit", seed=0, force=True)  # mergekit's default density 1.0
    for name, part in d.parts.items():
        assert torch.allclose(whole.parts[name].delta_weight(), part.delta_weight(), atol=1e-6)


def test_a_tensor_the_base_lacks_is_named_in_a_warning(checkpoints, tmp_path) -> None:  # noqa: F811
    import shutil

    from safetensors.torch import load_file, save_file

    head = tmp_path / "ft_head"
    shutil.copytree(checkpoints["ft0"], head)
    (weights,) = head.glob("*.safetensors")
    state = load_file(weights)
    state["score.weight"] = torch.zeros(2, 32)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) the base lacks .*score\.weight"):
        merge([head, checkpoints["ft1"]], "task_arithmetic", base=checkpoints["base"], output="checkpoint",
              out=tmp_path / "m")


def test_a_delta_fingerprinted_before_probes_merges_with_a_new_one_of_the_same_base() -> None:
    new = random_delta(deltatune.LoRAConfig(r=2, targets=["q_proj"]), seed=1)
    old = random_delta(deltatune.LoRAConfig(r=2, targets=["q_proj"]), seed=2)
    old.fingerprint = {k: v for k, v in old.fingerprint.items() if k != "probe"}  # as written before 2026-12-06
    merged = merge([new, old], "task_arithmetic")
    assert set(merged.parts) == set(new.parts)
    other = random_delta(deltatune.LoRAConfig(r=2, targets=["q_proj"]), seed=3, model_seed=1)
    with pytest.raises(deltatune.errors.FingerprintMismatch):
        merge([new, other], "task_arithmetic")


def test_a_trimming_merge_sees_a_tied_tensors_two_names_as_one_task_vector(tmp_path) -> None:
    """GPT-2's ``lm_head`` *is* ``wte``: a delta with parts on both updates that tensor by their sum, which TIES must
    trim and vote on as one task vector — as it does for the fine-tuned checkpoints (one stored tensor); it trimmed
    the two names apart. The ties come from the base (``base=``, or the base folder a delta records)."""
    from conftest import randomize_delta, tiny_gpt2, tiny_inputs
    from transformers import GPT2LMHeadModel

    base = tmp_path / "base"
    tiny_gpt2().save_pretrained(base)
    deltas = [randomize_delta(tiny_gpt2(), deltatune.LoRAConfig(r=2, alpha=4, targets=targets), seed, 0.3)
              for seed, targets in ((1, ["wte", "lm_head", "c_attn"]), (2, ["wte", "c_attn"]))]
    assert {"transformer.wte", "lm_head"} <= set(deltas[0].parts)
    tuned = []
    for i, d in enumerate(deltas):  # the same deltas as fine-tuned checkpoints
        model = tiny_gpt2()
        deltatune.merge_delta(model, d, force=True)
        model.save_pretrained(tmp_path / f"ft{i}")
        tuned.append(tmp_path / f"ft{i}")
    options = {"params": {"density": 0.5}, "preset": "mergekit", "seed": 0}
    want_dir = merge(tuned, "ties", base=base, output="checkpoint", out=tmp_path / "want", **options)
    inputs = tiny_inputs("gpt2")
    with torch.no_grad():
        want = GPT2LMHeadModel.from_pretrained(want_dir)(**inputs).logits
    for d in deltas:
        d.provenance.base = str(base)
    for given in ({"base": base}, {}):
        merged = merge(deltas, "ties", force=True, **given, **options)
        assert "lm_head" not in merged.parts  # one task vector, under the tensor's own name
        model = tiny_gpt2()
        deltatune.apply_delta(model, merged, force=True)
        with torch.no_grad():
            got = model(**inputs).logits
        assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
