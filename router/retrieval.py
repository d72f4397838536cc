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


class ProfileDigests:
    """:func:`profile_digest` of each skill, remembered per SkillInfo object: the server's library view hands
    out the same object until that skill changes, so a rebuild after one upload hashes one profile, not the
    library's (at 10,000 skills the hashing alone held the GIL for about 35 ms, beside the requests)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[SkillInfo, str]] = {}

    def __call__(self, skills: Sequence[SkillInfo]) -> list[str]:
        seen, now, out = self._seen, {}, []
        for s in skills:
            hit = seen.get(s.name)
            digest = hit[1] if hit is not None and hit[0] is s else profile_digest(s)
            now[s.name] = (s, digest)
            out.append(digest)
        self._seen = now
        return out


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
              previous: "ProfileIndex | None" = None,
              digest: Callable[[Sequence[SkillInfo]], list[str]] | None = None) -> "ProfileIndex":
        """The index of ``skills``: rows of ``previous`` for every unchanged profile, ``embed`` for the rest
        (``digest``: each skill's :func:`profile_digest`, e.g. a :class:`ProfileDigests`)."""
        skills = sorted(skills, key=lambda s: s.name)
        digests = digest(skills) if digest is not None else [profile_digest(s) for s in skills]
        n = len(skills)
        old = previous.position if previous is not None else {}
        source = np.full(n, -1, dtype=np.int64)  # the previous index's position of each reused skill
        counts = np.zeros(n, dtype=np.int64)
        missing: list[str] = []
        for j, (s, d) in enumerate(zip(skills, digests)):
            i = old.get(s.name)
            if i is not None and previous.digests[i] == d:
                source[j] = i
            else:
                texts = profile_texts(s)
                counts[j] = len(texts)
                missing += texts
        reused = source >= 0
        if reused.any():
            counts[reused] = np.diff(previous.starts)[source[reused]]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        X = np.empty((int(starts[-1]), DIM), dtype=np.float32)
        C = np.empty((n, DIM), dtype=np.float32)
        # reused skills are copied run by run (a run: skills next to each other in both indexes), so a change
        # costs about one copy of the matrix (7 ms at 10,000 skills), not a copy per skill or a gather (40-90
        # ms holding the GIL beside the requests)
        js = np.flatnonzero(reused)
        cuts = np.flatnonzero((np.diff(js) != 1) | (np.diff(source[js]) != 1)) + 1
        for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(js)]])):
            if b > a:
                lo, hi = js[a], js[b - 1]
                X[starts[lo]:starts[hi + 1]] = previous.X[previous.starts[source[lo]]:previous.starts[source[hi] + 1]]
                C[lo:hi + 1] = previous.centroids[source[lo]:source[hi] + 1]
        if missing:
            X[_spans(starts[:-1][~reused], counts[~reused])] = np.asarray(embed(missing), dtype=np.float32)
            for j in np.flatnonzero(~reused):
                C[j] = _centroid(X[starts[j]:starts[j + 1]])
        return cls(names=[s.name for s in skills], digests=digests, X=X, starts=starts, centroids=C)

    def similarity_of(self, e: np.ndarray, skills: np.ndarray) -> np.ndarray:
        """The prompt's cosine to the nearest profile text of each of ``skills`` (indices)."""
        if len(skills) == 0:
            return np.zeros(0)
        counts = self.starts[skills + 1] - self.starts[skills]
        sims = self.X[_spans(self.starts[skills], counts)] @ e.astype(np.float32)
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


def _spans(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The row numbers of blocks starting at ``first`` with ``counts`` rows each, block after block."""
    return np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())


def _centroid(rows: np.ndarray) -> np.ndarray:
    m = rows.mean(axis=0)
    return (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)


def softmax(sims: np.ndarray, temperature: float) -> np.ndarray:
    """α among the candidates from their similarities (the retrieval router's α, without a trained model)."""
    if len(sims) == 0:
        return sims
    z = np.exp((sims - sims.max()) / temperature)
    return z / z.sum()
