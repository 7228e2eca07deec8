"""The training loop, top to bottom, on accelerate (1 CPU … N processes with DDP).

The delta's parameters train at ``lr`` and the task heads in their own optimizer group at ``head_lr`` (default
10 × ``lr``, at most 2e-2: a fresh head starts at random).  Per optimiser step: method hooks ``before_step`` →
the window's ``grad_accum`` micro-batches fetched → for each: forward, NaN/Inf check, backward (gradients
synchronised only on the last) → optimiser and LR-schedule step → hooks ``after_step`` → periodic eval (keep-best)
and checkpoint.  The data order is a seeded permutation per epoch, sharded by rank, so a resumed run sees exactly
the batches it would have.

A window's loss is the mean over its labelled items, as one batch of its rows (and HF ``Trainer``) would give:
micro-batch ``i`` backpropagates ``ℓ_i · n_i / N + aux_i / grad_accum`` (:mod:`deltatune.train.accumulate`;
under DDP per process, the processes' gradients then averaged).  The logged ``loss`` is what was backpropagated.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import nn

from deltatune.delta import Delta
from deltatune.errors import ConfigError, DataError, DeltaFormatError, TrainingDiverged
from deltatune.io.atomic import atomic_file, guard_output, recover_dir
from deltatune.io.delta_format import save_delta
from deltatune.io.outputs import write_marker
from deltatune.methods.registry import TrainHook, get_method, unwrap_optimizer
from deltatune.model import HALF_PRECISION, attach
from deltatune.provenance import Provenance, path_reference
from deltatune.train import checkpoint as ckpt
from deltatune.train import fsdp, zero
from deltatune.train.accumulate import labelled_items, window_share
from deltatune.train.config import TrainConfig
from deltatune.train.evaluate import batches, evaluate
from deltatune.train.integration import param_groups
from deltatune.train.run_record import PATH_SETTINGS, check_same_run, run_settings
from deltatune.train.stacking import prepare_stack
from deltatune.train.tasks import Task, build_task
from deltatune.train.tracking import METRICS_FILE, RunLog

RUN_KIND = "train_run"
#: What a run folder holds; its marker lists these, so a later run may replace them (and nothing else).
RUN_ENTRIES = ("delta", "best", "checkpoint", "history.json", METRICS_FILE, "logs")


@dataclass
class TrainResult:
    delta: Delta
    delta_dir: Path
    best_dir: Path | None
    before: dict[str, float]
    final: dict[str, float]
    best: dict[str, float] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    is_main: bool = True


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to 1, then linear/cosine decay to 0 (or constant)."""
    warmup = int(cfg.warmup_ratio * cfg.max_steps)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, cfg.max_steps - warmup)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return fn


class ShardedBatches:
    """Endless micro-batches: per-epoch permutation from ``seed + epoch``, rank ``r`` takes ``perm[r::world]``."""

    def __init__(self, task: Task, batch_size: int, seed: int, rank: int, world: int, device: torch.device,
                 epoch: int = 0, offset: int = 0) -> None:
        self.task, self.batch_size, self.seed, self.rank, self.world = task, batch_size, seed, rank, world
        self.device, self.epoch, self.offset = device, epoch, offset
        n = len(task.train) // world
        self.per_epoch = n // batch_size
        if self.per_epoch == 0:
            raise DataError(f"{len(task.train)} training example(s) cannot fill one batch of {batch_size} per process "
                            f"({world} process(es)); lower --batch-size or give more data")

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            perm = torch.randperm(len(self.task.train), generator=gen).tolist()[self.rank::self.world]
            order = perm[self.offset * self.batch_size:self.per_epoch * self.batch_size]
            for batch in batches(self.task.train, order, self.batch_size, self.task.pad_token_id, self.device):
                self.offset += 1
                yield batch
            self.epoch, self.offset = self.epoch + 1, 0


