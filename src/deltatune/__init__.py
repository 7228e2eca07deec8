"""deltatune: every fine-tuning as a first-class, composable delta over a frozen base model."""

__version__ = "0.1.0"

from deltatune.algebra.task_heads import for_task, task_names  # noqa: E402
from deltatune.delta import Delta  # noqa: E402
from deltatune.generation import generate  # noqa: E402
from deltatune.io.delta_format import load_delta, save_delta  # noqa: E402
from deltatune.io.peft_export import export_peft  # noqa: E402
from deltatune.io.peft_format import load_peft_adapter  # noqa: E402
from deltatune.methods import FullConfig, LoRAConfig, SparseConfig, get_method, make_config  # noqa: E402
from deltatune.methods.hft import half_reset  # noqa: E402
from deltatune.model import (  # noqa: E402
    apply_delta,
    attach,
    detach,
    merge_delta,
    mixed_batch,
    revert_delta,
)
from deltatune.prediction import predict  # noqa: E402
from deltatune.train.stacking import apply_stacked  # noqa: E402

__all__ = [
    "Delta", "FullConfig", "LoRAConfig", "SparseConfig", "__version__", "apply_delta", "apply_stacked", "attach",
    "detach", "for_task", "half_reset", "task_names",
    "export_peft", "generate", "load_peft_adapter",
    "get_method", "load_delta", "make_config", "merge_delta", "mixed_batch", "predict", "revert_delta", "save_delta",
]
