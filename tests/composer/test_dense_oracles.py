"""The dense family against independent oracles: peft's merge_utils (ties, dare, magnitude_prune)
and plain numpy (breadcrumbs, TALL consensus), each followed by the dense truncated SVD."""

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from composer import compose
from composer.dense import module_seed
from tests.helpers import dense_delta, random_adapter

SHAPES = {"model.layers.0.q": (20, 12), "model.layers.1.v": (6, 12)}
RANK = 4


def _inputs(k=3):
    adapters = [random_adapter(SHAPES, r=3, alpha=6, seed=10 + i) for i in range(k)]
    weights = [0.9, -0.4, 0.6, 1.1][:k]
    return adapters, weights


def _taus(adapters, weights, module):
    return [w * dense_delta(a)[module].float() for a, w in zip(adapters, weights)]


def _truncated(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M.double())
    return (U[:, :k] * S[:k]) @ Vh[:k]


def _check(method, params, oracle_fn):
    adapters, weights = _inputs()
    merged, _ = compose(adapters, weights, method=method, params=params, rank=RANK)
    got = dense_delta(merged)
    for module in SHAPES:
        expected = _truncated(oracle_fn(_taus(adapters, weights, module), module), RANK)
        torch.testing.assert_close(got[module], expected, rtol=2e-4, atol=2e-5)


ONES = torch.ones(3)


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.7])
def test_ties_matches_peft(sign, density):
    _check("ties", {"density": density, "majority_sign_method": sign},
           lambda taus, m: merge_utils.ties(taus, ONES, density, sign))


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_magnitude_prune_matches_peft(density):
    _check("magnitude_prune", {"density": density}, lambda taus, m: merge_utils.magnitude_prune(taus, ONES, density))


def _seeded(fn, seed):
    def run(taus, module):
        torch.manual_seed(module_seed(seed, module))  # peft draws its masks from the global generator
        return fn(taus)
    return run


@pytest.mark.parametrize("p", [0.3, 0.6])
def test_dare_linear_matches_peft(p):
    _check("dare_linear", {"p": p, "seed": 7}, _seeded(lambda t: merge_utils.dare_linear(t, ONES, 1 - p), 7))


def test_dare_ties_matches_peft():
    _check("dare_ties", {"p": 0.4, "seed": 3}, _seeded(lambda t: merge_utils.dare_ties(t, ONES, 0.6, "total"), 3))


def test_dare_seed_changes_the_result():
    adapters, weights = _inputs()
    a, _ = compose(adapters, weights, method="dare_linear", params={"seed": 1}, rank=RANK)
    b, _ = compose(adapters, weights, method="dare_linear", params={"seed": 2}, rank=RANK)
    assert a.weights_bytes() != b.weights_bytes()


def test_breadcrumbs_matches_numpy():
    beta, gamma = 0.05, 0.6

    def oracle(taus, module):
        out = np.zeros(taus[0].shape)
        for t in taus:
            x = t.double().numpy()
            flat = np.abs(x).ravel()
            order = np.argsort(-flat, kind="stable")
            n = flat.size
            keep = np.zeros(n, bool)
            keep[order[int(beta * n): n - int(gamma * n)]] = True
            out += x * keep.reshape(x.shape)
        return torch.from_numpy(out)

    _check("breadcrumbs", {"beta": beta, "gamma": gamma}, oracle)


def test_consensus_matches_numpy():
    k, lam = 2, 0.5

    def oracle(taus, module):
        x = np.stack([t.double().numpy() for t in taus])
        total = x.sum(0)
        important = np.abs(x) >= lam * np.abs(total[None] - x)
        return torch.from_numpy(total * (important.sum(0) >= k))

    _check("consensus", {"k": k, "lam": lam}, oracle)


