"""MoS-style shard sharing for a library of trained LoRA adapters: the registry's compact encoding.

After MoS (Mixture of Shards, ICLR 2025), applied post hoc to adapters that are already trained:

1. Every rank-1 unit (row a_j of A, column b_j of B, scaling folded in) is canonicalised: scaled so
   that ‖a_j‖ = ‖b_j‖ and signed so that a_j's largest-magnitude entry is positive (b_j a_jᵀ unchanged),
   then divided by that norm, so every vector of every layer and skill is a unit vector.
2. Each unit vector is cut into shards of ``width`` values (zero-padded at the end). Per pool key —
   (projection type, A or B), shared across layers and skills, A and B with separate pools and indices
   (MoS's pair dissociation) — a codebook of ``pool_size`` shards is learned with scikit-learn's
   MiniBatchKMeans over the shards of the whole library.
3. A skill is stored as integer index tables into its pools (log2(pool_size) bits each), one fp16
   scale per vector, and *private* exact shards (bf16) where the shared ones fit worst, added until
   the skill's relative error ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F is within its budget (trace formula, no dense ΔW).
   A skill that cannot meet the budget with at most ``max_private`` of its shards private is left exact.

Bytes per value: log2(pool_size)/width bits for the shared shards (8 bits per 4 values = 2 bits at the
defaults, against 16 for bf16), plus the private shards. Trained LoRA vectors look like Gaussian noise
to a codebook (A barely leaves its random initialisation), so the error at a given size follows
rate-distortion more than shared structure: the benchmark measures what the skills tolerate.

This module is pure tensor math; the registry decides where pools and encodings live in Redis.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapter_store.adapter import LoraAdapter, factor_key

SIDES = ("A", "B")
MAX_FIT_SHARDS = 100_000  # shards per pool key given to k-means (a uniform sample beyond that)


def pool_key(module: str, side: str) -> str:
    """Pools are shared per projection type and factor: 'q_proj.A', 'down_proj.B', ..."""
    return f"{module.rsplit('.', 1)[-1]}.{side}"


def canonical_units(A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with rows a_j (r × d_in) and b_j (r × d_out), Σ_j b_j a_jᵀ = scaling · B A, ‖a_j‖ = ‖b_j‖,
    and each a_j's largest-magnitude entry positive."""
    a, b = A.double(), (B.double() * scaling).T.contiguous()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    c = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-30)).sqrt(), torch.ones_like(na))
    a, b = a * c[:, None], b / c[:, None]
    sign = torch.sign(a.gather(1, a.abs().argmax(dim=1, keepdim=True))).squeeze(1)
    sign[sign == 0] = 1
    return a * sign[:, None], b * sign[:, None]


def to_shards(v: torch.Tensor, width: int) -> torch.Tensor:
    """(n, d) vectors -> (n, ceil(d/width), width) shards, zero-padded at the end."""
    n, d = v.shape
    l = math.ceil(d / width)
    padded = torch.zeros(n, l * width, dtype=v.dtype)
    padded[:, :d] = v
    return padded.view(n, l, width)


def from_shards(s: torch.Tensor, d: int) -> torch.Tensor:
    return s.reshape(s.shape[0], -1)[:, :d]


def delta_error_sq(a: torch.Tensor, b: torch.Tensor, a_hat: torch.Tensor, b_hat: torch.Tensor) -> tuple[float, float]:
    """(‖ΔW − ΔŴ‖²_F, ‖ΔW‖²_F) for ΔW = bᵀa, ΔŴ = b̂ᵀâ (rows are units) by the trace formula:
    ‖bᵀa‖² = Σ (b bᵀ) ⊙ (a aᵀ), with only r×r products."""
    def inner(b1, a1, b2, a2):
        return float(((b1 @ b2.T) * (a1 @ a2.T)).sum())

    ww = inner(b, a, b, a)
    return max(ww - 2 * inner(b, a, b_hat, a_hat) + inner(b_hat, a_hat, b_hat, a_hat), 0.0), ww


def _unit_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = v.norm(dim=1)
    return v / norms.clamp_min(1e-30)[:, None], norms


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


