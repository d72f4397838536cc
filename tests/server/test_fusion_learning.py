"""Fusion weights learned by gradient (server/jobs/fusion_learning.py) on a tiny random Llama: the gradient against
finite differences (float64), the hooked model against the stored adapter merged in (LossModel), and a planted
task only per-layer weights can solve."""

from __future__ import annotations

import itertools
import random
import threading

import pytest
import torch

from composer import FusionWeights, fuse
from lora.errors import InvalidRequestError
from server.jobs.fusion_learning import FusedModel, FusionOptions, learn_fusion, split_validation
from server.jobs.learned_weights import LossModel
from server.jobs.training import encode_pair, generate_greedy, merged
from tests.helpers import random_adapter
from tests.tiny_lm import LETTERS, linear_shapes, tiny_llama, tiny_skill, tiny_tokenizer

PAIRS = [("hello there", "abc"), ("who is it", "xyz q"), ("a", "hello world"), ("quiet", "loud"), ("up", "down")]
SKILLS = ("s1", "s2")
# the planted answer: skill 1 in the lower half of the layers, skill 2 in the upper half
PLANTED = FusionWeights(granularity="layer", skills=SKILLS, groups=("0", "1", "2", "3"),
                        table=((1, 1, 0, 0), (0, 0, 1, 1)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model's forward is dominated by per-op overhead: one thread is several times faster than two
    contending on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _skills(model, scale=0.3):
    """Two skills of different ranks and scalings (the second rslora) on the tiny model's modules."""
    return [tiny_skill(model, 4, 1, alpha=8, scale=scale), tiny_skill(model, 2, 2, alpha=16, scale=scale, rslora=True)]


def _random_layer_weights(adapters, seed=0) -> FusionWeights:
    start = FusionWeights.broadcast("layer", SKILLS, adapters[0].module_names())
    g = torch.Generator().manual_seed(seed)
    return start.with_table(1 + 0.5 * torch.randn(2, len(start.groups), generator=g, dtype=torch.float64))


def test_gradient_equals_central_finite_differences(tokenizer):
    """float64 throughout (tiny_llama keeps Llama's norms in the model's dtype): autograd's gradient of the mean
    answer cross-entropy w.r.t. every per-layer weight equals (L(w + ε) − L(w − ε)) / 2ε."""
    model = tiny_llama(0, torch.float64)
    adapters = _skills(model)
    weights = _random_layer_weights(adapters)
    encoded = [encode_pair(tokenizer, p, a) for p, a in PAIRS]
    fused = FusedModel(model, adapters, weights)
    eps = 1e-6
    with fused.hooked():
        fused.loss(encoded, pad=0, batch=2, grad=True)  # 3 chunks: the gradient accumulates over them
        grad = fused.w.grad.clone()
        numeric = torch.zeros_like(grad)
        at = fused.w.detach().clone()
        for i, j in itertools.product(range(2), range(4)):
            step = torch.zeros_like(at)
            step[i, j] = eps
            fused.set_weights(at + step)
            up = fused.loss(encoded, pad=0)
            fused.set_weights(at - step)
            down = fused.loss(encoded, pad=0)
            numeric[i, j] = (up - down) / (2 * eps)
        fused.set_weights(at)
        # per skill is per layer with one column: its gradient is the sum over the layers (chain rule)
        per_skill = FusedModel(model, adapters, FusionWeights.broadcast("skill", SKILLS, adapters[0].module_names()))
    assert grad.abs().min() > 1e-5  # every weight matters
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-9)
    with per_skill.hooked():
        per_skill.loss(encoded, pad=0, grad=True)
    ones = FusedModel(model, adapters, FusionWeights.broadcast("layer", SKILLS, adapters[0].module_names()))
    with ones.hooked():
        ones.loss(encoded, pad=0, grad=True)
    torch.testing.assert_close(per_skill.w.grad[:, 0], ones.w.grad.sum(1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_hooks_compute_the_stored_adapter(tmp_path, tokenizer, granularity):
    """The hooked model at weights w scores the answers exactly as LossModel does with fuse(adapters, w) merged
    into the weights: what is learned is what gets stored and served. Hooks and frozen flags are gone after."""
    tiny_llama(3, torch.float32).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reference = LossModel(tmp_path)
    model = reference.model
    adapters = _skills(model)
    start = FusionWeights.broadcast(granularity, SKILLS, adapters[0].module_names())
    g = torch.Generator().manual_seed(1)
    weights = start.with_table(torch.randn(2, len(start.groups), generator=g, dtype=torch.float64))
    fused = FusedModel(model, adapters, weights)
    encoded = [encode_pair(reference.tokenizer, p, a) for p, a in PAIRS]
    with fused.hooked():
        hooked = fused.loss(encoded, pad=reference.tokenizer.pad_token_id)
    stored = reference.loss(fuse(adapters, weights), PAIRS)
    base = reference.loss(None, PAIRS)
    assert abs(stored - base) > 1e-2  # the fusion changes the loss, so agreeing means something
    assert hooked == pytest.approx(stored, rel=1e-6)  # float32: they agree to about 3e-8
    assert all(p.requires_grad for p in model.parameters()) and reference.loss(None, PAIRS) == base


def _planted_data(model, tokenizer, adapters, n=32, seed=0):
    """(prompt, answer) pairs: random letter prompts, each answered by the planted teacher's greedy 8 characters."""
    rng = random.Random(seed)
    prompts = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(5, 12))) for _ in range(n)]
    model.generation_config.suppress_tokens = [0, 1, 2]  # no <pad>, <unk>, <|im_start|> inside an answer
    with merged(model, fuse(adapters, PLANTED)):
        answers = generate_greedy(model, tokenizer, prompts, max_new_tokens=8, batch_size=16)
    return list(zip(prompts, answers))


