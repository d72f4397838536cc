"""Skill expansion (server/jobs/expansion.py) and the learned-composition pipeline (server/jobs/learn_composition.py) on a
tiny random Llama: the hooks against merged weights (the oracle), the residual's exact shape (the composition
kept bit for bit, the difference of rank ≤ r), the full start at the composition, learning on a planted task,
cancellation, and the report's rows."""

from __future__ import annotations

import threading

import pytest
import torch

from lora.adapter import LoraAdapter
from server.jobs.expansion import ExpandOptions, HookedLora, expand, new_factors
from server.jobs.learn_composition import (
    BelowBestInput,
    LearnCancelled,
    LearnOptions,
    LearnReport,
    Row,
    check_min_validation,
    learn_composition,
)
from server.jobs.learned_weights import LossModel
from tests.tiny_lm import linear_shapes, tiny_llama, tiny_skill, tiny_tokenizer

PAIRS = [("hello there", "abc"), ("who is it", "xyz q"), ("a", "hello world"), ("quiet", "loud"), ("up", "down"),
         ("left", "right"), ("in", "out")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _factors(adapter: LoraAdapter) -> dict:
    return {k: (m.A.double(), m.scaling * m.B.double()) for k, m in adapter.modules().items()}


def _delta(factors: dict) -> dict:
    return {k: b.double() @ a.double() for k, (a, b) in factors.items()}


def test_hooks_compute_the_merged_weights(tokenizer):
    """Frozen and trained parts through forward hooks give the logits of the model with W + Σ B A merged in
    (float64: the oracle is the dense sum written into the weights)."""
    model = tiny_llama(0, torch.float64)
    base = _factors(tiny_skill(model, 4, 1, scale=0.3))
    trained = {k: (a.double(), b.double() + 0.05 * torch.randn_like(b, dtype=torch.float64))
               for k, (a, b) in new_factors(linear_shapes(model), 3, seed=5).items()}
    ids = torch.tensor([tokenizer("<|im_start|>user\nhello there<|im_end|>")["input_ids"]])
    before = {k: model.get_submodule(k).weight.clone() for k in trained}
    with HookedLora(model, base, trained).hooked():
        hooked = model(input_ids=ids).logits
    assert all(torch.equal(model.get_submodule(k).weight, w) for k, w in before.items())  # restored bit for bit
    with torch.no_grad():
        saved = {k: model.get_submodule(k).weight.clone() for k in trained}
        for k in trained:
            w = model.get_submodule(k).weight
            w += (base[k][1] @ base[k][0] if k in base else 0) + trained[k][1] @ trained[k][0]
        merged = model(input_ids=ids).logits
        for k, w in saved.items():
            model.get_submodule(k).weight.copy_(w)
    assert torch.allclose(hooked, merged, atol=1e-10, rtol=0), (hooked - merged).abs().max()
    assert all(p.requires_grad for p in model.parameters())  # restored after the hooks


def test_residual_keeps_the_composition_and_adds_rank_r(tokenizer):
    model = tiny_llama(0, torch.float32)
    base = _factors(tiny_skill(model, 4, 1, scale=0.3))
    modules = sorted(linear_shapes(model))
    seen = []
    result = expand(model, tokenizer, PAIRS[:5], PAIRS[5:], ExpandOptions(rank=2, steps=4, lr=0.02, patience=10),
                    modules=modules, base=base, progress=lambda s, t, v: seen.append(s))
    assert seen == [1, 2, 3, 4] and len(result.curve) == 4 and result.stopped == "budget"
    assert result.best_val_loss == min([result.initial_val_loss] + [p.val_loss for p in result.curve])
    assert set(result.factors) == set(modules)
    served, want = _delta(result.factors), _delta(base)
    moved = 0
    for k in modules:
        A, B = result.factors[k]
        if k in base:  # the composition's factors come first, unchanged
            assert torch.equal(A[:4], base[k][0].float()) and torch.equal(B[:, :4], base[k][1].float())
        diff = served[k] - want.get(k, 0)
        assert torch.linalg.matrix_rank(diff, atol=1e-6) <= 2
        moved += int(diff.abs().max() > 0)
    assert result.best_step == 0 or moved > 0


def test_full_start_begins_at_the_composition(tokenizer):
    """``start: full``: the composition's own factors are trained too, from where they are: before a step the
    served adapter is the composition exactly (the new rank's B is zero)."""
    model = tiny_llama(0, torch.float32)
    base = _factors(tiny_skill(model, 4, 1, scale=0.3))
    stop = threading.Event()
    stop.set()
    result = expand(model, tokenizer, PAIRS[:5], PAIRS[5:], ExpandOptions(rank=2, steps=4, start="full"),
                    modules=sorted(base), base=base, stop=stop)
    assert result.stopped == "cancelled" and result.curve == [] and result.best_step == 0
    for k, d in _delta(result.factors).items():
        assert torch.allclose(d, _delta(base)[k], atol=1e-6)
    # trained a few steps, the composition's own factors move too
    moved = expand(model, tokenizer, PAIRS[:5], PAIRS[5:], ExpandOptions(rank=2, steps=3, lr=0.05, start="full",
                   patience=10), modules=sorted(base), base=base)
    k = sorted(base)[0]
    if moved.best_step:
        assert not torch.equal(moved.factors[k][0][:4], base[k][0].float())


def test_scratch_learns_a_planted_answer(tokenizer):
    """From nothing, a rank-4 LoRA fits one fixed answer to every prompt: the validation loss falls by half."""
    model = tiny_llama(0, torch.float32, init=0.2)
    pairs = [(p, "abc abc") for p, _ in PAIRS]
    result = expand(model, tokenizer, pairs[:5], pairs[5:], ExpandOptions(rank=4, steps=30, lr=0.02, patience=30),
                    modules=sorted(linear_shapes(model)))
    assert result.best_val_loss < 0.5 * result.initial_val_loss, (result.initial_val_loss, result.best_val_loss)


def _loss_model(model, tokenizer) -> LossModel:
    lm = LossModel.__new__(LossModel)  # the server's scorer around the tiny model (its constructor loads from disk)
    lm.model, lm.tokenizer, lm._lock = model, tokenizer, threading.Lock()
    return lm


def test_the_pipeline_reports_every_row_and_can_be_cancelled(tokenizer):
    model = tiny_llama(0, torch.float32)
    adapters = [tiny_skill(model, 4, 1, scale=0.3), tiny_skill(model, 2, 2, scale=0.3)]
    lm = _loss_model(model, tokenizer)
    options = LearnOptions(examples=[{"prompt": p, "answer": a} for p, a in PAIRS], steps=2, validation=0.3,
                           expand={"rank": 2, "steps": 2})
    stages = []
    learned = learn_composition(lm, adapters, ["a@1", "b@1"], options, weigh=lambda prompt: [1.0, 0.0],
                                progress=lambda stage, *rest: stages.append(stage))
    rows = learned.report.rows
    assert [r.kind for r in rows] == ["alone", "alone", "fixed", "context", "learned", "learned", "expanded", "scratch"]
    assert [r.name for r in rows[:2]] == ["a@1 alone", "b@1 alone"]
    assert learned.report.stored == "expanded (rank 2, residual)" and learned.report.val_examples == 2
    assert list(dict.fromkeys(stages)) == ["baselines", "learn per skill", "learn", "expand", "scratch"]
    assert all(0 <= r.val_exact_match <= 1 and r.val_loss > 0 for r in rows)
    assert learned.fusion.granularity == "layer" and len(learned.fusion.table) == 2
    # the stored adapter: the learned fusion, then a rank-2 residual
    from composer.fusion import fuse
    fused = _delta(_factors(fuse(adapters, learned.fusion)))
    for k, d in _delta(_factors(learned.adapter)).items():
        assert torch.linalg.matrix_rank(d - fused.get(k, 0), atol=1e-5) <= 2
    # cancelled during the first learning stage: LearnCancelled, whatever was learned is dropped
    stop = threading.Event()

    def cancel(stage, step, *rest):
        if stage == "learn per skill" and step == 1:
            stop.set()
    with pytest.raises(LearnCancelled):
        learn_composition(lm, adapters, ["a@1", "b@1"], options, progress=cancel, stop=stop)


def test_min_validation_refuses_below_the_best_input():
    def report(stored_em: float) -> LearnReport:
        rows = [Row(name="a alone", kind="alone", val_exact_match=0.5, val_loss=1.0, seconds=0.0),
                Row(name="b alone", kind="alone", val_exact_match=0.0, val_loss=1.0, seconds=0.0),
                Row(name="learned per layer", kind="learned", val_exact_match=stored_em, val_loss=1.0, seconds=0.0)]
        return LearnReport(rows=rows, stored="learned per layer", train_examples=4, val_examples=2, seconds=0.0)

    check_min_validation(report(0.5))  # equal is enough
    with pytest.raises(BelowBestInput, match="below a alone"):
        check_min_validation(report(0.0))
    with pytest.raises(ValueError, match="min_validation"):
        LearnOptions(min_validation=True, baselines=False)
