"""The registry room: the skill library in Redis (validation at the door, versions, MoS shard storage).

The adapter type, its factor math and the error base live one room down, in :mod:`lora`."""

from adapter_store.registry import Registry
from adapter_store.skill_info import SkillInfo, parse_ref
from adapter_store.validation import BaseModelSpec, validate_adapter, validate_files

__all__ = ["BaseModelSpec", "Registry", "SkillInfo", "parse_ref", "validate_adapter", "validate_files"]