def build_pools(adapters: list[LoraAdapter], shard_width: int = 4, pool_size: int = 256, seed: int = 0,
                version: int = 1, shards_per_vector: int | None = None) -> Pools:
    """Learn one codebook per (projection type, A/B) from every rank vector of every adapter."""
    from sklearn.cluster import MiniBatchKMeans

    shell = Pools({}, version, shard_width, shards_per_vector)
    rng = np.random.default_rng(seed)
    per_adapter = math.ceil(2 * MAX_FIT_SHARDS / max(1, len(adapters)))  # memory stays O(MAX_FIT_SHARDS) per key
    collected: dict[str, list[np.ndarray]] = {}
    for adapter in adapters:
        shards: dict[str, list[np.ndarray]] = {}
        for name, m in adapter.modules().items():
            a, b = canonical_units(m.A, m.B, m.scaling)
            for side, v in zip(SIDES, (a, b)):
                u, norms = _unit_rows(v)
                s = to_shards(u[norms > 0], shell.width(v.shape[1]))
                shards.setdefault(pool_key(name, side), []).append(s.reshape(-1, s.shape[-1]).float().numpy())
        for key, parts in shards.items():
            x = np.concatenate(parts)
            collected.setdefault(key, []).append(x[rng.choice(len(x), per_adapter, replace=False)]
                                                 if len(x) > per_adapter else x)
    for key, parts in sorted(collected.items()):
        x = np.concatenate(parts)
        if len(x) > MAX_FIT_SHARDS:
            x = x[rng.choice(len(x), MAX_FIT_SHARDS, replace=False)]
        k = min(pool_size, len(x))
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1, batch_size=max(4096, 4 * k),
                             max_iter=20).fit(x)
        # rounded to fp16 here, as stored, so that encoding uses exactly the codewords decoding will
        shell.codewords[key] = torch.from_numpy(km.cluster_centers_).half().float()
    return shell


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


def _quantise(v: torch.Tensor, codewords: torch.Tensor, width: int) -> dict:
    """Nearest codeword (L2) for each shard of each unit vector of ``v``, then the least-squares scale
    per vector; returns the pieces and the shard-wise reconstruction of ``v``."""
    u, norms = _unit_rows(v)
    s = to_shards(u, width)
    flat = s.reshape(-1, width).float()
    dist = (codewords * codewords).sum(1)[None, :] - 2 * flat @ codewords.T
    index = dist.argmin(dim=1).view(s.shape[:2])
    approx = codewords.double()[index]  # (r, l, width)
    u_hat = from_shards(approx, v.shape[1])
    scale = ((v * u_hat).sum(1) / (u_hat * u_hat).sum(1).clamp_min(1e-30)).half()
    scale[norms == 0] = 0
    return {"v": v, "s": to_shards(v, width), "index": index, "scale": scale,
            "recon": scale.double()[:, None, None] * approx, "private": torch.zeros(s.shape[:2], dtype=torch.bool)}


