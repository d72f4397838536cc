"""Retrieve-then-compose (LoraRetriever, arXiv 2402.09997): the skills nearest a prompt by the similarity of
its embedding to their profile texts (example prompts and description), so that α is computed among a few
candidates whatever the library's size.

:class:`ProfileIndex` holds every skill's profile embeddings (unit norm, one block of rows per skill) and
each skill's centroid. A prompt's similarity to a skill is its cosine to the skill's nearest profile text.
Below ``EXACT_ROWS`` rows every row is scored; above, the centroids pick ``coarse`` skills first and only
their rows are scored (one matrix-vector product over N centroids instead of over every text: at 10,000
skills × 4 texts the full product no longer fits the CPU's cache, bench/scale.py). Building an index
reuses the previous one's rows for every skill whose profile did not change, so a library change costs
the new texts' embeddings and one copy, not the library's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import ThreadpoolController

from adapter_store.skill_info import SkillInfo

EXACT_ROWS = 8192  # up to this many profile texts, every one is scored
DIM = 384


def blas_on_one_thread() -> None:
    """numpy's BLAS (OpenBLAS) on one thread in this process, for good. Its idle threads spin for a while
    after each product, and on a small machine they take the cores the prompt encoder's torch threads need:
    at 1,000 skills on 2 cores routing took 95-100 ms at p95 instead of 8 ms (bench/scale.py). The router's
    products are small (a prompt against at most 8,192 rows, or centroids first), so one thread costs them
    a millisecond or so; torch's own threads are not touched."""
    ThreadpoolController().limit(limits=1, user_api="blas")


def profile_texts(s: SkillInfo) -> list[str]:
    """What the router knows of a skill: its example prompts and description (its name when it has neither)."""
    texts = [e for e in s.examples if e.strip()]
    if s.description.strip():
        texts.append(s.description)
    return texts or [s.name.replace("_", " ").replace("-", " ")]


def profile_digest(s: SkillInfo) -> str:
    return hashlib.sha1(json.dumps([s.name, s.sha256, s.description, s.examples]).encode()).hexdigest()


@dataclass
class ProfileIndex:
    names: list[str]  # sorted
    digests: list[str]  # per skill, :func:`profile_digest` (rows are reused while it holds)
    X: np.ndarray  # (rows × d) float32, unit norm; skill i's rows are starts[i]:starts[i + 1]
    starts: np.ndarray  # (n + 1,) int64
    centroids: np.ndarray | None = None  # (n × d) float32, unit norm (computed when not given)
    position: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        if self.centroids is None:
            blocks = [self.X[a:b] for a, b in zip(self.starts[:-1], self.starts[1:])]
            self.centroids = np.stack([_centroid(b) for b in blocks]) if blocks else np.zeros((0, DIM), np.float32)
        self.position = {name: i for i, name in enumerate(self.names)}

    @property
    def y(self) -> np.ndarray:
        """The skill index of each row."""
        return np.repeat(np.arange(len(self.names)), np.diff(self.starts))

    @classmethod
    def build(cls, skills: Sequence[SkillInfo], embed: Callable[[list[str]], np.ndarray],
              previous: "ProfileIndex | None" = None) -> "ProfileIndex":
        """The index of ``skills``: rows of ``previous`` for every unchanged profile, ``embed`` for the rest."""
        skills = sorted(skills, key=lambda s: s.name)
        digests = [profile_digest(s) for s in skills]
        old = previous.position if previous is not None else {}
        blocks: list[np.ndarray | None] = []
        centroids: list[np.ndarray | None] = []
        missing: list[str] = []
        for s, d in zip(skills, digests):
            i = old.get(s.name)
            if i is not None and previous.digests[i] == d:
                blocks.append(previous.X[previous.starts[i]:previous.starts[i + 1]])
                centroids.append(previous.centroids[i])
            else:
                blocks.append(None)
                centroids.append(None)
                missing += profile_texts(s)
        fresh = np.asarray(embed(missing), dtype=np.float32) if missing else np.zeros((0, DIM), np.float32)
        at = 0
        for j, s in enumerate(skills):
            if blocks[j] is None:
                n = len(profile_texts(s))
                blocks[j] = fresh[at:at + n]
                centroids[j] = _centroid(blocks[j])
                at += n
        counts = np.array([len(b) for b in blocks], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        X = np.concatenate(blocks) if blocks else np.zeros((0, DIM), np.float32)
        C = np.stack(centroids) if centroids else np.zeros((0, DIM), np.float32)
        return cls(names=[s.name for s in skills], digests=digests, X=np.ascontiguousarray(X, dtype=np.float32),
                   starts=starts, centroids=C)

    def similarity_of(self, e: np.ndarray, skills: np.ndarray) -> np.ndarray:
        """The prompt's cosine to the nearest profile text of each of ``skills`` (indices)."""
        if len(skills) == 0:
            return np.zeros(0)
        lo, hi = self.starts[skills], self.starts[skills + 1]
        counts = hi - lo
        rows = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        sims = self.X[rows] @ e.astype(np.float32)
        return np.maximum.reduceat(sims, np.concatenate([[0], np.cumsum(counts)[:-1]])).astype(np.float64)

    def nearest(self, e: np.ndarray, k: int, coarse: int,
                allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` skills nearest the prompt (indices, most similar first) and their similarities, among
        the skills ``allowed`` marks (a boolean per skill; None: every skill)."""
        n = len(self.names)
        if n == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        e32 = e.astype(np.float32)
        if len(self.X) <= EXACT_ROWS or n <= coarse:
            sims = np.maximum.reduceat(self.X @ e32, self.starts[:-1]).astype(np.float64)
            pool = np.arange(n)
            if allowed is not None:
                pool, sims = pool[allowed], sims[allowed]
        else:
            scores = self.centroids @ e32
            if allowed is not None:
                scores = np.where(allowed, scores, -np.inf)
                coarse = min(coarse, int(allowed.sum()))
            if coarse == 0:
                return np.zeros(0, np.int64), np.zeros(0)
            pool = np.argpartition(-scores, coarse - 1)[:coarse] if coarse < n else np.arange(n)
            if allowed is not None:
                pool = pool[allowed[pool]]
            sims = self.similarity_of(e, pool)
        if len(pool) > k:
            keep = np.argpartition(-sims, k)[:k]
            pool, sims = pool[keep], sims[keep]
        order = np.argsort(-sims, kind="stable")
        return pool[order], sims[order]


def _centroid(rows: np.ndarray) -> np.ndarray:
    m = rows.mean(axis=0)
    return (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)


def softmax(sims: np.ndarray, temperature: float) -> np.ndarray:
    """α among the candidates from their similarities (the retrieval router's α, without a trained model)."""
    if len(sims) == 0:
        return sims
    z = np.exp((sims - sims.max()) / temperature)
    return z / z.sum()
