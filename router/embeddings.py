"""The router's cache of profile-text embeddings in Redis (``P:aux:router-embeddings``, one field per encoder
and text), so that a text is encoded once for all replicas and restarts. It holds the texts of the library
the router last indexed and no others: when a skill is deleted, or its examples or description change, the
embeddings of texts no skill has any more are deleted as the router takes up the change
(:meth:`EmbeddingCache.keep`); the first time a process does so it also deletes what no skill has left from
before it started (skills deleted while no router ran)."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Sequence

import numpy as np

from lora.errors import UnavailableError
from adapter_store.registry import Registry
from adapter_store.skill_info import SkillInfo
from router.encoder import Encoder
from router.retrieval import DIM, profile_texts

EMB_KEY = "router-embeddings"

log = logging.getLogger("mosaic.router")


def text_key(encoder: str, text: str) -> str:
    """The field of ``text``'s embedding by ``encoder``."""
    return hashlib.sha1(f"{encoder}\0{text}".encode()).hexdigest()


class EmbeddingCache:
    """Embeddings of profile texts by (encoder, text), in the registry's Redis (in memory only without one)."""

    def __init__(self, registry: Registry | None, encoder: Encoder) -> None:
        self.registry, self.encoder = registry, encoder
        self._keys: dict[tuple[str, str], frozenset[str]] = {}  # (skill, profile digest) -> its texts' fields
        self._refs: Counter[str] = Counter()  # field -> profiles that have its text
        self._unswept = True  # what earlier processes left is still to be compared with the library
        self._pending: list[str] = []  # fields to delete that Redis was away for
        self._lock = threading.Lock()  # keep() runs in the trainer thread, and in a request for an empty library

    def key(self, text: str) -> str:
        return text_key(self.encoder.name, text)

    def embed(self, texts: list[str]) -> np.ndarray:
        """One row per text: from Redis when cached, else encoded (and cached)."""
        keys = [self.key(t) for t in texts]
        cached = self.registry.aux.get(EMB_KEY, keys) if self.registry else {}
        missing = [i for i, k in enumerate(keys) if k not in cached]
        out = {k: np.frombuffer(v, dtype=np.float32) for k, v in cached.items()}
        if missing:
            fresh = self.encoder.encode([texts[i] for i in missing])
            for i, row in zip(missing, fresh):
                out[keys[i]] = row
            if self.registry:
                self.registry.aux.add_fields(EMB_KEY, {keys[i]: out[keys[i]].tobytes() for i in missing})
        return np.stack([out[k] for k in keys]) if keys else np.zeros((0, DIM), np.float32)

    def keep(self, names: Sequence[str], digests: Sequence[str], skills: Sequence[SkillInfo]) -> int:
        """After the router read the library ``skills`` (their ``names`` and profile ``digests``, in one order):
        delete the embeddings of texts none of them has. Only the profiles that changed since the last call
        are looked at (a set difference over the library's (name, digest) pairs); the first call also compares
        the whole hash with the library. Returns how many were deleted."""
        with self._lock:
            return self._keep(set(zip(names, digests)), skills)

    def _keep(self, pairs: set[tuple[str, str]], skills: Sequence[SkillInfo]) -> int:
        added, removed = pairs - self._keys.keys(), self._keys.keys() - pairs
        if added:
            by_name = {s.name: s for s in skills}
            for pair in added:
                keys = self._keys[pair] = frozenset(self.key(t) for t in profile_texts(by_name[pair[0]]))
                self._refs.update(keys)
        dead = self._pending
        for pair in removed:  # after the additions: a text that moved to another skill stays
            for k in self._keys.pop(pair):
                self._refs[k] -= 1
                if self._refs[k] <= 0:
                    del self._refs[k]
                    dead.append(k)
        if self.registry is None:
            self._pending = []
            return 0
        return self._delete(dead)

    def _delete(self, dead: list[str]) -> int:
        try:
            if self._unswept:
                dead = list(self.registry.aux.field_names(EMB_KEY) - self._refs.keys())
            gone = self.registry.aux.delete_fields(EMB_KEY, [k for k in dead if k not in self._refs])
        except UnavailableError as e:  # tried again at the next change
            log.warning("the router's unused embeddings are kept for now: %s", e)
            self._pending = dead
            return 0
        self._unswept, self._pending = False, []
        return gone
