"""Built-in methods; importing this package registers them."""

from deltatune.methods import full, lora, sparse  # noqa: F401
from deltatune.methods.full import FullConfig
from deltatune.methods.lora import LoRAConfig
from deltatune.methods.registry import METHODS, Method, TrainHook, get_method, make_config, register_method
from deltatune.methods.sparse import SparseConfig

__all__ = ["METHODS", "FullConfig", "LoRAConfig", "Method", "SparseConfig", "TrainHook", "get_method",
           "make_config", "register_method"]
