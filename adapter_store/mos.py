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
defaults, against 16 for bf16), plus the private shards. Trained LoRA vectors look like noise to a
codebook (A barely leaves its random initialisation), so the budget is set by what the skills tolerate,
not by shared structure.

This module is pure tensor math (the factor math in :mod:`lora.factors`, the stored form in
:mod:`adapter_store.mos_format`); the registry decides where pools and encodings live in Redis.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lora.adapter import LoraAdapter, ModuleFactors, factor_key
from lora.factors import canonical_units, frobenius_error_sq, frobenius_sq, unit_rows
from adapter_store.mos_format import SIDES, Encoded, EncodedModule, Pools

__all__ = ["Encoded", "EncodedModule", "Pools", "build_pools", "decode", "encode", "pool_key"]

MAX_FIT_SHARDS = 100_000  # shards per pool key given to k-means (a uniform sample beyond that)


def pool_key(module: str, side: str) -> str:
    """Pools are shared per projection type and factor: 'q_proj.A', 'down_proj.B', ..."""
    return f"{module.rsplit('.', 1)[-1]}.{side}"


def _units(m: ModuleFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's canonical units (a, b) as rows, scaling folded in (see :func:`canonical_units`)."""
    return canonical_units(*unit_rows(m.A, m.B, m.scaling))


def to_shards(v: torch.Tensor, width: int) -> torch.Tensor:
    """(n, d) vectors -> (n, ceil(d/width), width) shards, zero-padded at the end."""
    n, d = v.shape
    l = math.ceil(d / width)
    padded = torch.zeros(n, l * width, dtype=v.dtype)
    padded[:, :d] = v
    return padded.view(n, l, width)


def from_shards(s: torch.Tensor, d: int) -> torch.Tensor:
    return s.reshape(s.shape[0], -1)[:, :d]


def _normalised(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = v.norm(dim=1)
    return v / norms.clamp_min(1e-30)[:, None], norms


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
            a, b = _units(m)
            for side, v in zip(SIDES, (a, b)):
                u, norms = _normalised(v)
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


def _quantise(v: torch.Tensor, codewords: torch.Tensor, width: int) -> dict:
    """Nearest codeword (L2) for each shard of each unit vector of ``v``, then the least-squares scale
    per vector; returns the pieces and the shard-wise reconstruction of ``v``."""
    u, norms = _normalised(v)
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
        a, b = _units(m)
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
            a, b = sides["A"]["v"], sides["B"]["v"]
            w = frobenius_sq(a, b.T)
            num, den = num + frobenius_error_sq(a, b.T, a_hat, b_hat.T, norm_sq=w), den + w
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
