"""Protocols by config name."""

from splitfed.protocols.base import Protocol
from splitfed.protocols.centralized import Centralized
from splitfed.protocols.fedlora import FederatedLoRA
from splitfed.protocols.memsfl import MemorySplitFed
from splitfed.protocols.sfl import SplitFed
from splitfed.protocols.sflv1 import SplitFedV1

PROTOCOL_CLASSES: dict[str, type[Protocol]] = {
    cls.name: cls for cls in (SplitFed, MemorySplitFed, SplitFedV1, Centralized, FederatedLoRA)
}
