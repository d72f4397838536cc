"""MoS-style shard sharing for a library of trained LoRA adapters: the registry's compact encoding.

After MoS (Mixture of Shards, ICLR 2025), applied post hoc to adapters that are already trained:

1. Every rank-1 unit (column b_j of B, row a_j of A, scaling folded in) is canonicalised: scaled so
   that ‖a_j‖ = ‖b_j‖ and signed so that a_j's largest-magnitude entry is positive. b_j a_jᵀ is unchanged.
2. Each vector is cut into ``l`` shards (zero-padded to a multiple of l). Per pool key — (projection
   type, A or B), shared across layers and skills — a codebook of unit shard directions is learned with
   scikit-learn's MiniBatchKMeans over the (sign-canonicalised) shard directions of the whole library.
3. A skill is stored as integer index tables into its pools plus one gain per shard (the projection of
   the shard on its codeword), and *private* exact shards where the shared ones fit worst, added until
   the skill's relative error ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F is within its budget (trace formula, no dense ΔW).
   A skill that cannot meet the budget with at most ``max_private`` of its shards private is left exact.

This module is pure tensor math; the registry decides where pools and encodings live in Redis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from adapter_store.adapter import LoraAdapter, factor_key

SIDES = ("A", "B")


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


def to_shards(v: torch.Tensor, l: int) -> torch.Tensor:
    """(n, d) vectors -> (n, l, ceil(d/l)) shards, zero-padded at the end."""
    n, d = v.shape
    width = math.ceil(d / l)
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


@dataclass
class Pools:
    """The shared codebooks: per pool key, unit-norm shard directions (n × width, float32)."""

    shards_per_vector: int
    codewords: dict[str, torch.Tensor]
    version: int = 1

    def nbytes(self) -> int:
        return sum(c.numel() * 2 for c in self.codewords.values())  # stored as bf16


def _directions(shards: torch.Tensor) -> torch.Tensor:
    """Unit directions of non-negligible shards, signed so the largest-magnitude entry is positive."""
    norms = shards.norm(dim=1)
    keep = norms > 1e-8 * norms.max().clamp_min(1e-30)
    u = shards[keep] / norms[keep, None]
    sign = torch.sign(u.gather(1, u.abs().argmax(dim=1, keepdim=True)))
    return u * sign


def build_pools(adapters: list[LoraAdapter], shards_per_vector: int = 4, pool_size: int = 256, seed: int = 0,
                version: int = 1) -> Pools:
    """Learn one codebook per (projection type, A/B) from every rank vector of every adapter."""
    from sklearn.cluster import MiniBatchKMeans

    collected: dict[str, list[torch.Tensor]] = {}
    for adapter in adapters:
        for name, m in adapter.modules().items():
            a, b = canonical_units(m.A, m.B, m.scaling)
            for side, v in zip(SIDES, (a, b)):
                s = to_shards(v, shards_per_vector)
                collected.setdefault(pool_key(name, side), []).append(s.reshape(-1, s.shape[-1]))
    codewords = {}
    for key, parts in sorted(collected.items()):
        u = _directions(torch.cat(parts)).float().numpy()
        k = min(pool_size, len(u))
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=max(1024, 4 * k)).fit(u)
        c = torch.from_numpy(km.cluster_centers_).float()
        codewords[key] = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return Pools(shards_per_vector, codewords, version)


@dataclass
class EncodedModule:
    d: dict[str, int]  # side -> vector length (d_in for A, d_out for B)
    index: dict[str, torch.Tensor]  # side -> (r, l) int32 codeword indices
    gain: dict[str, torch.Tensor]  # side -> (r, l) float16 gains
    private: dict[str, torch.Tensor] = field(default_factory=dict)  # side -> (r, l) bool: shard stored exactly
    private_values: dict[str, torch.Tensor] = field(default_factory=dict)  # side -> (p, width) bf16, in mask order


@dataclass
class Encoded:
    """One adapter in shard form; ``error`` is the achieved relative ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F."""

    config: dict
    modules: dict[str, EncodedModule]
    pool_version: int
    error: float

    def nbytes(self, pool_size: int) -> int:
        idx = 2 if pool_size <= 2**15 else 4
        total = 0
        for m in self.modules.values():
            for side in SIDES:
                r, l = m.index[side].shape
                total += r * l * (idx + 2) + math.ceil(r * l / 8)  # index + fp16 gain + private bit
                if side in m.private_values:
                    total += m.private_values[side].numel() * 2
        return total


def _quantise(shards: torch.Tensor, codewords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest codeword by |projection| per shard: (index, gain, reconstruction)."""
    flat = shards.reshape(-1, shards.shape[-1])
    proj = flat.float() @ codewords.T
    index = proj.abs().argmax(dim=1)
    gain = proj.gather(1, index[:, None]).squeeze(1).half()
    recon = gain.double()[:, None] * codewords[index].double()
    return index.view(shards.shape[:2]).int(), gain.view(shards.shape[:2]), recon.view(shards.shape)


