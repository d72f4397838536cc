"""One lock around building a transformers or PEFT model, for every room that builds one in this process.

transformers' ``from_pretrained`` swaps ``torch.nn.init``'s functions and ``PreTrainedModel.init_weights``
for no-ops while it builds a model and puts back what it found when it is done. Two builds at once in one
process (a learn job's thread while a request loads the reference engine, the router's encoder while a test
loads the base model) can leave the no-ops in place for good: every later model keeps its buffers on the
meta device ("Cannot copy out of meta tensor") and PEFT's fresh LoRA factors are never initialised. Every
``from_pretrained``, ``get_peft_model`` and ``SentenceTransformer(...)`` in Mosaic runs under :func:`building`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

_LOCK = threading.RLock()  # re-entrant: a helper that builds may call another that builds


@contextmanager
def building():
    """Hold while a model is built (not while it runs): builds in this process happen one at a time."""
    with _LOCK:
        yield


def causal_lm(model_dir: str | Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(model_dir, dtype=float32, **kwargs)`` under :func:`building`."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.float32)
    with building():
        return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
