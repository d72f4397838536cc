"""Validation at the door: an adapter is checked against the base model before it is stored.

Every problem is collected and reported at once (as vLLM's ``PEFTHelper.validate_legal`` does),
so a user fixes an adapter in one round trip. Nothing is written unless the list is empty.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load

from lora.adapter import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, compile_pattern, config_rank, parse_key
from lora.errors import AdapterValidationError, InvalidRequestError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: "$" would also accept a trailing newline
RESERVED_NAMES = {"auto", "base"}
# a skill's name, optionally in a namespace: "team/name" (a key can be limited to one namespace)
SKILL_NAME_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,63}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
RESERVED_IN_NAMESPACE = {"download"}  # GET /v1/adapters/team/download would read as team's download
MAX_PATTERNS = 1024  # entries of rank_pattern / alpha_pattern
# tensors in one weights file, counted from its header before anything is loaded (setting MOSAIC_MAX_TENSORS): a
# LoRA on the 7 linear modules of every layer of an 80-layer model has 80 × 7 × 2 = 1,120
MAX_TENSORS = 4096
HEADER_BYTES_PER_TENSOR = 256  # a header entry is a name and about 70 bytes of dtype, shape and offsets
HEADER_ROOM = 64 * 1024  # the header's __metadata__
EMBEDDING_MODULES = ("embed_tokens", "lm_head")  # 2-D weights that are not linear layers a LoRA may target
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Config fields whose non-default value changes what the adapter computes and that no engine
# here applies: refused by name rather than silently ignored.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "modules_to_save": (None, [], ()),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "layer_replication": (None, [], ()),
    "fan_in_fan_out": (False, None),
    "target_parameters": (None, [], ()),
}


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter is checked against: the base model's id and linear-module shapes."""

    model_id: str
    shapes: dict[str, tuple[int, int]]  # module name -> (d_out, d_in)

    @classmethod
    def from_dir(cls, path: str | Path, model_id: str | None = None) -> "BaseModelSpec":
        """Read module shapes from the safetensors headers only (no weights are loaded)."""
        path = Path(path)
        shapes: dict[str, tuple[int, int]] = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key.endswith(".weight"):
                        shape = f.get_slice(key).get_shape()
                        if len(shape) == 2:
                            shapes[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
        if not shapes:
            raise FileNotFoundError(f"no safetensors weights found in {path}")
        return cls(model_id=model_id or path.name, shapes=shapes)


def check_name(name: str, reserved: tuple[str, ...] = ()) -> list[str]:
    """Problems with a new skill's name (none: it may be used); ``reserved``: other names taken, such
    as the base model's id."""
    if not isinstance(name, str) or not SKILL_NAME_RE.match(name):
        return [
            f"name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit, optionally after a namespace of the same form and a '/' (team/name)"
        ]
    namespace, _, last = name.rpartition("/")
    if (name.lower() in RESERVED_NAMES | {r.lower() for r in reserved}
            or (namespace and last.lower() in RESERVED_IN_NAMESPACE)):
        return [f"name {name!r} is reserved"]
    return []


@dataclass(frozen=True)
class TextLimits:
    """What a skill's text may hold: the router embeds every example prompt and the description, and Redis
    keeps them and their embeddings, so each is bounded by a setting (server/core/settings.py)."""

    examples: int = 64  # MOSAIC_MAX_EXAMPLES_PER_SKILL
    example_chars: int = 2000  # MOSAIC_MAX_EXAMPLE_CHARS
    description_chars: int = 2000  # MOSAIC_MAX_DESCRIPTION_CHARS
    tags: int = 32  # MOSAIC_MAX_TAGS
    tag_chars: int = 64  # MOSAIC_MAX_TAG_CHARS


def check_text(limits: TextLimits, *, description: str = "", examples: Sequence[str] = (),
               tags: Sequence[str] = ()) -> None:
    """Refuse a skill's description, example prompts or tags over ``limits`` (InvalidRequestError naming the
    first field over its limit; the message names every problem and its setting)."""
    problems: list[tuple[str, str]] = []
    if len(examples) > limits.examples:
        problems.append(("examples", f"{len(examples):,} example prompts; at most {limits.examples:,} are accepted "
                                     "(setting MOSAIC_MAX_EXAMPLES_PER_SKILL)"))
    if long := [i for i, e in enumerate(examples) if len(e) > limits.example_chars]:
        problems.append(("examples", f"{len(long):,} example prompt{'s' if len(long) > 1 else ''} longer than "
                                     f"{limits.example_chars:,} characters (the first: examples[{long[0]}], "
                                     f"{len(examples[long[0]]):,}; setting MOSAIC_MAX_EXAMPLE_CHARS)"))
    if len(description) > limits.description_chars:
        problems.append(("description", f"a description of {len(description):,} characters; at most "
                                        f"{limits.description_chars:,} (setting MOSAIC_MAX_DESCRIPTION_CHARS)"))
    if len(tags) > limits.tags:
        problems.append(("tags", f"{len(tags):,} tags; at most {limits.tags:,} (setting MOSAIC_MAX_TAGS)"))
    if long := [t for t in tags if len(t) > limits.tag_chars]:
        problems.append(("tags", f"{len(long):,} tag{'s' if len(long) > 1 else ''} longer than {limits.tag_chars:,} "
                                 "characters (setting MOSAIC_MAX_TAG_CHARS)"))
    if problems:
        raise InvalidRequestError("; ".join(m for _, m in problems), param=problems[0][0])


def in_namespace(name: str, namespace: str) -> bool:
    """Whether the skill ``name`` (or ``name@N``) is in ``namespace`` (names are ``namespace/…``)."""
    return name.partition("@")[0].startswith(f"{namespace}/")


def validate_files(
    files: dict[str, bytes], spec: BaseModelSpec, *, max_rank: int, name: str | None = None,
    max_tensors: int = MAX_TENSORS,
) -> LoraAdapter:
    """Check an uploaded PEFT folder (file name -> bytes); return the adapter or raise with all problems.
    The weights file's tensors are counted from its header first: over ``max_tensors``, nothing is loaded;
    the file is parsed once, and the adapter returned keeps its bytes as they came (a bit-exact round trip)."""
    problems = _name_problems(name, spec)
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        problems.append(
            f"pickle weights are refused ({', '.join(sorted(pickles))}): upload {WEIGHTS_FILE} (safetensors)"
        )
    config: dict | None = None
    if CONFIG_FILE not in files:
        problems.append(f"{CONFIG_FILE} is missing")
    else:
        try:
            config = json.loads(files[CONFIG_FILE])
            if not isinstance(config, dict):
                problems.append(f"{CONFIG_FILE} must hold a JSON object")
                config = None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problems.append(f"{CONFIG_FILE} is not valid JSON: {exc}")
        except RecursionError:
            problems.append(f"{CONFIG_FILE} is nested too deeply")
    tensors: dict[str, torch.Tensor] | None = None
    if WEIGHTS_FILE not in files:
        problems.append(f"{WEIGHTS_FILE} is missing")
    elif header_problems := _check_header(files[WEIGHTS_FILE], max_tensors):
        problems += header_problems
    else:
        try:
            tensors = st_load(files[WEIGHTS_FILE])
        except Exception as exc:  # safetensors raises several types for corrupt input
            problems.append(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}")
    if config is not None:
        problems += _check_config(config, max_rank)
    if config is not None and tensors is not None:
        problems += _check_tensors(config, tensors, spec, max_rank)
    if problems:
        raise AdapterValidationError(problems)
    assert config is not None and tensors is not None
    return LoraAdapter(config=config, tensors=tensors, _weights_bytes=files[WEIGHTS_FILE])


def validate_adapter(adapter: LoraAdapter, spec: BaseModelSpec, *, max_rank: int, name: str | None = None,
                     max_tensors: int = MAX_TENSORS) -> None:
    """The same checks for an adapter already in memory (e.g. a composition result), on its config and tensors
    as they are: nothing is serialised or parsed again."""
    problems = _name_problems(name, spec)
    if len(adapter.tensors) > max_tensors:
        problems.append(f"{len(adapter.tensors):,} tensors; the most an adapter may hold is {max_tensors:,} "
                        "(setting MOSAIC_MAX_TENSORS)")
    else:
        problems += _check_config(adapter.config, max_rank) + _check_tensors(adapter.config, adapter.tensors, spec,
                                                                             max_rank)
    if problems:
        raise AdapterValidationError(problems)


def _name_problems(name: str | None, spec: BaseModelSpec) -> list[str]:
    if name is None:
        return []
    problems = check_name(name, reserved=(spec.model_id,))
    if name == spec.model_id:
        problems.append(f"name {name!r} is the base model's id")
    return problems


def _check_header(data: bytes, max_tensors: int) -> list[str]:
    """The tensors a safetensors file declares, counted in its header (8 bytes of length, then JSON naming each
    tensor's dtype, shape and data_offsets) without parsing or loading anything: a file of 100,000 one-value
    tensors took seconds to load and check, and its error listed every one. A header too large for
    ``max_tensors`` entries is refused too (whatever it holds); one that runs past the file is left to the
    safetensors reader, which reports it."""
    if len(data) < 8:
        return []
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        return []
    tensors = data.count(b'"data_offsets"', 8, 8 + length)
    if tensors > max_tensors:
        return [f"{WEIGHTS_FILE} holds {tensors:,} tensors; at most {max_tensors:,} are accepted "
                "(setting MOSAIC_MAX_TENSORS)"]
    room = max_tensors * HEADER_BYTES_PER_TENSOR + HEADER_ROOM
    if length > room:
        return [f"{WEIGHTS_FILE} has a header of {length:,} bytes; {max_tensors:,} tensors "
                f"(setting MOSAIC_MAX_TENSORS) need at most {room:,}"]
    return []


def _check_config(config: dict, max_rank: int) -> list[str]:
    problems = []
    if str(config.get("peft_type", "")).upper() != "LORA":
        problems.append(f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r must be a positive integer, got {r!r}")
    elif r > max_rank:
        problems.append(f"rank r={r} exceeds the maximum {max_rank} (setting MOSAIC_MAX_ADAPTER_RANK)")
    alpha = config.get("lora_alpha")
    if not _finite_number(alpha):
        problems.append(f"lora_alpha must be a finite number, got {alpha!r}")
    problems += _check_patterns(config, max_rank)
    if not config.get("target_modules"):
        problems.append("target_modules is empty or missing")
    for key, allowed in _UNSUPPORTED.items():
        if key in config and config[key] not in allowed:
            problems.append(f"{key}={config[key]!r} is not supported (only {allowed[0]!r})")
    return problems


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_patterns(config: dict, max_rank: int) -> list[str]:
    """``rank_pattern``/``alpha_pattern``: objects of at most MAX_PATTERNS patterns that RE2 compiles
    (adapter.compile_pattern), ranks in 1..max_rank, alphas finite numbers."""
    problems = []
    for field_, value_ok, wanted in (
        ("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= max_rank,
         f"an integer rank from 1 to {max_rank}"),
        ("alpha_pattern", _finite_number, "a finite number"),
    ):
        patterns = config.get(field_)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            problems.append(f"{field_} must be an object of pattern -> value, got {type(patterns).__name__}")
            continue
        if len(patterns) > MAX_PATTERNS:
            problems.append(f"{field_} has {len(patterns)} patterns; at most {MAX_PATTERNS} are accepted")
            continue
        for key, value in patterns.items():
            try:
                compile_pattern(key)
            except ValueError as exc:
                problems.append(f"{field_} pattern {key[:80]!r} is not accepted: {exc}")
            if not value_ok(value):
                problems.append(f"{field_}[{key[:80]!r}] must be {wanted}, got {value!r}")
    return problems


def _ambiguous_patterns(config: dict, module: str) -> list[str]:
    """PEFT applies the first pattern a module matches, in the order of the file; Mosaic stores configs
    with sorted keys, so two matching patterns with different values would change meaning: refused."""
    problems = []
    for field_ in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field_)
        if not isinstance(patterns, dict):
            continue
        hits = {}
        for key, value in patterns.items():
            try:
                if compile_pattern(key).match(module):
                    hits[key] = value
            except ValueError:  # reported by _check_patterns
                continue
        if len({json.dumps(v) for v in hits.values()}) > 1:
            problems.append(f"{module}: matched by several {field_} patterns with different values ({', '.join(map(repr, hits))}); "
                            "make them match disjoint modules")
    return problems


def _check_tensors(config: dict, tensors: dict[str, torch.Tensor], spec: BaseModelSpec, max_rank: int) -> list[str]:
    problems: list[str] = []
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            problems.append(f"tensor {key!r} is not a LoRA factor (expected base_model.model.<module>.lora_A|B.weight)")
            continue
        module, kind = parsed
        if module.rsplit(".", 1)[-1] in EMBEDDING_MODULES:
            problems.append(f"tensor {key!r}: LoRA on the embeddings ({module!r}) is not served; target linear layers")
            continue
        if module not in spec.shapes:
            problems.append(f"tensor {key!r} names module {module!r}, which base model {spec.model_id!r} does not have")
            continue
        pairs.setdefault(module, {})[kind] = t
    if not tensors:
        problems.append(f"{WEIGHTS_FILE} holds no tensors")
    for module, kinds in sorted(pairs.items()):
        if set(kinds) != {"A", "B"}:
            missing = ({"A", "B"} - set(kinds)).pop()
            problems.append(f"{module}: lora_{missing} is missing")
            continue
        A, B = kinds["A"], kinds["B"]
        d_out, d_in = spec.shapes[module]
        for kind, t in (("A", A), ("B", B)):
            if not t.is_floating_point():
                problems.append(f"{module}.lora_{kind}: dtype {t.dtype} is not floating point")
            elif not bool(torch.isfinite(t).all()):
                problems.append(f"{module}.lora_{kind}: holds NaN or Inf values")
        if A.dim() != 2 or B.dim() != 2:
            problems.append(f"{module}: factors must be 2-D, got A{tuple(A.shape)} B{tuple(B.shape)}")
            continue
        r = A.shape[0]
        if A.shape[1] != d_in:
            problems.append(f"{module}.lora_A: shape {tuple(A.shape)} does not match the module's input size {d_in}")
        if B.shape[0] != d_out:
            problems.append(f"{module}.lora_B: shape {tuple(B.shape)} does not match the module's output size {d_out}")
        if B.shape[1] != r:
            problems.append(f"{module}: lora_A rank {r} and lora_B rank {B.shape[1]} differ")
        problems += _ambiguous_patterns(config, module)
        try:
            expected = config_rank(config, module) if isinstance(config.get("r"), int) else None
        except (ValueError, TypeError, AttributeError):  # a bad pattern: _check_config reports it
            expected = None
        if expected is not None and r != expected:
            problems.append(f"{module}: tensor rank {r} differs from the config's rank {expected}")
        if r > max_rank and expected is None:  # otherwise the config's r or rank_pattern already says so
            problems.append(f"{module}: rank {r} exceeds the maximum {max_rank} (setting MOSAIC_MAX_ADAPTER_RANK)")
    return problems
