"""The bottom room: LoRA itself. The adapter type (PEFT format in and out, key parsing, scaling), the
factor math every method and the shard codec share, the error base every room raises, and the one lock
around building a transformers model. No Redis, no HTTP; every other room imports it, it imports none."""

from lora.adapter import LoraAdapter, ModuleFactors
from lora.errors import MosaicError

__all__ = ["LoraAdapter", "ModuleFactors", "MosaicError"]
