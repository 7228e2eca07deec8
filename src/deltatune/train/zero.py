"""What deltatune's loop needs from a DeepSpeed (ZeRO) launch, checked before ``accelerator.prepare``.

``accelerate launch --config_file configs/accelerate/zero2.yaml`` hands the loop's model and optimizer to
DeepSpeed.  ZeRO stage 2 partitions the optimizer state and gradients of the trainable tensors (the delta and
the task heads) over the GPUs and keeps an fp32 master copy of them; the base stays whole.  The loop fits that
only with: one micro-batch per step (DeepSpeed's engine steps inside ``accelerator.backward``), no schedule hook
that edits the delta or its optimizer state behind ZeRO's master copy (SpIEL's drop/regrow), ZeRO stage ≤ 2
(stage 3 partitions the base weights the parts read directly), and fp32 (DeepSpeed's bf16/fp16 cast the delta
itself).  Anything else is a :class:`ConfigError` naming the setting.  Accelerate selects DeepSpeed only on
GPUs; on a CPU-only machine the run stays DDP and nothing here applies.
"""

from __future__ import annotations

from typing import Any

from deltatune.errors import ConfigError

#: hooks known to leave the trainable tensors, their trainability and the optimizer state alone
ZERO_SAFE_HOOKS = frozenset({"PaddingMask", "StackGuard"})


def safe_under_zero(hook: object) -> bool:
    """A hook may declare ``safe_under_zero = True``; otherwise only :data:`ZERO_SAFE_HOOKS` are (unknown: refused)."""
    return bool(getattr(hook, "safe_under_zero", type(hook).__name__ in ZERO_SAFE_HOOKS))


def check_deepspeed(ds_config: dict[str, Any], grad_accum: int, hooks: list, batch_size: int) -> dict[str, Any]:
    """Validate a DeepSpeed config for this run and fill its ``"auto"`` batch size (``batch_size``) and gradient
    clipping (off, as in the loop); returns ``ds_config`` (changed in place)."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage")
    if stage not in (0, 1, 2):
        raise ConfigError(f"DeepSpeed config zero_optimization.stage is {stage!r}; deltatune's loop supports ZeRO "
                          f"stages 0–2 (stage 3 partitions the base weights its parts read directly)")
    if grad_accum != 1:
        raise ConfigError(f"train config.grad_accum is {grad_accum}; under DeepSpeed deltatune steps once per "
                          f"micro-batch — raise --batch-size or add GPUs instead")
    unsafe = [type(h).__name__ for h in hooks if not safe_under_zero(h)]
    if unsafe:
        raise ConfigError(f"the schedule hooks {', '.join(unsafe)} change the delta's tensors, which trains, or its "
                          f"optimizer state, which ZeRO keeps in its own partitions; under DeepSpeed turn them off "
                          f"(sparse: --set regrow=false) or use the FSDP config configs/accelerate/fsdp_cpu.yaml")
    for key in ("bf16", "fp16"):
        if (ds_config.get(key) or {}).get("enabled") in (True, "true"):
            raise ConfigError(f"DeepSpeed config {key}.enabled is true; it would cast the delta itself — set it to "
                              f"false (deltatune trains the delta in fp32)")
    ga = ds_config.get("gradient_accumulation_steps", 1)
    if ga not in (1, "auto"):
        raise ConfigError(f"DeepSpeed config gradient_accumulation_steps is {ga!r}; it must be 1 (or auto)")
    ds_config["gradient_accumulation_steps"] = 1
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds_config["train_micro_batch_size_per_gpu"] = batch_size
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = 0.0
    return ds_config


def configure(accelerator, grad_accum: int, hooks: list, batch_size: int) -> None:
    """:func:`check_deepspeed` on this launch's DeepSpeed config; nothing when the run is not a DeepSpeed run."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    check_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, grad_accum, hooks, batch_size)
