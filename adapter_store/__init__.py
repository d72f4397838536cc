"""The registry room: the adapter type, its validation, and its storage in Redis."""

from adapter_store.adapter import LoraAdapter, ModuleFactors
from adapter_store.errors import MosaicError
from adapter_store.registry import Registry
from adapter_store.skill_info import SkillInfo, parse_ref
from adapter_store.validation import BaseModelSpec, validate_adapter, validate_files

__all__ = [
    "BaseModelSpec", "LoraAdapter", "ModuleFactors", "MosaicError", "Registry", "SkillInfo",
    "parse_ref", "validate_adapter", "validate_files",
]
