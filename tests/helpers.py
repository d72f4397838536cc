"""Small builders shared by the tests: random LoRA adapters on made-up or real module shapes."""

from __future__ import annotations

import torch

from adapter_store.adapter import LoraAdapter, factor_key
from server.settings import Settings

# the router thresholds the server uses by default (not read from the environment)
ROUTER_CONFIG = Settings.model_construct().router_config()


def random_adapter(
    shapes: dict[str, tuple[int, int]],
    r: int,
    *,
    alpha: float = 16,
    seed: int = 0,
    rslora: bool = False,
    base_model: str = "tiny",
    dtype: torch.dtype = torch.float32,
    scale: float = 0.1,
) -> LoraAdapter:
    """A PEFT-format adapter with random (non-zero) A and B for each module in ``shapes``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_out, d_in) in shapes.items():
        tensors[factor_key(name, "A")] = (torch.randn(r, d_in, generator=g) * scale).to(dtype)
        tensors[factor_key(name, "B")] = (torch.randn(d_out, r, generator=g) * scale).to(dtype)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": r,
        "lora_alpha": alpha, "use_rslora": rslora, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in shapes}),
        "lora_dropout": 0.0, "bias": "none",
    }
    return LoraAdapter(config=config, tensors=tensors)


def dense_delta(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The oracle: each module's ΔW = s·B·A as a dense float64 matrix."""
    return {n: m.scaling * (m.B.double() @ m.A.double()) for n, m in adapter.modules().items()}
