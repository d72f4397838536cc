"""Models built from several threads at once: transformers' init patching is never left behind."""

from __future__ import annotations

import threading

import torch
from transformers import PreTrainedModel

from lora.hf_loading import causal_lm


def test_models_built_at_once_leave_torch_init_as_it_was(tmp_path):
    """Without the lock, two from_pretrained at once leave torch.nn.init's functions as no-ops for the rest of the
    process (seen here in every one of 4 rounds of 2 threads): every later model's non-persistent buffers then
    stay on the meta device and PEFT's fresh factors uninitialised."""
    from tests.tiny_lm import tiny_llama

    tiny_llama(seed=0, dtype=torch.float32).save_pretrained(tmp_path)
    originals = (torch.nn.init.kaiming_uniform_, torch.nn.init.normal_, PreTrainedModel.init_weights)
    built, failed = [], []

    def build():
        try:
            built.append(causal_lm(tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            failed.append(exc)

    for _ in range(3):
        threads = [threading.Thread(target=build) for _ in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert not failed and len(built) == 9
    assert (torch.nn.init.kaiming_uniform_, torch.nn.init.normal_, PreTrainedModel.init_weights) == originals
    model = causal_lm(tmp_path)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
