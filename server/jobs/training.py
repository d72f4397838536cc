"""Training a LoRA skill on the base model from (prompt, answer) pairs, on CPU.

Loss on the answer tokens only; the prompt is wrapped in the base model's chat template,
exactly as the server wraps chat requests, so a skill learns the format it will be served in.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora.adapter import LoraAdapter
from lora.hf_loading import building, causal_lm

if TYPE_CHECKING:
    from adapter_store.registry import Registry
    from adapter_store.skill_info import SkillInfo
    from adapter_store.validation import BaseModelSpec
    from server.jobs.training_data import Example

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


Conversation = list[dict]


def as_messages(prompt: str | Conversation) -> Conversation:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _encode(tokenizer, prompt: str | Conversation, answer: str) -> tuple[list[int], list[int]]:
    prefix = tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)
    p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def train_lora(
    base_dir: str | Path,
    data: Sequence[tuple[str | Conversation, str]],
    *,
    rank: int = 8,
    alpha: int = 16,
    targets: Sequence[str] = DEFAULT_TARGETS,
    steps: int = 80,
    lr: float = 2e-3,
    batch: int = 8,
    seed: int = 0,
    base_model_id: str | None = None,
    save_dtype: torch.dtype = torch.bfloat16,
    on_step: Callable[[int, float], None] | None = None,
    init: LoraAdapter | None = None,
) -> LoraAdapter:
    """Train a LoRA on (prompt or conversation, answer) pairs; ``init`` starts it from an existing
    adapter of the same rank (PSEC's reuse of prior skills), else from PEFT's default init."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, task_type="CAUSAL_LM")
    with building():
        model = get_peft_model(causal_lm(base_dir), config)
    if init is not None:
        _load_init(model, init, rank, alpha / rank)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps))
    encoded = [_encode(tokenizer, p, a) for p, a in data]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.train()
    for step in range(steps):
        chunk = rng.sample(encoded, min(batch, len(encoded)))
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk])
        labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in chunk])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if on_step:
            on_step(step, float(loss.detach()))
    state = {k: v.detach().to(save_dtype).contiguous() for k, v in get_peft_model_state_dict(model).items()}
    cfg = model.peft_config["default"].to_dict()
    cfg["base_model_name_or_path"] = base_model_id or Path(base_dir).name
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["peft_type"] = "LORA"
    cfg["task_type"] = "CAUSAL_LM"
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    return LoraAdapter(config=cfg, tensors=state)