def test_psec_softmax_top_k_is_an_exact_weighted_sum():
    adapters, weights = _inputs()
    merged, report = compose(adapters, weights, method="psec", params={"temperature": 0.5, "top_k": 2})
    alpha = torch.softmax(torch.tensor(weights, dtype=torch.float64) / 0.5, 0)
    top = alpha.topk(2).indices
    alpha = torch.where(torch.isin(torch.arange(3), top), alpha, torch.zeros_like(alpha))
    alpha = alpha / alpha.sum()
    assert report.weights == pytest.approx(alpha.tolist())
    got = dense_delta(merged)
    for module in SHAPES:
        expected = sum(float(a) * dense_delta(ad)[module] for a, ad in zip(alpha, adapters))
        torch.testing.assert_close(got[module], expected, rtol=1e-5, atol=1e-6)


def test_varm_and_lines_helpers():
    adapters, weights = _inputs(2)
    merged, _ = compose(adapters, weights, method="linear", weighting="varm", lines=(0.5, 1.0))
    got = dense_delta(merged)
    for module in SHAPES:
        deltas = [dense_delta(a)[module] for a in adapters]
        norms = [float((d**2).sum()) for d in deltas]
        ws = [w * n / sum(norms) for w, n in zip(weights, norms)]
        layer = int(module.split(".")[2])
        lam = 0.5 + 1.0 * layer / (2 - 1)  # L = 2 layers here
        expected = lam * sum(w * d for w, d in zip(ws, deltas))
        torch.testing.assert_close(got[module], expected, rtol=1e-5, atol=1e-6)


def _pcb_oracle(taus, module, ratio):
    """PCB-merging from its definition (ALGORITHMS.md), in numpy float64: per task, intra balance
    softmax(N·norm(τ_i²)) times inter balance Σ_j softmax(N·norm(τ_i τ_j)) over the task's entries; keep each
    task's top ratio of balances; average the τ_i weighted by the kept balances."""
    T = np.stack([t.double().numpy().ravel() for t in taus])
    n = T.shape[0]

    def norm(x):
        return (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else np.zeros_like(x)

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    beta = np.zeros_like(T)
    for i in range(n):
        intra = softmax(n * norm(T[i] * T[i]))
        inter = np.zeros(T.shape[1])
        for j in range(n):
            inter += softmax(n * norm(T[i] * T[j]))
        b = intra * inter
        k = int(ratio * b.size)
        threshold = np.sort(b)[::-1][k - 1] if k > 0 else np.inf
        beta[i] = np.where(b >= threshold, b, 0.0)
    total = beta.sum(0)
    merged = np.where(total > 0, (beta * T).sum(0) / np.where(total > 0, total, 1), 0.0)
    return torch.from_numpy(merged.reshape(taus[0].shape))


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_pcb_matches_its_definition(ratio):
    _check("pcb", {"ratio": ratio}, lambda taus, m: _pcb_oracle(taus, m, ratio))


def test_layer_swap_takes_each_layer_from_one_skill():
    """Layer 0 from the first skill, layer 1 (inside [1, 2)) from the second: each module's ΔW is exactly that
    skill's weighted ΔW; a module the designated skill lacks gets no update."""
    a = random_adapter(SHAPES, r=3, alpha=6, seed=1)
    b = random_adapter({"model.layers.1.v": SHAPES["model.layers.1.v"], "model.layers.0.q": SHAPES["model.layers.0.q"]},
                       r=2, alpha=4, seed=2)
    merged, _ = compose([a, b], [0.8, -1.2], method="layer_swap", params={"start": 1, "end": 2})
    got, da, db = dense_delta(merged), dense_delta(a), dense_delta(b)
    torch.testing.assert_close(got["model.layers.0.q"], 0.8 * da["model.layers.0.q"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["model.layers.1.v"], -1.2 * db["model.layers.1.v"], rtol=1e-5, atol=1e-7)
    swapped_all, _ = compose([a, b], [1.0, 1.0], method="layer_swap", params={"start": 0, "end": 2})
    got = dense_delta(swapped_all)
    torch.testing.assert_close(got["model.layers.0.q"], db["model.layers.0.q"], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="at most 2 skills"):
        compose([a, b, a], [1.0, 1.0, 1.0], method="layer_swap")
    with pytest.raises(ValueError, match="start <= end"):
        compose([a, b], [1.0, 1.0], method="layer_swap", params={"start": 3, "end": 1})
