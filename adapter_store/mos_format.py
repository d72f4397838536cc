"""The stored form of MoS shard sharing (see :mod:`adapter_store.mos`): the shared pools and one adapter's
encoding, each as one safetensors blob (tensors plus string metadata).

Index tables are bit-packed at log2(pool_size) bits per shard, private masks at one bit per shard.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

SIDES = ("A", "B")


@dataclass
class Pools:
    """The shared codebooks: per pool key, ``pool_size`` shards of one width (float32 holding fp16 values)."""

    codewords: dict[str, torch.Tensor]
    version: int = 1
    shard_width: int = 4  # values per shard, unless shards_per_vector is set
    shards_per_vector: int | None = None  # MoS's l: every vector in l shards (width = ceil(d / l))

    def width(self, d: int) -> int:
        return math.ceil(d / self.shards_per_vector) if self.shards_per_vector else self.shard_width

    @property
    def pool_size(self) -> int:
        return max((c.shape[0] for c in self.codewords.values()), default=0)

    def nbytes(self) -> int:
        return sum(c.numel() * 2 for c in self.codewords.values())  # stored as fp16

    def to_bytes(self) -> bytes:
        meta = {"version": str(self.version), "shard_width": str(self.shard_width),
                "shards_per_vector": str(self.shards_per_vector or 0)}
        return st_save({k: c.half().contiguous() for k, c in self.codewords.items()}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Pools":
        meta = _st_metadata(data)
        return cls({k: c.float() for k, c in st_load(data).items()}, int(meta["version"]),
                   int(meta["shard_width"]), int(meta["shards_per_vector"]) or None)


@dataclass
class EncodedModule:
    d: dict[str, int]  # side -> vector length (d_in for A, d_out for B)
    index: dict[str, torch.Tensor]  # side -> (r, l) int codeword indices
    scale: dict[str, torch.Tensor]  # side -> (r,) fp16 scale of each vector
    width: dict[str, int] = field(default_factory=dict)  # side -> values per shard
    private: dict[str, torch.Tensor] = field(default_factory=dict)  # side -> (r, l) bool: shard stored exactly
    private_values: dict[str, torch.Tensor] = field(default_factory=dict)  # side -> (p, width) bf16, in mask order


def index_bits(pool_size: int) -> int:
    return max(1, math.ceil(math.log2(pool_size)))


def pack_indices(index: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat non-negative indices -> ``bits`` bits each, bit-packed into uint8 (8 bits per 256 codewords,
    4 per 16, 12 per 4096)."""
    x = index.numpy().astype(np.int64)
    planes = ((x[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack_indices(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    planes = np.unpackbits(packed.numpy())[: n * bits].reshape(n, bits).astype(np.int64)
    return torch.from_numpy(planes @ (1 << np.arange(bits)))


@dataclass
class Encoded:
    """One adapter in shard form; ``error`` is the achieved relative ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F."""

    config: dict
    modules: dict[str, EncodedModule]
    pool_version: int
    error: float
    dtype: str = "bfloat16"  # of the original factors; decoding gives them back in it

    def private_fraction(self) -> float:
        total = sum(m.index[s].numel() for m in self.modules.values() for s in SIDES)
        private = sum(int(p.sum()) for m in self.modules.values() for p in m.private.values())
        return private / total if total else 0.0

    def to_bytes(self, pool_size: int) -> bytes:
        """safetensors with four flat tensors — every index table (bit-packed, log2(pool_size) bits), every
        fp16 scale, the private masks bit-packed, the private shards (bf16) — in (module, side) order;
        the config, each module's shape and the error as metadata."""
        order = [(name, side) for name in sorted(self.modules) for side in SIDES]
        mods = self.modules
        mask = torch.cat([mods[n].private.get(s, torch.zeros_like(mods[n].index[s], dtype=torch.bool)).reshape(-1)
                          for n, s in order])
        values = [mods[n].private_values[s].to(torch.bfloat16) for n, s in order if s in mods[n].private]
        tensors = {
            "index": pack_indices(torch.cat([mods[n].index[s].reshape(-1) for n, s in order]), index_bits(pool_size)),
            "scale": torch.cat([mods[n].scale[s].reshape(-1) for n, s in order]).half(),
            "private": torch.from_numpy(np.packbits(mask.numpy())),
            "values": torch.cat(values).reshape(-1) if values else torch.zeros(0, dtype=torch.bfloat16),
        }
        # per module, in name order: [name, d_A, d_B, r, l_A, l_B, width_A, width_B]
        dims = [[n, m.d["A"], m.d["B"], int(m.index["A"].shape[0]), *(int(m.index[s].shape[1]) for s in SIDES),
                 *(m.width[s] for s in SIDES)] for n, m in sorted(mods.items())]
        meta = {"config": json.dumps(self.config), "pool_version": str(self.pool_version),
                "error": repr(self.error), "dtype": self.dtype, "dims": json.dumps(dims),
                "index_bits": str(index_bits(pool_size))}
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Encoded":
        meta, t = _st_metadata(data), st_load(data)
        dims = {name: {"A": da, "B": db, "r": r, "l": {"A": la, "B": lb}, "w": {"A": wa, "B": wb}}
                for name, da, db, r, la, lb, wa, wb in json.loads(meta["dims"])}
        n_shards = sum(d["r"] * d["l"][s] for d in dims.values() for s in SIDES)
        index, scale = unpack_indices(t["index"], int(meta["index_bits"]), n_shards), t["scale"]
        mask = torch.from_numpy(np.unpackbits(t["private"].numpy())[:n_shards].astype(bool))
        values = t["values"]
        modules, at, at_r, at_v = {}, 0, 0, 0
        for name, d in dims.items():
            m = EncodedModule(d={s: d[s] for s in SIDES}, index={}, scale={}, width=dict(d["w"]))
            for side in SIDES:
                r, l, width = d["r"], d["l"][side], d["w"][side]
                m.index[side] = index[at: at + r * l].view(r, l)
                m.scale[side] = scale[at_r: at_r + r]
                private = mask[at: at + r * l].view(r, l)
                if private.any():
                    p = int(private.sum())
                    m.private[side] = private
                    m.private_values[side] = values[at_v: at_v + p * width].view(p, width)
                    at_v += p * width
                at, at_r = at + r * l, at_r + r
            modules[name] = m
        return cls(json.loads(meta["config"]), modules, int(meta["pool_version"]), float(meta["error"]), meta["dtype"])


def _st_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (an 8-byte length, then the JSON header)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8: 8 + n]).get("__metadata__", {})