def _load_init(model, init: LoraAdapter, rank: int, scaling: float) -> None:
    """Copy ``init``'s factors (rank ≤ ``rank``, zero-padded) into the fresh LoRA, so the new skill starts
    at ΔW = init's ΔW."""
    modules = init.modules()
    with torch.no_grad():
        for name, module in model.named_modules():
            key = name.removeprefix("base_model.model.")
            if hasattr(module, "lora_A") and "default" in module.lora_A and key in modules:
                m = modules[key]
                r = min(m.rank, rank)
                A = torch.zeros_like(module.lora_A["default"].weight)
                B = torch.zeros_like(module.lora_B["default"].weight)
                A[:r] = m.A[:r]
                B[:, :r] = m.scaling * m.B[:, :r] / scaling
                module.lora_A["default"].weight.copy_(A)
                module.lora_B["default"].weight.copy_(B)


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: Sequence[str | Conversation], max_new_tokens: int = 64,
                    batch_size: int = 1) -> list[str]:
    """Greedy answers, ``batch_size`` prompts at a time (left-padded; 1 = one prompt per forward pass)."""
    model.eval()
    out = []
    if batch_size <= 1:
        for p in prompts:
            x = tokenizer.apply_chat_template(as_messages(p), add_generation_prompt=True, return_tensors="pt", return_dict=True)
            y = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False)
            out.append(tokenizer.decode(y[0, x["input_ids"].shape[1]:], skip_special_tokens=True))
        return out
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(as_messages(p), add_generation_prompt=True, tokenize=False)
                     for p in prompts[i:i + batch_size]]
            x = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            y = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(y[:, x["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


@torch.inference_mode()
def greedy_answers(base_dir: str | Path, adapter_dir: str | Path | None, prompts: Sequence[str], max_new_tokens: int = 40,
                   batch_size: int = 1) -> list[str]:
    """Greedy answers of the base model (with the adapter, if given, merged into the weights) via transformers+PEFT."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with building():
        model = causal_lm(base_dir)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)


@contextmanager
def merged(model, adapter: LoraAdapter | None):
    """``model`` (a transformers causal LM) with ``adapter`` merged into its weights (W0 + s·B·A) for the
    duration of the block, restored exactly afterwards (the original tensors are copied back)."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, m in (adapter.modules() if adapter is not None else {}).items():
                weight = model.get_submodule(name).weight
                saved[name] = weight.detach().clone()
                weight += m.scaling * (m.B.float() @ m.A.float())
        yield model
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                model.get_submodule(name).weight.copy_(w)


def encode_pair(tokenizer, prompt: str | Conversation, answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one chat example: the loss falls on the answer and its end-of-turn token."""
    return _encode(tokenizer, prompt, answer)


def init_from_skills(adapters: Sequence[LoraAdapter], rank: int) -> LoraAdapter:
    """The start point of ``mosaic skills train --init-from``: the skills' average (weights 1/K), truncated to
    ``rank`` by the low-rank SVD (PSEC reuses prior skills as the new skill's initialisation)."""
    from composer import compose

    init, _ = compose(list(adapters), [1.0 / len(adapters)] * len(adapters), method="svd", rank=rank)
    return init


def split_examples(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation) after a seeded shuffle; under 10 examples, all of them train."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_val = int(len(shuffled) * val_fraction) if len(shuffled) >= 10 else 0
    return shuffled[n_val:], shuffled[:n_val]


@dataclass(frozen=True)
class TrainingPlan:
    """What ``mosaic skills train`` is about to train on: the data, read and split, and the start point."""

    source: Path
    examples: list[Example]
    train: list[Example]
    val: list[Example]
    init: LoraAdapter | None = None
    init_from: str | None = None


def plan_training(registry: Registry, base_dir: str | Path, data: str | Path, *, max_tokens: int = 512,
                  val_fraction: float = 0.1, seed: int = 0, init_from: str | None = None,
                  rank: int = 8) -> TrainingPlan:
    """Read ``data`` (every bad line reported), split it, and load the ``init_from`` skills
    (comma-separated) as the start point; nothing is trained yet."""
    from transformers import AutoTokenizer

    from server.jobs.training_data import read_jsonl

    examples = read_jsonl(data, AutoTokenizer.from_pretrained(base_dir), max_tokens)
    train, val = split_examples(examples, val_fraction, seed)
    init = None
    if init_from:
        parts = [registry.load(s.strip())[1] for s in init_from.split(",") if s.strip()]
        init = init_from_skills(parts, rank)
    return TrainingPlan(Path(data), examples, train, val, init, init_from)


@dataclass(frozen=True)
class TrainedSkill:
    info: SkillInfo
    plan: TrainingPlan
    val_exact_match: float | None  # None: no validation split

    def record(self) -> dict:
        """The stored skill's info with how it was trained (what ``--json`` prints)."""
        return {**self.info.model_dump(), "train_examples": len(self.plan.train), "val_examples": len(self.plan.val),
                "val_exact_match": self.val_exact_match, "init_from": self.plan.init_from}


def train_skill(registry: Registry, base_dir: str | Path, plan: TrainingPlan, name: str, *, spec: BaseModelSpec,
                max_rank: int, base_model_id: str | None = None, description: str | None = None, rank: int = 8,
                alpha: int = 16, targets: Sequence[str] = DEFAULT_TARGETS, steps: int = 40, lr: float = 2e-3,
                batch: int = 8, seed: int = 0, on_step: Callable[[int, float], None] | None = None) -> TrainedSkill:
    """Train on ``plan.train``, check the adapter as an upload is checked, measure greedy exact match on
    ``plan.val``, and register it as the next version of ``name`` (tagged ``trained``)."""
    import tempfile

    from adapter_store.validation import validate_adapter

    adapter = train_lora(base_dir, [(e.messages, e.answer) for e in plan.train], rank=rank, alpha=alpha,
                         targets=targets, steps=steps, lr=lr, batch=batch, seed=seed, base_model_id=base_model_id,
                         init=plan.init, on_step=on_step)
    validate_adapter(adapter, spec, max_rank=max_rank, name=name)
    score = None
    if plan.val:
        with tempfile.TemporaryDirectory() as tmp:
            adapter.save_dir(tmp)
            answers = greedy_answers(base_dir, tmp, [e.messages for e in plan.val], max_new_tokens=64)
        score = sum(a.strip() == e.answer.strip() for a, e in zip(answers, plan.val)) / len(plan.val)
    prompts = [e.prompt for e in plan.examples]
    description = description or f"Trained on {plan.source.name}: e.g. {prompts[0][:80]}"
    info = registry.add(name, adapter, description=description, examples=prompts[:8], tags=["trained"])
    return TrainedSkill(info, plan, score)
