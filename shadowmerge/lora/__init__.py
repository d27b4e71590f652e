"""LoRA adapters trained on the Base: read them (adapter), graft them (source), retarget them."""

from .adapter import Adapter, LoraModule
from .source import LoraDelta

__all__ = ["Adapter", "LoraDelta", "LoraModule"]