def encode(adapter: LoraAdapter, pools: Pools, error_budget: float = 0.05, max_private: float = 0.5,
           step: float = 0.02) -> Encoded | None:
    """Encode against ``pools``, adding private exact shards (worst residual first, ``step`` of the
    shards at a time) until the relative error is within ``error_budget``; None when even
    ``max_private`` of the shards private does not meet it (store the skill exact)."""
    parts = {}
    for name, m in adapter.modules().items():
        a, b = canonical_units(m.A, m.B, m.scaling)
        sides = {}
        for side, v in zip(SIDES, (a, b)):
            cw, width = pools.codewords.get(pool_key(name, side)), pools.width(v.shape[1])
            if cw is None or cw.shape[1] != width:
                return None  # no pool for this projection type or shape: stays exact
            sides[side] = _quantise(v, cw, width)
        parts[name] = sides

    dtype = next(iter(adapter.tensors.values())).dtype

    def module_hat(sides: dict, cast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for side in SIDES:
            p = sides[side]
            exact = p["s"].to(torch.bfloat16).double()
            shards = torch.where(p["private"][..., None], exact, p["recon"])
            v = from_shards(shards, p["v"].shape[1])
            out.append(v.to(dtype).double() if cast else v)  # as decode() will hand them out
        return out[0], out[1]

    def relative_error(cast: bool = False) -> float:
        num = den = 0.0
        for sides in parts.values():
            a_hat, b_hat = module_hat(sides, cast)
            e, w = delta_error_sq(sides["A"]["v"], sides["B"]["v"], a_hat, b_hat)
            num, den = num + e, den + w
        return math.sqrt(num / den) if den > 0 else 0.0

    # every shard's residual, weighted by the norm of its partner vector (a shard of a_j matters as ‖b_j‖)
    slots, scores = [], []
    for name, sides in parts.items():
        for side, other in (("A", "B"), ("B", "A")):
            p, partner = sides[side], sides[other]["v"].norm(dim=1)
            scores.append(((p["s"] - p["recon"]).norm(dim=2) * partner[:, None]).reshape(-1).numpy())
            slots.append((name, side, p["private"].shape))
    order = np.argsort(-np.concatenate(scores), kind="stable")
    offsets = np.cumsum([0] + [len(x) for x in scores])
    total = int(offsets[-1])
    err, used = relative_error(), 0
    while err > error_budget:
        if used >= max_private * total or used >= total:
            return None
        batch = order[used: used + max(1, int(step * total))]
        for slot_no, (name, side, shape) in enumerate(slots):
            lo, hi = offsets[slot_no], offsets[slot_no + 1]
            mine = batch[(batch >= lo) & (batch < hi)] - lo
            if len(mine):
                parts[name][side]["private"].view(-1)[torch.from_numpy(mine)] = True
        used += len(batch)
        err = relative_error()
    err = relative_error(cast=True)  # the error of what decode() returns, rounding to the original dtype included
    modules = {}
    for name, sides in parts.items():
        enc = EncodedModule(d={}, index={}, scale={})
        for side in SIDES:
            p = sides[side]
            enc.d[side], enc.index[side], enc.scale[side] = p["v"].shape[1], p["index"], p["scale"]
            enc.width[side] = p["s"].shape[-1]
            if p["private"].any():
                enc.private[side] = p["private"]
                enc.private_values[side] = p["s"][p["private"]].to(torch.bfloat16)
        modules[name] = enc
    return Encoded(dict(adapter.config), modules, pools.version, err, str(dtype).removeprefix("torch."))


def decode(encoded: Encoded, pools: Pools, dtype: torch.dtype | None = None) -> LoraAdapter:
    """The adapter back: factors from codewords × scales (private shards exact), scaling folded into B,
    r = lora_alpha per module (so every engine loads it as it is), in the original dtype unless given."""
    if encoded.pool_version != pools.version:
        raise ValueError(f"encoded against pools v{encoded.pool_version}, given v{pools.version}")
    dtype = dtype or getattr(torch, encoded.dtype)
    tensors, ranks = {}, set()
    for name, m in encoded.modules.items():
        vec = {}
        for side in SIDES:
            cw = pools.codewords[pool_key(name, side)].double()
            shards = m.scale[side].double()[:, None, None] * cw[m.index[side].long()]
            if side in m.private:
                shards[m.private[side]] = m.private_values[side].double()
            vec[side] = from_shards(shards, m.d[side])
        tensors[factor_key(name, "A")] = vec["A"].to(dtype)
        tensors[factor_key(name, "B")] = vec["B"].T.contiguous().to(dtype)
        ranks.add(vec["A"].shape[0])
    r = max(ranks)
    config = {k: v for k, v in encoded.config.items() if k not in ("rank_pattern", "alpha_pattern", "use_rslora")}
    config.update(r=r, lora_alpha=r, use_rslora=False)
    if len(ranks) > 1:
        config["rank_pattern"] = {n: m.index["A"].shape[0] for n, m in encoded.modules.items()}
        config["alpha_pattern"] = dict(config["rank_pattern"])
    return LoraAdapter(config=config, tensors=tensors)


def _st_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (an 8-byte length, then the JSON header)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8: 8 + n]).get("__metadata__", {})
