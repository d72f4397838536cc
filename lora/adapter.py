"""The adapter type every room shares: a PEFT LoRA adapter as config + tensors.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
look like ``base_model.model.<module>.lora_A.weight``. :class:`LoraAdapter` keeps both as they
are (so a round trip is bit-exact) and exposes a per-module view (:class:`ModuleFactors`) with
the scaling resolved from ``r``/``lora_alpha``/``use_rslora``/``rank_pattern``/``alpha_pattern``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import re2
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")


@dataclass(frozen=True)
class ModuleFactors:
    """One target module: ΔW = scaling · B @ A."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def parse_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.M.lora_A.weight`` -> (M, "A"); None if the key is not a LoRA factor."""
    m = _KEY_RE.match(key)
    return (m["module"], m["kind"]) if m else None


def factor_key(module: str, kind: str) -> str:
    return f"{KEY_PREFIX}{module}.lora_{kind}.weight"


PATTERN_MAX_CHARS = 256


@lru_cache(maxsize=4096)
def compile_pattern(key: str) -> "re2._Regexp":
    """A ``rank_pattern``/``alpha_pattern`` key as PEFT reads it (a regex the module name must end with,
    dot-bounded), compiled by RE2: matching takes linear time whatever the pattern, so an uploaded
    pattern cannot stall the process. Raises ValueError for a pattern RE2 cannot compile."""
    if len(key) > PATTERN_MAX_CHARS:
        raise ValueError(f"longer than {PATTERN_MAX_CHARS} characters")
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(rf"(.*\.)?({key})$", options)
    except re2.error as exc:
        raise ValueError(str(exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc)) from None


def _pattern_lookup(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key applies when the module name ends with it (regex, dot-bounded)."""
    for key, value in (patterns or {}).items():
        if compile_pattern(key).match(module):
            return value
    return default


def config_rank(config: dict, module: str) -> int:
    return int(_pattern_lookup(config.get("rank_pattern") or {}, module, config.get("r", 8)))


def config_scaling(config: dict, module: str) -> float:
    r = config_rank(config, module)
    alpha = float(_pattern_lookup(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# config keys that do not change ΔW at inference (training-only, bookkeeping, or the base's name)
COSMETIC_CONFIG_KEYS = frozenset({"inference_mode", "lora_dropout", "peft_version", "revision", "auto_mapping",
                                  "base_model_name_or_path", "task_type"})


def normalised_config(config: dict) -> dict:
    """The part of an adapter config that can change ΔW, in one spelling: cosmetic keys dropped, unset
    values (None, False, {}, []) treated as absent, ``target_modules`` as a sorted set."""
    out = {}
    for key, value in config.items():
        if key in COSMETIC_CONFIG_KEYS or value is None or value is False or value == {} or value == []:
            continue
        if key == "target_modules" and isinstance(value, list):
            value = sorted(set(map(str, value)))
        out[key] = value
    return out


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(normalised_config(config), sort_keys=True).encode()).hexdigest()


def content_id(weights_sha256: str, config_hash: str | None) -> str:
    """The identity of what is served: the weights and the ΔW-relevant config together."""
    if not config_hash:  # a version stored before configs were part of the identity
        return weights_sha256
    return hashlib.sha256(f"weights:{weights_sha256}\nconfig:{config_hash}".encode()).hexdigest()


@dataclass
class LoraAdapter:
    config: dict
    tensors: dict[str, torch.Tensor]
    _weights_bytes: bytes | None = field(default=None, repr=False, compare=False)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_bytes(cls, config_json: bytes | str, weights: bytes) -> "LoraAdapter":
        config = json.loads(config_json)
        if not isinstance(config, dict):
            raise ValueError("adapter_config.json must hold a JSON object")
        return cls(config=config, tensors=st_load(weights), _weights_bytes=bytes(weights))

    @classmethod
    def from_dir(cls, path: str | Path) -> "LoraAdapter":
        path = Path(path)
        return cls.from_bytes((path / CONFIG_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes())

    @classmethod
    def from_modules(
        cls,
        modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
        *,
        base_model: str | None,
        extra_config: dict | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "LoraAdapter":
        """Build an adapter from per-module (A, B) with the scaling already folded into B.

        Every module is zero-padded to the largest rank R (exact: zero rank pairs add
        nothing) and the config says ``r = lora_alpha = R`` so the scaling is 1 everywhere;
        one uniform rank is what every engine (vLLM included) loads without a rank_pattern.
        """
        if not modules:
            raise ValueError("an adapter needs at least one module")
        R = max(a.shape[0] for a, _ in modules.values())
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(modules):
            A, B = modules[name]
            pad = R - A.shape[0]
            if pad:
                A = torch.cat([A, A.new_zeros(pad, A.shape[1])], 0)
                B = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1)
            tensors[factor_key(name, "A")] = A.to(dtype).contiguous()
            tensors[factor_key(name, "B")] = B.to(dtype).contiguous()
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": int(R),
            "lora_alpha": int(R),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        config.update(extra_config or {})
        return cls(config=config, tensors=tensors)

    # ---- serialisation --------------------------------------------------------------
    def weights_bytes(self) -> bytes:
        if self._weights_bytes is None:
            self._weights_bytes = st_save(self.tensors)
        return self._weights_bytes

    def config_bytes(self) -> bytes:
        return json.dumps(self.config, indent=2, sort_keys=True).encode()

    def sha256(self) -> str:
        """Content hash of the weights file (the bytes as stored and served)."""
        return hashlib.sha256(self.weights_bytes()).hexdigest()

    def config_sha256(self) -> str:
        return config_sha256(self.config)

    def content_id(self) -> str:
        """Weights and ΔW-relevant config: two adapters with one content id serve the same ΔW."""
        return content_id(self.sha256(), self.config_sha256())

    def save_dir(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_bytes(self.config_bytes())
        (path / WEIGHTS_FILE).write_bytes(self.weights_bytes())
        return path

    # ---- views ------------------------------------------------------------------------
    def module_names(self) -> list[str]:
        names = {p[0] for k in self.tensors if (p := parse_key(k))}
        return sorted(names)

    def modules(self) -> dict[str, ModuleFactors]:
        """Per-module factors in float32 with the scaling resolved from the config."""
        out: dict[str, ModuleFactors] = {}
        for name in self.module_names():
            A = self.tensors[factor_key(name, "A")].float()
            B = self.tensors[factor_key(name, "B")].float()
            out[name] = ModuleFactors(A=A, B=B, scaling=config_scaling(self.config, name))
        return out

    @property
    def rank(self) -> int:
        return max((int(t.shape[0]) for k, t in self.tensors.items() if k.endswith("lora_A.weight")), default=0)

    @property
    def target_modules(self) -> list[str]:
        return sorted({n.rsplit(".", 1)[-1] for n in self.module_names()})

    def is_engine_native(self) -> bool:
        """True when an engine can load the files as they are: one rank, one alpha, no patterns."""
        return not (self.config.get("rank_pattern") or self.config.get("alpha_pattern"))
