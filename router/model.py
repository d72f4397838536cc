"""The trained router for one library (:class:`RouterModel`): its profile index and, while the library is
small enough, the logistic-regression network's weights; how it is named and stored in Redis."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from router.retrieval import ProfileIndex, softmax

MODEL_FORMAT = 2  # the stored model's layout: raised whenever it changes, so an older one is never loaded


def has_network(n: int, lr_max_skills: int) -> bool:
    """Whether a library of ``n`` skills gets the trained network's α (else the similarity softmax)."""
    return 2 <= n <= lr_max_skills


def profile_key(digests: Sequence[str], encoder: str, network: bool, C: float) -> str:
    """The stored model's key: the format, the encoder, the α mode (network or softmax), C and every
    skill's profile (``digests``: :func:`router.retrieval.profile_digest` of each, in name order), so a
    model stored under other settings or by other code is never taken up."""
    doc = [MODEL_FORMAT, encoder, network, C if network else None, *digests]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:24]


@dataclass
class RouterModel:
    """The router for one library: its profile index, and the network's weights when the library is small
    enough to have one (``coef`` None: α is the softmax of the candidates' similarities). ``complete`` is
    False for the index alone that serves before the first network is trained."""

    key: str
    index: ProfileIndex
    coef: np.ndarray | None = None  # (classes × d), classes in index.names order
    intercept: np.ndarray | None = None
    trained_seconds: float = 0.0
    complete: bool = True

    @property
    def names(self) -> list[str]:
        return self.index.names

    @property
    def y(self) -> np.ndarray:
        return self.index.y

    def alpha(self, e: np.ndarray, among: np.ndarray, sims: np.ndarray, temperature: float) -> np.ndarray:
        """α over the skills ``among`` (indices; ``sims`` their similarities), summing to 1."""
        if len(among) == 0:
            return np.zeros(0)
        if self.coef is None:
            return softmax(sims, temperature)
        logits = self.coef @ e + self.intercept
        if self.coef.shape[0] == 1:  # binary LR: one logit
            p1 = 1 / (1 + np.exp(-float(logits[0])))
            full = np.array([1 - p1, p1])
        else:
            full = np.exp(logits - logits.max())
        sub = full[among]
        return sub / sub.sum() if sub.sum() > 0 else np.full(len(among), 1.0 / len(among))

    def to_redis(self) -> dict[str, bytes | str]:
        buf = io.BytesIO()
        np.savez(buf, **({"coef": self.coef, "intercept": self.intercept} if self.coef is not None else {}))
        return {"key": self.key, "names": json.dumps(self.names), "arrays": buf.getvalue(),
                "trained_seconds": str(self.trained_seconds)}

    @classmethod
    def from_redis(cls, raw: dict[str, bytes], index: ProfileIndex, network: bool) -> "RouterModel | None":
        """The stored network over this replica's own index of the same library (the key says it is), or
        None when what is stored does not fit it (other skills, the other α mode, another layout)."""
        try:
            if json.loads(raw["names"]) != index.names:
                return None
            z = np.load(io.BytesIO(raw["arrays"]))
            if set(z.files) != ({"coef", "intercept"} if network else set()):
                return None
            coef, intercept = (z["coef"], z["intercept"]) if network else (None, None)
            if network and (coef.shape != (1 if len(index.names) == 2 else len(index.names), index.X.shape[1])
                            or intercept.shape != (coef.shape[0],)):
                return None
            return cls(key=raw["key"].decode(), index=index, coef=coef, intercept=intercept,
                       trained_seconds=float(raw.get("trained_seconds", b"0")))
        except (KeyError, ValueError, OSError):  # a damaged or foreign record: retrain
            return None
