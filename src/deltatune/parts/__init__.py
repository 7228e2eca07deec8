"""Part kinds: one file per kind, each registering itself in ``PART_KINDS`` when imported.

Every module of this package is imported here (:func:`deltatune.registry_import.import_all`), so a new kind
is one new file: nothing central lists the kinds.
"""

from deltatune.parts.base import PART_KINDS, Part
from deltatune.parts.dense import DensePart
from deltatune.parts.lora import LoRAPart
from deltatune.parts.sparse import SparsePart
from deltatune.registry_import import import_all

import_all(__name__, __path__)

__all__ = ["PART_KINDS", "DensePart", "LoRAPart", "Part", "SparsePart"]
