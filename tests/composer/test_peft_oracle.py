"""PEFT's add_weighted_adapter(combination_type="cat") is exact: Mosaic's linear must agree with it,
and PEFT's svd at a smaller rank is the Eckart–Young truncation Mosaic's svd must match."""

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from lora.adapter import LoraAdapter
from composer import compose
from tests.helpers import dense_delta


def _tiny_peft():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(cfg)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], use_rslora=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _mosaic_adapter(model, name: str) -> LoraAdapter:
    cfg = model.peft_config[name].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    cfg["peft_type"] = "LORA"
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    return LoraAdapter(config=cfg, tensors=tensors)


def _peft_delta(model, adapter: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            A = module.lora_A[adapter].weight.double()
            B = module.lora_B[adapter].weight.double()
            key = name.removeprefix("base_model.model.")
            out[key] = module.scaling[adapter] * (B @ A)
    return out


def test_linear_agrees_with_peft_cat():
    model = _tiny_peft()
    weights = [0.8, -0.6]
    model.add_weighted_adapter(["first", "second"], weights, "cat_merged", combination_type="cat")
    ours, _ = compose([_mosaic_adapter(model, "first"), _mosaic_adapter(model, "second")], weights, method="linear")
    theirs = _peft_delta(model, "cat_merged")
    got = dense_delta(ours)
    assert set(got) == set(theirs)
    for n in theirs:
        torch.testing.assert_close(got[n], theirs[n], rtol=1e-5, atol=1e-6)


def test_svd_agrees_with_peft_svd_truncation():
    model = _tiny_peft()
    weights = [1.0, 0.5]
    model.add_weighted_adapter(["first", "second"], weights, "svd_merged", combination_type="svd", svd_rank=3)
    ours, _ = compose([_mosaic_adapter(model, "first"), _mosaic_adapter(model, "second")], weights, method="svd", rank=3)
    theirs = _peft_delta(model, "svd_merged")
    got = dense_delta(ours)
    for n in theirs:
        torch.testing.assert_close(got[n], theirs[n], rtol=1e-3, atol=1e-5)