def encode(adapter: LoraAdapter, pools: Pools, error_budget: float = 0.05, max_private: float = 0.5,
           step: float = 0.02) -> Encoded | None:
    """Encode against ``pools``, adding private exact shards (worst residual first, ``step`` of the
    shards at a time) until the relative error is within ``error_budget``; None when even
    ``max_private`` of the shards private does not meet it (store the skill exact)."""
    l = pools.shards_per_vector
    parts = {}
    for name, m in adapter.modules().items():
        a, b = canonical_units(m.A, m.B, m.scaling)
        sides = {}
        for side, v in zip(SIDES, (a, b)):
            s = to_shards(v, l)
            cw = pools.codewords.get(pool_key(name, side))
            if cw is None or cw.shape[1] != s.shape[-1]:
                return None  # no pool for this projection type or shape: stays exact
            index, gain, recon = _quantise(s, cw)
            sides[side] = {"v": v, "s": s, "index": index, "gain": gain, "recon": recon,
                           "private": torch.zeros(s.shape[:2], dtype=torch.bool)}
        parts[name] = sides

    def module_hat(sides: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for side in SIDES:
            p = sides[side]
            exact = p["s"].to(torch.bfloat16).double()
            shards = torch.where(p["private"][..., None], exact, p["recon"])
            out.append(from_shards(shards, p["v"].shape[1]))
        return out[0], out[1]

    def relative_error() -> float:
        num = den = 0.0
        for sides in parts.values():
            a_hat, b_hat = module_hat(sides)
            e, w = delta_error_sq(sides["A"]["v"], sides["B"]["v"], a_hat, b_hat)
            num, den = num + e, den + w
        return math.sqrt(num / den) if den > 0 else 0.0

    # residual of each shard, weighted by the norm of its partner vector (a shard of a_j matters as ‖b_j‖)
    candidates = []
    for name, sides in parts.items():
        for side, other in (("A", "B"), ("B", "A")):
            p, partner = sides[side], sides[other]["v"].norm(dim=1)
            res = (p["s"] - p["recon"]).norm(dim=2) * partner[:, None]
            for (j, k), value in np.ndenumerate(res.numpy()):
                candidates.append((value, name, side, j, k))
    candidates.sort(key=lambda c: -c[0])
    total = len(candidates)
    err, used = relative_error(), 0
    while err > error_budget:
        if used >= max_private * total or used >= total:
            return None
        batch = candidates[used: used + max(1, int(step * total))]
        for _, name, side, j, k in batch:
            parts[name][side]["private"][j, k] = True
        used += len(batch)
        err = relative_error()
    modules = {}
    for name, sides in parts.items():
        enc = EncodedModule(d={}, index={}, gain={})
        for side in SIDES:
            p = sides[side]
            enc.d[side], enc.index[side], enc.gain[side] = p["v"].shape[1], p["index"], p["gain"]
            if p["private"].any():
                enc.private[side] = p["private"]
                enc.private_values[side] = p["s"][p["private"]].to(torch.bfloat16)
        modules[name] = enc
    return Encoded(dict(adapter.config), modules, pools.version, err)


def decode(encoded: Encoded, pools: Pools, dtype: torch.dtype = torch.bfloat16) -> LoraAdapter:
    """The adapter back: factors from codewords × gains (private shards exact), scaling folded into B,
    r = lora_alpha per module (so every engine loads it as it is)."""
    if encoded.pool_version != pools.version:
        raise ValueError(f"encoded against pools v{encoded.pool_version}, given v{pools.version}")
    tensors, ranks = {}, set()
    for name, m in encoded.modules.items():
        vec = {}
        for side in SIDES:
            cw = pools.codewords[pool_key(name, side)].double()
            shards = m.gain[side].double()[..., None] * cw[m.index[side].long()]
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