def _any_rank(flag: bool, accelerator: Accelerator) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def delta_digest(delta: Delta) -> str:
    h = hashlib.sha256()
    for name in sorted(delta.parts):
        for k, t in sorted(delta.parts[name].state().items()):
            h.update(f"{name}.{k}".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for name in sorted(delta.heads):
        for key, t in sorted(delta.heads[name].items()):
            h.update(f"{name}.{key}".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rank_digests(digest: str, accelerator: Accelerator) -> list[str]:
    if accelerator.num_processes == 1:
        return [digest]
    out: list[str] = [""] * accelerator.num_processes
    dist.all_gather_object(out, digest)
    return out


def step_lrs(optimizer: Any) -> list[float]:
    """The LR of each parameter group for the optimiser step about to run: its ``lr``, or — for an optimiser that
    puts other LRs in place for one step (LT-SFT's restarted masked phase) — what its ``step_lrs()`` says.  The
    records of the loop carry these, so a logged ``lr`` is the one the step used."""
    inner = unwrap_optimizer(optimizer)  # under accelerate's wrapper
    own = getattr(inner, "step_lrs", None)
    return list(own()) if callable(own) else [float(g["lr"]) for g in inner.param_groups]


def train(cfg: TrainConfig, method_config: Any,
          on_eval: Callable[[int, dict[str, float | None]], None] | None = None) -> TrainResult:
    """Train a delta of ``method_config.method`` on ``cfg.task``; write ``out_dir/delta`` (and ``best``).

    A new run (not ``resume``) refuses an ``out_dir`` that holds anything but an earlier run, unless
    ``cfg.overwrite``.  Once the new run is set up (data, model, method, hooks), the earlier run's entries are
    removed (:func:`clear_earlier_run`); the subfolders (``delta``, ``best``, ``checkpoint``) are then the run's own
    and are replaced without a further check (``overwrite=True``).  ``on_eval(step, metrics)`` is called after each
    evaluation of the delta in its final form (not during LT-SFT's dense phase 1: ``TrainHook.delta_is_final``;
    ``deltatune search`` reports them to its pruner; raising there stops the run).
    """
    out = Path(cfg.out_dir)
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != cfg.mixed_precision:
        AcceleratorState._reset_state()  # a later run in this process asks another precision (process group kept)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.report_to or None,
                              project_dir=str(out / "logs"), mixed_precision=cfg.mixed_precision)
    if not cfg.resume:
        guard_output(out, RUN_KIND, cfg.overwrite)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            write_marker(out, RUN_KIND, RUN_ENTRIES)
    set_seed(cfg.seed)
    log = _Logger(accelerator, cfg.progress)
    task = build_task(cfg)
    set_seed(cfg.seed)
    model = in_full_precision(task.load_model(), log).to(accelerator.device)
    model.train()
    stack = prepare_stack(model, cfg.on)  # `train --on DELTA`: the underlying deltas merged into the base first
    if stack is not None:
        refuse_stack_inside(out, stack.paths)
    method = get_method(method_config.method)
    delta = attach(model, method_config)
    delta.provenance = train_provenance(cfg, task)
    if stack is not None:
        stack.record(delta)  # the pristine base's fingerprint; the underlying deltas as parents (path, digest)
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    groups = param_groups(model, delta, lr, cfg.head_lr)  # task heads in their own group, at their own LR
    optimizer = method.optimizer(groups, lr, cfg.weight_decay, method_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    hooks = method.hooks(model, delta, method_config, optimizer, cfg.max_steps, cfg.grad_accum)
    hooks += [stack.guard()] if stack is not None else []  # a resumed run checks its underlying deltas
    try:  # until the training loop's own try: a refusal here (a resume of another run) still closes the hooks
        if fsdp.requested():  # `accelerate launch` with an FSDP config: the frozen base is sharded (train/fsdp.py)
            ddp_model, optimizer = fsdp.shard(accelerator, model, optimizer), accelerator.prepare(optimizer)
        else:
            zero.configure(accelerator, cfg.grad_accum, hooks, cfg.batch_size)  # a DeepSpeed launch: refuse what breaks
            ddp_model, optimizer = accelerator.prepare(model, optimizer)
        raw_model = accelerator.unwrap_model(ddp_model)
        eval_model = ddp_model if fsdp.requested() else raw_model  # FSDP gathers its shards in its own forward

        step, epoch, offset, history = 0, 0, 0, []
        before, best = {}, None
        run = run_settings(cfg, delta)
        delta.provenance.train["data_fingerprint"] = run["data"]  # eval's rebuilt hold-out checks it
        if cfg.resume:
            state = _resume(out / "checkpoint", raw_model, delta, optimizer, scheduler, hooks, accelerator, run)
            step, epoch, offset = state["step"], state["epoch"], state["offset"]
            before, best, history = state["before"], state["best"], state["history"]
            log.say(f"resumed from {out / 'checkpoint'} at step {step}")
        elif cfg.eval_before:
            before = _defined(evaluate(eval_model, task, cfg.eval_batch_size, accelerator.device))
            log.say(f"before training: {_fmt(before)}")

        if not cfg.resume and accelerator.is_main_process:  # set up without error: the earlier run can go
            clear_earlier_run(out)
        run_log = RunLog(out, accelerator, asdict(cfg), step if cfg.resume else None)
        if before and not cfg.resume:
            run_log.record({"step": 0, "eval": before})
        data = ShardedBatches(task, cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes,
                              accelerator.device, epoch, offset)
        stream = iter(data)
        last_ckpt: str | None = str(out / "checkpoint") if (out / "checkpoint").exists() and cfg.resume else None
        progress = log.progress(cfg.max_steps, step)
    except BaseException:
        _close_hooks(hooks)  # in-place training gives the base its tensors back, its θ₀ file is deleted
        raise
    try:
        while step < cfg.max_steps:
            started = time.perf_counter()
            for hook in hooks:
                hook.before_step(step)
            running, running_aux = 0.0, 0.0
            window = [next(stream) for _ in range(cfg.grad_accum)]  # all first: their items weigh each one
            items = [labelled_items(batch["labels"], task.is_lm) for batch in window]
            total = sum(items)  # N: the window's labelled items on this process
            for micro, batch in enumerate(window):
                sync = micro == cfg.grad_accum - 1
                with nullcontext() if sync else accelerator.no_sync(ddp_model):
                    own = ddp_model(**batch).loss  # the mean over this micro-batch's labelled items
                    loss = window_share(own, items[micro], total)
                    aux = delta.aux_loss()  # parts' auxiliary losses (e.g. load balancing), coefficients applied
                    if aux is not None:  # the window's mean of its micro-batches' auxiliary losses
                        running_aux += float(aux.detach()) / cfg.grad_accum
                        own, loss = own + aux, loss + aux / cfg.grad_accum
                    if _any_rank(not torch.isfinite(loss).item(), accelerator):
                        raise TrainingDiverged(step + 1, float(own.detach()), last_ckpt)
                    accelerator.backward(loss)
                running += float(loss.detach())
            used = step_lrs(optimizer)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            try:
                for hook in hooks:
                    hook.after_step(step)
            except TrainingDiverged as exc:  # a hook does not know the run's checkpoints: name the last one
                if exc.checkpoint is not None or last_ckpt is None:
                    raise
                raise TrainingDiverged(exc.step, exc.loss, last_ckpt, exc.tensor) from exc
            log.advance(progress, running)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()  # the step's kernels are counted in its own step_s
            record: dict[str, Any] = {"step": step, "loss": running, "lr": used[0],
                                      "step_s": time.perf_counter() - started}
            if len(used) > 1:
                record["head_lr"] = used[-1]
            if delta.has_aux_loss:
                record["aux_loss"] = running_aux
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
                metrics = _defined(evaluate(eval_model, task, cfg.eval_batch_size, accelerator.device))
                record["eval"] = metrics
                log.say(f"step {step}: {_fmt(metrics)}")
                final_form = all(hook.delta_is_final() for hook in hooks)  # LT-SFT's dense phase 1 is not kept
                if on_eval is not None and final_form:
                    on_eval(step, metrics)
                if metrics and cfg.keep_best and final_form and _better(metrics, best, task):
                    best = {**metrics, "step": step}
                    delta.snapshot_heads(raw_model)
                    if accelerator.is_main_process:
                        save_delta(delta, out / "best", metrics={"best": best, "before": before},
                                   overwrite=True)
            history.append(record)
            run_log.record(record)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                bad = _first_non_finite(raw_model)
                if _any_rank(bad is not None, accelerator):
                    raise TrainingDiverged(step, float("nan"), last_ckpt, tensor=bad)
                _save_checkpoint(out, accelerator, raw_model, delta, optimizer, scheduler, hooks, step, data,
                                 before, best, history, run)
                last_ckpt = str(out / "checkpoint")
    finally:
        _close_hooks(hooks)
        log.close(progress)
        run_log.close()

    final = history[-1].get("eval", {}) if history else {}
    delta.snapshot_heads(raw_model)
    digests = _rank_digests(delta_digest(delta), accelerator)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the trained delta: {digests}")
    summary = {"before": before, "final": final, "best": best, "steps": step, "world_size": accelerator.num_processes,
               "rank_digests_equal": True, "digest": digests[0]}
    if accelerator.is_main_process:
        save_delta(delta, out / "delta", metrics=summary, overwrite=True)
        with atomic_file(out / "history.json") as tmp:
            tmp.write_text(json.dumps(history, indent=1))
        log.say(f"delta written to {out / 'delta'}")
    accelerator.wait_for_everyone()
    delta.metrics.update(summary)
    best_dir = out / "best" if best else None
    return TrainResult(delta, out / "delta", best_dir, before, final, best, history, accelerator.is_main_process)


def in_full_precision(model: nn.Module, log: _Logger | None = None) -> nn.Module:
    """``model`` in fp32 where its checkpoint stored half-precision weights: transformers 5 loads a checkpoint in
    its stored dtype, and a delta created on a bf16 base would train in bf16, where AdamW loses every update smaller
    than 2⁻⁸ of a value.  Training runs in fp32 (as transformers 4 loaded every model); ``--mixed-precision bf16``
    runs the forward and backward under bf16 autocast while the delta and optimiser stay fp32.  The upcast is exact,
    so the base's fingerprint (and applying the delta to the bf16 checkpoint later) is unchanged."""
    half = {p.dtype for p in model.parameters() if p.dtype in HALF_PRECISION}
    if not half:
        return model
    if log is not None:
        log.say(f"the base's weights are {', '.join(sorted(str(d).removeprefix('torch.') for d in half))}: "
                "training in fp32 (--mixed-precision bf16 for bf16 compute)")
    return model.float()


def refuse_stack_inside(out: Path, paths: Sequence[str]) -> None:
    """:class:`ConfigError` when an underlying delta (``--on``, or a delta one of them was trained on) lies in one
    of the entries this run writes into ``out`` (``delta``, ``best``, ``checkpoint``): the run would replace the
    delta it trains on, and its own record of that delta (path and digest) would then name a delta that is gone."""
    owned = [(out / name).resolve() for name in RUN_ENTRIES]
    for path in paths:
        resolved = Path(path).resolve()
        inside = next((o for o in owned if resolved == o or o in resolved.parents), None)
        if inside is not None:
            raise ConfigError(f"underlying delta {path} lies in {inside}, which this run writes (--out {out}); "
                              "train into another --out, or copy the underlying delta elsewhere first")


def clear_earlier_run(out: Path) -> None:
    """Remove what an earlier run left in ``out`` (:data:`RUN_ENTRIES`) before a new run there starts
    (:func:`~deltatune.io.outputs.guard_output` let it in): a run that writes no ``best`` or no checkpoint would
    otherwise leave the earlier run's beside its own delta, and a crash would leave the earlier ``delta`` looking
    like this run's result."""
    for name in RUN_ENTRIES:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def _close_hooks(hooks: list[TrainHook]) -> None:
    """Each hook gives back what it took: in-place training the base's tensors (``methods/in_place.py``).  Every
    hook is closed even if one fails; the first failure is raised after."""
    failure: BaseException | None = None
    for hook in hooks:
        try:
            hook.close()
        except BaseException as exc:  # noqa: BLE001 - the others still give back what they took
            failure = failure or exc
    if failure is not None:
        raise failure


def train_provenance(cfg: TrainConfig, task: Task) -> Provenance:
    """Base, task (name, and for a user's data its columns and label map) and training configuration."""
    train = asdict(cfg)
    for key in PATH_SETTINGS:  # eval, compress calibration and predict read them later, from any folder
        train[key] = path_reference(train[key])
    return Provenance(operation="train", base=train["model"], task={"name": task.name, **(task.info or {})},
                      train=train)


#: What loading a hook, optimiser or scheduler state of the wrong shape raises (each a :class:`DeltaFormatError`).
_STATE_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError)


def _resume(where: Path, model: nn.Module, delta: Delta, optimizer, scheduler, hooks,
            accelerator: Accelerator, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the checkpoint at ``where`` into the hooks (first: a schedule may change what trains), the delta's
    tensors, the optimizer, scheduler and RNGs; return its state.  A checkpoint of other settings is refused."""
    if accelerator.is_main_process:
        recover_dir(where)  # roll back an interrupted swap once, before every rank reads the checkpoint
    accelerator.wait_for_everyone()
    state = ckpt.load_checkpoint(where, recover=False)  # rolled back above, once
    if run is not None:  # None: a caller without a run of its own (a loader check)
        check_same_run(where, state.get("run"), run)
    loaded = ckpt.hooks_for(hooks, len(state["hooks"]))
    if loaded is None or len(state["rng"]) != accelerator.num_processes:
        raise DeltaFormatError(f"{where}: checkpoint has {len(state['hooks'])} hook state(s) for "
                               f"{len(state['rng'])} process(es); this run has {len(hooks)} for "
                               f"{accelerator.num_processes} — was it written by another method or world size?")
    try:
        for hook, hs in zip(loaded, state["hooks"], strict=True):
            hook.load_state_dict(hs)
    except _STATE_ERRORS as exc:
        raise DeltaFormatError(f"{where}: hook state does not fit this run ({str(exc)[:80]})") from None
    # a checkpoint older than in-place training (its hook states leave that stateless hook out) holds Δθ throughout
    legacy = len(state["hooks"]) != len(hooks)
    bound_then = set(state["bound"]["parts"]) if "bound" in state else (set() if legacy else None)
    ckpt.restore_trainable(model, state["trainable"], where, delta, bound_then)
    ckpt.check_parts(state.get("parts"), delta, where)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except _STATE_ERRORS as exc:
        raise DeltaFormatError(f"{where}: optimizer or scheduler state does not fit this run "
                               f"({str(exc)[:80]})") from None
    ckpt.set_rng_state(state["rng"][accelerator.process_index], where)
    return state


def _save_checkpoint(out: Path, accelerator: Accelerator, model: nn.Module, delta: Delta, optimizer, scheduler,
                     hooks, step: int, data: ShardedBatches, before, best, history, run: dict[str, Any]) -> None:
    rngs = [ckpt.rng_state()]
    if accelerator.num_processes > 1:
        rngs = [None] * accelerator.num_processes
        dist.all_gather_object(rngs, ckpt.rng_state())
    if accelerator.is_main_process:
        ckpt.save_checkpoint(out / "checkpoint", overwrite=True, payload={
            "trainable": ckpt.trainable_state(model, delta), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "hooks": [h.state_dict() for h in hooks], "step": step,
            "epoch": data.epoch, "offset": data.offset, "before": before, "best": best, "history": history,
            "rng": rngs, "run": run, "parts": ckpt.parts_record(delta), "bound": ckpt.bound_record(delta),
        })
    accelerator.wait_for_everyone()


def _first_non_finite(model: nn.Module) -> str | None:
    """Name of the first trainable tensor holding NaN/Inf (checked before a checkpoint is written)."""
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            return name
    return None


def _better(metrics: dict[str, float], best: dict[str, float] | None, task: Task) -> bool:
    value = metrics.get(task.main_metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value > best[task.main_metric] if task.greater_is_better else value < best[task.main_metric]


def _defined(metrics: dict[str, float]) -> dict[str, float | None]:
    """Metrics with undefined values as ``None``: a correlation of constant predictions is NaN, which is not an
    error during training (the loss is checked separately) but cannot be stored in a manifest (finite JSON only)."""
    return {k: v if v is None or math.isfinite(v) else None for k, v in metrics.items()}


def _fmt(metrics: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {'undefined' if v is None else f'{v:.4f}'}" for k, v in metrics.items())


class _Logger:
    """Prints and a rich progress bar on the main process only."""

    def __init__(self, accelerator: Accelerator, show_bar: bool) -> None:
        self.main, self.show_bar = accelerator.is_main_process, show_bar

    def say(self, text: str) -> None:
        if self.main:
            from rich.console import Console

            Console(stderr=True).print(f"[bold]deltatune[/bold] {text}", highlight=False)

    def progress(self, total: int, done: int):
        if not (self.main and self.show_bar):
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                       console=None, transient=False)
        bar.start()
        bar.add_task("train", total=total, completed=done, loss=float("nan"))
        return bar

    def advance(self, bar, loss: float) -> None:
        if bar is not None:
            bar.update(bar.task_ids[0], advance=1, loss=loss)

    def close(self, bar) -> None:
        if bar is not None:
            bar.stop()
