"""Serving many deltas over one base (issue 11): decode throughput, delta load time, open-loop load over loopback.

Run ``python benchmarks/serve.py [--quick] [--out FILE.json]``; writes ``FILE.json`` and ``FILE.md`` (default
``benchmarks/results/serve.json``).  Everything runs on CPU unless a GPU is present (then the model is moved there;
the issue's GPU setting, a ~1B config in bf16, is not built in).

1. **Throughput** (output tokens/s): a random ``LlamaForCausalLM`` of ~50 M parameters (hidden 640, 8 layers,
   vocabulary 8192; ``--quick``: a tiny one), 16 requests of 32 random prompt tokens each, 32 greedy tokens each
   (EOS ignored), all submitted at once to :class:`deltatune.serve.Engine` (batch 16): base only; base rows with 16
   deltas attached; one LoRA merged; one LoRA unmerged on every row; the same with ``merge_hot`` (dLoRA: merged
   while it carries the traffic); 16 distinct LoRA r=8 deltas (one per row); a
   heterogeneous mix (LoRA r=8 and r=64, sparse 1 %, DoRA, (IA)³, adapter, round-robin over the rows).  Baselines
   with PEFT 0.21 on the same base and prompts: ``transformers`` ``generate`` of the bare base, PEFT's
   ``adapter_names`` mixed batch with the 16 LoRAs, and PEFT generating per adapter (``set_adapter`` + ``generate``
   on its row).  Every mode has its own copy of the base; ``rounds`` interleaved rounds run every mode once each,
   each right after a base-only run (``vs_base`` is the median of those paired ratios).
   ``equal_alone`` checks every row's tokens against the same request served alone (fp32 greedy).
2. **Load while serving**: ``DeltaStore.add`` of a LoRA (r=16 on q/k/v/o, ~2.6 MB safetensors at full size)
   while the engine thread decodes 16 base requests; median and max of 5 loads.
3. **Open-loop load over loopback**: ``deltatune serve`` in its own process (8 LoRA deltas), a load generator in
   another process sending streaming completions with Poisson arrivals at three rates (bounded count and time),
   each request to a random delta or the base; p50/p99 time to first token and inter-token latency, output tok/s.
4. **Co-serving**: decode step latency with and without a LoRA fine-tuning job in the engine, and the job's steps per
   minute.

"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_meta, write_sections  # noqa: E402

FULL = {"vocab_size": 8192, "hidden_size": 640, "intermediate_size": 1728, "num_hidden_layers": 8,
        "num_attention_heads": 10, "num_key_value_heads": 10, "max_position_embeddings": 512}
QUICK = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256}
HETERO = [("lora", {"r": 8}), ("lora", {"r": 64}), ("sparse", {"density": 0.01, "regrow": False}),
          ("dora", {"r": 8}), ("ia3", {}), ("adapter", {"bottleneck": 16})]


def _base(cfg: dict[str, Any]):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _delta(model, method: str, cfg: dict[str, Any], seed: int, std: float = 0.02):
    """A delta of ``method`` on ``model`` whose tensors are moved off their initial values by N(0, std²)."""
    import torch

    import deltatune
    from deltatune.methods import make_config
    from deltatune.model import detach

    delta = deltatune.attach(model, make_config(method, cfg), name="_bench")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in delta.parts.values():
            for p in part.parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)
    detach(model, "_bench")
    for p in model.parameters():
        p.requires_grad_(False)
    return delta


def _engine(model, deltas: dict[str, Any], max_batch: int = 16, **config: Any):
    from deltatune.serve import DeltaStore, Engine, EngineConfig

    store = DeltaStore(model, "base")
    for name, d in deltas.items():
        store.add(name, d)
    return Engine(model, _NullTok(), store, EngineConfig(max_batch=max_batch, prefill_chunk=1024, **config),
                  eos=set())


class _NullTok:
    """Token ids only: the throughput runs measure the model, not detokenisation."""

    pad_token_id = 0

    def decode(self, ids, **_: Any) -> str:
        return ""


def _interleaved(modes: list[tuple[str, Any]], rounds: int, reference: str) -> dict[str, list[tuple[float, float]]]:
    """Per mode, ``(seconds of the reference mode, seconds of the mode)`` per round: every round runs every mode once
    (the order rotated each round), each one right after a run of ``reference``, so that the ratio compares two
    runs seconds apart — on a shared or virtual machine the speed drifts by tens of per cent between minutes."""
    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    ref = dict(modes)[reference]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in modes}
    for r in range(rounds):
        for name, fn in modes[r % len(modes):] + modes[:r % len(modes)]:
            base = timed(ref)
            times[name].append((base, base if name == reference else timed(fn)))
    return times


def throughput(cfg: dict[str, Any], n: int, prompt: int, new: int, rounds: int) -> list[dict[str, Any]]:
    """Every mode on its own copy of the base model (so wrapping one never slows another), warmed up, then timed
    in interleaved rounds (:func:`_interleaved`): ``tok_per_s`` from the best round, ``vs_base`` the median over
    rounds of the mode's speed relative to the base-only engine run just before it."""
    import copy

    import torch

    import deltatune
    from deltatune.serve import SamplingParams

    g = torch.Generator().manual_seed(123)
    prompts = [torch.randint(1, cfg["vocab_size"], (prompt,), generator=g).tolist() for _ in range(n)]
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    base = _base(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    loras = {f"lora{i}": _delta(base, "lora", {"r": 8}, seed=i) for i in range(16)}
    hetero = {f"h{i}": _delta(base, m, c, seed=100 + i) for i, (m, c) in enumerate(HETERO)}
    names16 = [f"lora{i % 16}" for i in range(n)]
    merged = copy.deepcopy(base)
    deltatune.merge_delta(merged, loras["lora0"])
    engines = [  # (mode, model, deltas, row names, check each row against the request alone, engine config)
        ("base only", base, {}, [None] * n, False, {}),
        ("base rows, 16 deltas attached", copy.deepcopy(base), loras, [None] * n, False, {}),
        ("one LoRA merged", merged, {}, [None] * n, False, {}),
        ("one LoRA unmerged (every row)", copy.deepcopy(base), {"lora0": loras["lora0"]}, ["lora0"] * n, True, {}),
        ("one LoRA, merged while hot (merge_hot=0.9, window 8)", copy.deepcopy(base), {"lora0": loras["lora0"]},
         ["lora0"] * n, True, {"merge_hot": 0.9, "hot_window": 8}),
        ("16 LoRA r=8, one per row", copy.deepcopy(base), loras, names16, True, {}),
        ("heterogeneous: LoRA r8/r64, sparse 1%, DoRA, IA3, adapter", copy.deepcopy(base), hetero,
         [f"h{i % len(HETERO)}" for i in range(n)], True, {}),
    ]
    modes: list[tuple[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for mode, model, deltas, names, check, config in engines:
        engine = _engine(model, deltas, **config)
        engine.generate(prompts[:2], names[:2], params)  # warm-up
        row = {"mode": mode, "distinct_deltas": len({x for x in names if x})}
        if check:
            together = [o.token_ids for o in engine.generate(prompts, names, params)]
            alone = [engine.generate([p], [name], params)[0].token_ids for p, name in zip(prompts, names, strict=True)]
            row["equal_alone"] = alone == together
        rows.append(row)
        modes.append((mode, lambda e=engine, names=names: e.generate(prompts, names, params)))
    peft_modes = _peft_modes(cfg, prompts, new)
    rows += [{"mode": mode, "distinct_deltas": k} for mode, k, _ in peft_modes]
    times = _interleaved(modes + [(mode, fn) for mode, _, fn in peft_modes], rounds, "base only")
    every_base = [b for pairs in times.values() for b, _ in pairs]
    for row in rows:
        pairs = times[row["mode"]]
        best = min(every_base) if row["mode"] == "base only" else min(s for _, s in pairs)
        row.update(seconds=round(best, 3), tok_per_s=round(n * new / best, 1),
                   vs_base=round(statistics.median(b / s for b, s in pairs), 3), params_m=round(n_params / 1e6, 1))
    return rows


def _peft_modes(cfg: dict[str, Any], prompts: list[list[int]], new: int) -> list[tuple[str, int, Any]]:
    """``(mode, distinct adapters, callable)`` of the reference rows: HF ``generate`` of the bare base, PEFT's
    ``adapter_names`` mixed batch of 16 LoRAs and PEFT generating per adapter (each on its own model copy)."""
    import peft
    import torch

    plain = _base(cfg)
    ids = torch.tensor(prompts)
    n = len(prompts)
    opts = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    lora = peft.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    pm = peft.get_peft_model(_base(cfg), lora, adapter_name="a0")
    for i in range(1, 16):
        pm.add_adapter(f"a{i}", lora)
    pm.eval()
    names = [f"a{i % 16}" for i in range(n)]

    @torch.no_grad()
    def hf() -> None:
        plain.generate(ids, **opts)

    @torch.no_grad()
    def mixed() -> None:
        pm.generate(input_ids=ids, adapter_names=names, **opts)

    @torch.no_grad()
    def per_adapter() -> None:
        for i in range(16):
            rows_i = [k for k, name in enumerate(names) if name == f"a{i}"]
            if rows_i:
                pm.set_adapter(f"a{i}")
                pm.generate(input_ids=ids[rows_i], **opts)

    for fn in (hf, mixed):
        fn()  # warm-up
    return [("transformers generate, base only (reference)", 0, hf),
            ("PEFT adapter_names mixed batch, 16 LoRA r=8", 16, mixed),
            ("PEFT generate per adapter, 16 LoRA r=8", 16, per_adapter)]


def load_while_serving(cfg: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    from deltatune.serve import SamplingParams
    from deltatune.serve.requests import GenerateRequest

    base = _base(cfg)
    delta = _delta(base, "lora", {"r": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}, seed=7)
    path = delta.save(tmp / "load_delta")
    size = sum(f.stat().st_size for f in path.iterdir())
    engine = _engine(base, {})
    engine.start()
    times = []
    try:
        for i in range(5):
            for k in range(16):
                engine.submit(GenerateRequest([1 + k, 2, 3, 4], SamplingParams(max_tokens=64, ignore_eos=True)))
            time.sleep(0.05)
            t0 = time.perf_counter()
            engine.store.add(f"loaded{i}", path)
            times.append(1e3 * (time.perf_counter() - t0))
            busy = engine.pending()
            while engine.pending():
                time.sleep(0.01)
    finally:
        engine.stop()
    return [{"delta_mb": round(size / 1e6, 2), "load_ms_median": round(statistics.median(times), 2),
             "load_ms_max": round(max(times), 2), "requests_in_flight_at_load": busy}]


def coserving(cfg: dict[str, Any], tmp: Path, seconds: float, new: int) -> list[dict[str, Any]]:
    """Inference step latency (p50/p99, ms per decode step of 16 rows) with and without a co-served LoRA job, and the
    job's optimizer steps per minute; 16 requests are kept running (closed loop) for ``seconds``."""
    import torch

    import deltatune
    from deltatune.serve import SamplingParams
    from deltatune.serve.coserve import CoTrainConfig, CoTrainJob
    from deltatune.serve.requests import GenerateRequest

    rows = []
    for with_job in (False, True):
        base = _base(cfg)
        engine = _engine(base, {"lora0": _delta(base, "lora", {"r": 8}, seed=1)})
        g = torch.Generator().manual_seed(5)
        data = [torch.randint(1, cfg["vocab_size"], (64,), generator=g).tolist() for _ in range(8)]
        job = None
        if with_job:
            job = CoTrainJob(engine, deltatune.LoRAConfig(r=8), data,
                             CoTrainConfig(name="cotrained", out=str(tmp / "cotrained"), steps=10**9, lr=1e-4,
                                           step_tokens=96))
            engine.add_job(job)
        params = SamplingParams(max_tokens=new, ignore_eos=True)
        engine.generate([[1, 2, 3]] * 2, ["lora0", None], params)  # warm-up (the job trains meanwhile too)
        stamps: list[float] = []
        for k in range(16):
            engine.submit(GenerateRequest([1 + k, 2, 3, 4], params, ["lora0", None][k % 2]))
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            engine.step()
            stamps.append(time.perf_counter() - t0)
            done = 16 - engine.pending()
            for k in range(done):
                engine.submit(GenerateRequest([1 + k, 2, 3, 4], params, ["lora0", None][k % 2]))
        wall = time.perf_counter() - start
        rows.append({"job": with_job, "step_ms_p50": _pct(stamps, 0.5), "step_ms_p99": _pct(stamps, 0.99),
                     "steps": len(stamps), "job_steps_per_min": round(60 * len(job.losses) / wall, 1) if job else None,
                     "job_loss_first": round(job.losses[0], 3) if job and job.losses else None,
                     "job_loss_last": round(job.losses[-1], 3) if job and job.losses else None})
    return rows


# --- open-loop load test --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generator_process(url: str, names: list[str], rate: float, count: int, limit_s: float, max_tokens: int,
                       seed: int, queue: Any) -> None:
    """Poisson arrivals at ``rate`` per second, ``count`` requests at most, for at most ``limit_s`` seconds."""
    import asyncio

    import httpx2 as httpx

    async def main() -> list[dict[str, Any]]:
        rng = random.Random(seed)
        results: list[dict[str, Any]] = []
        async with httpx.AsyncClient(base_url=url, timeout=limit_s + 60,
                                     limits=httpx.Limits(max_connections=count)) as http:
            async def one(i: int) -> None:
                body = {"model": rng.choice(names), "prompt": f"load test request {i}", "max_tokens": max_tokens,
                        "temperature": 0, "stream": True, "ignore_eos": True}
                t0 = time.perf_counter()
                stamps: list[float] = []
                try:
                    async with http.stream("POST", "/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                stamps.append(time.perf_counter())
                    results.append({"ok": r.status_code == 200, "start": t0, "stamps": stamps})
                except Exception as exc:  # noqa: BLE001 - counted as an error
                    results.append({"ok": False, "start": t0, "stamps": stamps, "error": str(exc)[:200]})
            tasks, start = [], time.perf_counter()
            for i in range(count):
                if time.perf_counter() - start > limit_s:
                    break
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=limit_s + 60)
        return results

    queue.put(asyncio.run(main()))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(1e3 * values[min(len(values) - 1, int(q * len(values)))], 2)


def load_test(cfg: dict[str, Any], tmp: Path, rates: list[float], count: int, limit_s: float,
              max_tokens: int) -> list[dict[str, Any]]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = _base(cfg)
    base.save_pretrained(tmp / "base")
    vocab = {f"t{i}": i for i in range(cfg["vocab_size"] - 1)} | {"[UNK]": cfg["vocab_size"] - 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="t0").save_pretrained(tmp / "base")
    AutoTokenizer.from_pretrained(tmp / "base")  # readable
    names = ["base"]
    args = [sys.executable, "-m", "deltatune.cli", "serve", "--model", str(tmp / "base"), "--served-model-name", "base"]
    for i in range(8):
        _delta(base, "lora", {"r": 8}, seed=200 + i).save(tmp / f"srv{i}")
        args += ["--delta", f"d{i}={tmp / f'srv{i}'}"]
        names.append(f"d{i}")
    port = _free_port()
    proc = subprocess.Popen([*args, "--port", str(port), "--max-batch", "16"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        _wait_up(url, proc)
        ctx = mp.get_context("spawn")
        for rate in rates:
            queue = ctx.Queue()
            gen = ctx.Process(target=_generator_process, args=(url, names, rate, count, limit_s, max_tokens, 1, queue))
            t0 = time.perf_counter()
            gen.start()
            results = queue.get(timeout=limit_s + 180)
            gen.join()
            wall = time.perf_counter() - t0
            ok = [r for r in results if r["ok"] and r["stamps"]]
            ttft = [r["stamps"][0] - r["start"] for r in ok]
            itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
            tokens = sum(len(r["stamps"]) for r in ok)
            rows.append({"rate_per_s": rate, "requests": len(results), "errors": len(results) - len(ok),
                         "ttft_p50_ms": _pct(ttft, 0.5), "ttft_p99_ms": _pct(ttft, 0.99),
                         "itl_p50_ms": _pct(itl, 0.5), "itl_p99_ms": _pct(itl, 0.99),
                         "output_tok_per_s": round(tokens / wall, 1)})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return rows


def _wait_up(url: str, proc: subprocess.Popen, limit: float = 180) -> None:
    import httpx2 as httpx

    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"deltatune serve exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError("deltatune serve did not start in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens, one round (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/serve.json", help="JSON report (Markdown beside it)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (every mode once per round)")
    parser.add_argument("--skip-load-test", action="store_true", help="skip the open-loop HTTP load test")
    a = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = QUICK if a.quick else FULL
    rounds = a.rounds or (1 if a.quick else 3)
    new, prompt = (8, 16) if a.quick else (32, 32)
    sections = [{"title": "Output tokens per second at batch 16", "rows": throughput(cfg, 16, prompt, new, rounds),
                 "columns": ["mode", "distinct_deltas", "seconds", "tok_per_s", "vs_base", "equal_alone", "params_m"],
                 "notes": [f"{prompt} prompt tokens and {new} greedy new tokens per request, 16 requests; {rounds} "
                           "interleaved round(s), every mode once per round, each right after a base-only run: "
                           "seconds and tok_per_s from the best round, vs_base the median over rounds of the speed "
                           "relative to that base-only run; deltatune rows run deltatune.serve.Engine (each mode on "
                           "its own copy of the base), PEFT rows HF generate"]}]
    with tempfile.TemporaryDirectory() as tmp:
        sections.append({"title": "Loading a delta while serving", "rows": load_while_serving(cfg, Path(tmp)),
                         "columns": ["delta_mb", "load_ms_median", "load_ms_max", "requests_in_flight_at_load"]})
        sections.append({"title": "Co-serving: inference step latency with and without a fine-tuning job",
                         "rows": coserving(cfg, Path(tmp), 5.0 if a.quick else 60.0, new),
                         "columns": ["job", "step_ms_p50", "step_ms_p99", "steps", "job_steps_per_min",
                                     "job_loss_first", "job_loss_last"],
                         "notes": ["16 requests kept running (closed loop), half on a LoRA; the job trains a new "
                                   "LoRA r=8 on 64-token sequences with what each step leaves of 96 tokens"]})
        if not a.skip_load_test:
            rates, count, limit = ([2.0, 4.0, 8.0], 12, 20.0) if a.quick else ([2.0, 8.0, 32.0], 200, 120.0)
            sections.append({"title": "Open-loop load over loopback (Poisson arrivals, streaming completions)",
                             "rows": load_test(cfg, Path(tmp), rates, count, limit, 8 if a.quick else 32),
                             "columns": ["rate_per_s", "requests", "errors", "ttft_p50_ms", "ttft_p99_ms",
                                         "itl_p50_ms", "itl_p99_ms", "output_tok_per_s"],
                             "notes": ["server: `deltatune serve` with 8 LoRA r=8 deltas, its own process; load "
                                       "generator: another process; each request to a random delta or the base"]})
    meta = {**machine_meta(), "quick": a.quick, "model": cfg}
    print(write_sections(a.out, meta, sections, title="deltatune serve benchmark"))


if __name__ == "__main__":
    main()
