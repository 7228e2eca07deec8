"""FSDP (``FULL_SHARD``) of the frozen base model, the delta kept whole on every rank.

``accelerate launch --config_file configs/accelerate/fsdp_cpu.yaml -m deltatune.cli train …`` sets
``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` variables; :func:`shard` reads them through accelerate's
:class:`~accelerate.utils.FullyShardedDataParallelPlugin` (sharding strategy, auto-wrap policy, prefetch,
state-dict type) and wraps the model with PyTorch's FSDP (version 1, ``use_orig_params=True``):

* **What is sharded:** every frozen base parameter, in one flat parameter per wrapped unit (the model's
  ``_no_split_modules``, e.g. ``BertLayer``, with the default ``TRANSFORMER_BASED_WRAP``).  A unit is gathered
  for its forward and backward and freed again after each (``FULL_SHARD``), so each rank holds 1/N of the base.
* **What is not:** the trainable tensors (the delta's parts and the task heads) are FSDP's ``ignored_states``:
  whole on every rank, like DDP.  SpIEL's drop and regrow, and ``SparseAdamW``'s per-element state, index
  whole value vectors; a delta is a few percent of the model at most, so sharding it saves little.  Their
  gradients are averaged over ranks before every optimiser step (:class:`ReplicatedGradients`), exactly as
  DDP does (each gradient divided by N, then summed), so FSDP and DDP runs give the same delta.
* **Saving:** the delta needs no gather (it is whole on every rank); rank 0 writes it in deltatune's own
  format, unsharded, as in a DDP run, and every rank checks that all ranks hold the same delta.

Accelerate (1.x) selects FSDP only on accelerators: on a CPU-only machine its state stays ``MULTI_CPU``, so
deltatune wraps the model itself in both cases and passes only the optimizer through ``accelerator.prepare``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import MethodType

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from deltatune.errors import ConfigError

ENV_FLAG = "ACCELERATE_USE_FSDP"


def requested() -> bool:
    """True when the process was started by ``accelerate launch`` with an FSDP config (or ``--use_fsdp``)."""
    return os.environ.get(ENV_FLAG, "false").lower() == "true"


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that trains (delta parts and task heads), each once."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(seen.values())


class ReplicatedGradients:
    """Averages the gradients of the replicated (FSDP-ignored) parameters over all ranks, as DDP does:
    ``g ← Σ_r (g_r / N)``.  Installed as an optimizer step pre-hook, so it runs once per optimiser step, after
    the last micro-batch of a gradient-accumulation window (FSDP's ``no_sync`` covers the others)."""

    def __init__(self, params: Iterable[nn.Parameter], model: nn.Module | None = None) -> None:
        self.params, self.model = list(params), model
        self.ids = {id(p) for p in self.params}

    def __call__(self, *_args) -> None:
        if self.model is not None:
            self.check_trainable(self.model)
        world = dist.get_world_size()
        if world == 1 or not self.params:
            return
        ref = self.params[0]
        present = torch.tensor([0.0 if p.grad is None else 1.0 for p in self.params], device=ref.device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)  # a gradient on any rank: every rank takes part
        grads = []
        for p, there in zip(self.params, present.tolist(), strict=True):
            if there and p.grad is None:
                p.grad = torch.zeros_like(p)
            if there:
                grads.append(p.grad)
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        flat.div_(world)  # DDP's order: divide, then sum (exact for N a power of two)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g).to(g.dtype))
            offset += n


    def check_trainable(self, model: nn.Module) -> None:
        """Refuse a schedule that made a sharded (frozen at wrap time) tensor trainable (e.g. layer sampling)."""
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in self.ids:
                raise ConfigError(f"{name} started training during an FSDP run; tensors the method trains only later "
                                  f"(layer sampling, phases) are sharded with the frozen base — train this method "
                                  f"with DDP (accelerate launch --multi_gpu) instead")


def plugin_from(accelerator: Accelerator):
    """The FSDP settings of this launch: accelerate's plugin (GPU route) or one read from the ``FSDP_*`` variables
    that ``accelerate launch`` sets (CPU route: accelerate keeps its state at ``MULTI_CPU`` there)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin is not None:
        return check_plugin(accelerator.state.fsdp_plugin)
    return check_plugin(FullyShardedDataParallelPlugin())


def check_plugin(plugin):
    """Refuse FSDP settings this route cannot honour (typed :class:`ConfigError` naming the config field)."""
    if plugin.fsdp_version != 1:
        raise ConfigError(f"accelerate config fsdp_config.fsdp_version is {plugin.fsdp_version}; deltatune's FSDP "
                          f"route uses version 1 (use_orig_params=True, frozen base sharded) — set fsdp_version: 1")
    if plugin.cpu_offload is not None and getattr(plugin.cpu_offload, "offload_params", False):
        raise ConfigError("accelerate config fsdp_config.fsdp_offload_params is true, which deltatune's FSDP route "
                          "does not support (the delta's parts read the base weights directly); set it to false")
    return plugin


def wrap(model: nn.Module, plugin, device: torch.device) -> nn.Module:
    """``model`` in FSDP with ``plugin``'s sharding strategy, wrap policy and prefetch, ``use_orig_params=True`` and
    every trainable tensor in ``ignored_states`` (whole on every rank).  Needs an initialised process group."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(f"{ENV_FLAG}=true but no process group is initialised: start the run with `accelerate "
                          f"launch --config_file configs/accelerate/fsdp_cpu.yaml -m deltatune.cli train …`")
    replicated = trainable_parameters(model)
    if not replicated:
        raise ConfigError("FSDP run without trainable parameters: attach a delta first")
    plugin.set_auto_wrap_policy(model)
    return FSDP(
        model,
        sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
        auto_wrap_policy=plugin.auto_wrap_policy,
        backward_prefetch=plugin.backward_prefetch,
        forward_prefetch=plugin.forward_prefetch,
        limit_all_gathers=plugin.limit_all_gathers,
        use_orig_params=True,  # frozen and (ignored) trainable tensors keep their names and objects
        sync_module_states=False,  # every rank loads the same base and seeds the same delta
        ignored_states=replicated,
        # on CPU the device must be named (FSDP otherwise looks for an accelerator), without an index
        device_id=torch.device("cpu") if device.type == "cpu" else device,
    )


def shard(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
    """:func:`wrap` with this launch's settings, the replicated gradients averaged before each
    ``optimizer.step()`` and, under bf16, the forward run in autocast as ``accelerator.prepare`` would do it.
    Call after ``attach`` and after creating ``optimizer`` over the trainable parameters."""
    plugin = plugin_from(accelerator)
    wrapped = wrap(model, plugin, accelerator.device)
    optimizer.register_step_pre_hook(ReplicatedGradients(trainable_parameters(wrapped), wrapped))
    if accelerator.mixed_precision != "no":
        wrapped.forward = MethodType(accelerator.autocast()(type(wrapped).forward), wrapped)
    _report(accelerator, wrapped, plugin)
    return wrapped


def layout(model: nn.Module) -> dict[str, int]:
    """FSDP units, base elements held by this rank (its shards) and in all, and replicated trainable elements."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = [m for m in FSDP.fsdp_modules(model) if m._handle is not None]
    local = sum(m._handle.flat_param._sharded_size.numel() for m in units)
    full = sum(m._handle.flat_param._unpadded_unsharded_size.numel() for m in units)
    return {"units": len(units), "base_local": int(local), "base_total": int(full),
            "replicated": sum(p.numel() for p in trainable_parameters(model))}


def _report(accelerator: Accelerator, model: nn.Module, plugin) -> None:
    info = layout(model)
    if accelerator.is_main_process:
        from rich.console import Console

        chosen = plugin.sharding_strategy or plugin.reshard_after_forward
        strategy = getattr(chosen, "name", chosen)
        Console(stderr=True).print(
            f"[bold]deltatune[/bold] FSDP {strategy}: {info['units']} units, this rank holds {info['base_local']:,} "
            f"of {info['base_total']:,} base values; {info['replicated']:,} trainable values on every rank",
            highlight=False)