def test_planted_task_per_layer_recovers_the_layers_per_skill_cannot(tokenizer):
    """The teacher is skill 1 on layers 0-1 and skill 2 on layers 2-3 of a model whose skills change it strongly
    (weights and factors at 0.4): every per-skill weight pair (w1, w2) is far from it, since it would put each
    skill in all four layers. Learning per layer from 0.5 everywhere finds the planted table; learning per skill
    cannot get close."""
    model = tiny_llama(0, torch.float32, init=0.4)
    adapters = [tiny_skill(model, 4, 1, alpha=8, scale=0.4), tiny_skill(model, 4, 2, alpha=8, scale=0.4)]
    pairs = _planted_data(model, tokenizer, adapters)
    # lr 0.05: at 0.1 the first steps overshoot into another basin on some CPUs (AMD EPYC here, loss 4.98)
    options = dict(steps=300, lr=0.05, l2=0.01, validation=0.25, patience=30)
    seen = []
    layer = learn_fusion(adapters, pairs, FusionOptions(granularity="layer", **options), skills=SKILLS, model=model,
                         tokenizer=tokenizer, start=0.5, progress=lambda *p: seen.append(p))
    skill = learn_fusion(adapters, pairs, FusionOptions(granularity="skill", **options), skills=SKILLS, model=model,
                         tokenizer=tokenizer, start=0.5)
    learned = layer.weights.tensor()
    assert (learned - PLANTED.tensor()).abs().max() < 0.15, layer.weights.table
    assert layer.best_val_loss < skill.best_val_loss - 1.0, (layer.best_val_loss, skill.best_val_loss)
    # not the learner's luck: no per-skill pair on a grid over [-0.5, 1.5]² comes near the per-layer result
    _, val = split_validation(pairs, 0.25, 0)
    encoded = [encode_pair(tokenizer, p, a) for p, a in val]
    grid = FusedModel(model, adapters, FusionWeights.broadcast("skill", SKILLS, adapters[0].module_names()))
    values = [-0.5 + 0.25 * k for k in range(9)]
    with grid.hooked():
        losses = []
        for w1, w2 in itertools.product(values, values):
            grid.set_weights(torch.tensor([[w1], [w2]], dtype=torch.float32))
            losses.append(grid.loss(encoded, pad=0, batch=16))
    assert min(losses) > layer.best_val_loss + 1.0, (min(losses), layer.best_val_loss)
    # the result's bookkeeping: the best of the curve, reported step by step
    assert layer.weights.granularity == "layer" and layer.start.table == ((0.5,) * 4,) * 2
    assert [s for s, _, _ in seen] == [p.step for p in layer.curve] == list(range(1, len(layer.curve) + 1))
    assert layer.best_val_loss == min(p.val_loss for p in layer.curve) == layer.curve[layer.best_step - 1].val_loss
    assert (layer.train_examples, layer.val_examples) == (24, 8)


