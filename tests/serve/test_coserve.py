"""Co-serving: a fine-tuning job in the serving process trains a new delta between decode steps with what each
step leaves of its token budget (inference first), serving outputs are unchanged meanwhile, and the trained delta
is served as soon as it is saved."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_delta, tiny_llama
from serve_tests_common import Tok

import deltatune
from deltatune.errors import ConfigError
from deltatune.serve import DeltaStore, Engine, EngineConfig, GenerateRequest, SamplingParams
from deltatune.serve.coserve import CoTrainConfig, CoTrainJob, token_batches, train_budget

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 9, 17, 3], [1, 2, 3, 4, 5, 6], [40, 41]]


def _engine(delta):
    model = tiny_llama()
    store = DeltaStore(model, "base")
    store.add("served", delta)
    return Engine(model, Tok(), store, EngineConfig(max_batch=4), eos=set())


def test_a_co_served_job_trains_between_steps_and_its_delta_is_served_when_saved(tmp_path):
    served = randomize_delta(tiny_llama(), deltatune.LoRAConfig(r=2), seed=1, std=0.3)
    params = SamplingParams(max_tokens=12)
    names = ["served", None, "served"]
    expect = [o.token_ids for o in _engine(served).generate(PROMPTS, names, params)]

    engine = _engine(served)
    pattern = token_batches([[7, 8, 9, 10] * 8], max_len=32)
    job = CoTrainJob(engine, deltatune.LoRAConfig(r=8, alpha=16), pattern,
                     CoTrainConfig(name="fresh", out=str(tmp_path / "fresh"), steps=25, lr=0.005, step_tokens=32))
    trained_while_serving = []
    outs: dict[int, list[int]] = {i: [] for i in range(3)}

    def sink(i):
        def put(o):
            outs[i].extend(o.token_ids)
            if o.finish_reason:
                trained_while_serving.append(len(job.losses))
        return put
    for i, (p, n) in enumerate(zip(PROMPTS, names, strict=True)):
        engine.submit(GenerateRequest(p, params, n, sink=sink(i)))
    engine.add_job(job)
    engine.run_until_idle()
    while not job.done:  # the job goes on when no request is left
        engine.step()

    assert [outs[i] for i in range(3)] == expect  # serving unaffected by the job's parts and steps
    # 3 decoding rows + a 32-token sequence never fit a 32-token step: the job waited for inference to end
    assert trained_while_serving == [0, 0, 0]
    assert job.done and job.error is None and len(job.losses) == 25 and job.losses[-1] < job.losses[0] - 1
    assert "fresh" in engine.store.names() and not any(k.endswith("@train") for k in engine.store.attached_keys())
    ref = tiny_llama()
    deltatune.apply_delta(ref, deltatune.load_delta(tmp_path / "fresh"))
    got = engine.generate([[7, 8, 9]], ["fresh"], SamplingParams(max_tokens=6))[0].token_ids
    ids = [7, 8, 9]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(ref(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[3:] == [10, 7, 8, 9, 10, 7]  # it learnt the pattern


def test_the_budget_puts_inference_first_and_bad_configs_are_typed(tmp_path):
    assert train_budget(16, 3) == 13 and train_budget(16, 40) == 0
    with pytest.raises(ConfigError):
        CoTrainConfig(name="x", out=str(tmp_path), steps=0)
    with pytest.raises(ConfigError):
        token_batches([[1]], max_len=8)


def test_a_co_served_step_trains_its_parts_in_training_mode_with_their_aux_loss(tmp_path):
    """The engine keeps the served model in eval mode; the job's parts train in training mode (dropout acts, MixLoRA
    computes its load-balancing loss, which joins the loss) and go back to eval mode for serving."""
    engine = _engine(randomize_delta(tiny_llama(), deltatune.LoRAConfig(r=2), seed=1, std=0.3))
    job = CoTrainJob(engine, deltatune.make_config("mixlora", {"num_experts": 3, "r": 2, "dropout": 0.3}),
                     [[1, 2, 3, 4, 5]], CoTrainConfig(name="mix", out=str(tmp_path / "mix"), steps=5))
    modes: list[bool] = []
    lm_losses: list[float] = []
    for part in job.delta.parts.values():
        part.register_forward_hook(lambda m, a, o: modes.append(m.training))
    engine.model.register_forward_hook(lambda m, a, o: lm_losses.append(float(o.loss)))
    assert job.step(100) == 5
    aux = job.delta.aux_loss()
    assert modes and all(modes) and not engine.model.training
    assert not any(p.training for p in job.delta.parts.values())  # back to eval for serving
    assert aux is not None and float(aux) > 0
    assert job.losses == [pytest.approx(lm_losses[0] + float(aux), abs=1e-6)]
