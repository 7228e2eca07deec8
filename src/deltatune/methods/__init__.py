"""Built-in methods; importing this package registers every method module in it (one file per method)."""

from deltatune.methods.full import FullConfig
from deltatune.methods.lora import LoRAConfig
from deltatune.methods.registry import METHODS, Method, TrainHook, get_method, make_config, register_method
from deltatune.methods.sparse import SparseConfig
from deltatune.registry_import import import_all

import_all(__name__, __path__)

__all__ = ["METHODS", "FullConfig", "LoRAConfig", "Method", "SparseConfig", "TrainHook", "get_method",
           "make_config", "register_method"]