def test_split_keeps_one_on_each_side():
    assert [len(x) for x in split_validation(list(range(10)), 0.3, 0)] == [7, 3]
    assert [len(x) for x in split_validation(list(range(2)), 0.9, 0)] == [1, 1]
    assert [len(x) for x in split_validation(list(range(3)), 0.01, 0)] == [2, 1]
    assert split_validation(list(range(10)), 0.3, 5) == split_validation(list(range(10)), 0.3, 5)
    with pytest.raises(InvalidRequestError, match="at least 2 examples"):
        split_validation([("p", "a")], 0.3, 0)


def test_stop_progress_and_early_stopping(tokenizer):
    model = tiny_llama(0, torch.float32)
    adapters = _skills(model)
    stop = threading.Event()
    steps = []

    def progress(step, train, val):
        steps.append(step)
        if step == 2:
            stop.set()

    result = learn_fusion(adapters, PAIRS, FusionOptions(steps=50), skills=SKILLS, model=model, tokenizer=tokenizer,
                          progress=progress, stop=stop)
    assert result.stopped == "cancelled" and steps == [1, 2] and len(result.curve) == 2
    assert result.start.table == ((1.0,) * 4,) * 2  # the default start: every skill at full strength
    # a learning rate so large that the steps soon make it worse: stopped `patience` steps after the best
    worse = learn_fusion(adapters, PAIRS, FusionOptions(steps=50, lr=10.0, patience=3), skills=SKILLS, model=model,
                         tokenizer=tokenizer)
    assert worse.stopped == "early_stop" and len(worse.curve) == worse.best_step + 3 < 50
    assert worse.best_val_loss == min([worse.initial_val_loss] + [p.val_loss for p in worse.curve])


def test_bad_input_is_refused(tokenizer):
    model = tiny_llama(0, torch.float32)
    adapters = _skills(model)
    with pytest.raises(InvalidRequestError, match="at least 2 examples"):
        learn_fusion(adapters, PAIRS[:1], FusionOptions(), skills=SKILLS, model=model, tokenizer=tokenizer)
    with pytest.raises(InvalidRequestError, match="start weights are per skill"):
        start = FusionWeights.broadcast("skill", SKILLS, adapters[0].module_names())
        learn_fusion(adapters, PAIRS, FusionOptions(granularity="layer"), skills=SKILLS, model=model,
                     tokenizer=tokenizer, start=start)
    with pytest.raises(ValueError, match="granularity"):
        FusionOptions(granularity="row")
    # skills for another model: every module that does not fit is named
    shapes = {n: (d_out + 1, d_in) for n, (d_out, d_in) in linear_shapes(model).items()}
    shapes["model.layers.0.mlp.nope"] = (4, 4)
    wrong = random_adapter(shapes, r=2, seed=3)
    with pytest.raises(InvalidRequestError, match="do not fit the model") as err:
        FusedModel(model, [wrong], FusionWeights.broadcast("module", ["w"], wrong.module_names()))
    assert "nope: the model has no such module" in str(err.value) and "factors for 33×32" in str(err.value)
