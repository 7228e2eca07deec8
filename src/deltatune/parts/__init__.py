"""Part kinds: one file per kind, each registering itself in ``PART_KINDS``."""

from deltatune.parts.base import PART_KINDS, Part
from deltatune.parts.dense import DensePart
from deltatune.parts.lora import LoRAPart
from deltatune.parts.sparse import SparsePart

__all__ = ["PART_KINDS", "DensePart", "LoRAPart", "Part", "SparsePart"]
