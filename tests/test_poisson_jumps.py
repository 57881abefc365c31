"""The Poisson-jumps kernel of tau-leaping on ordinal data: its draws and its exact transition likelihood."""

import itertools
import math

import pytest
import torch

from lsdtool import rng
from lsdtool.kernels import PoissonJumps, compound_poisson_log_prob, poisson_counts


def test_poisson_counts_follow_the_poisson_law():
    n = 20000
    lam = torch.tensor([0.0, 0.05, 0.7, 3.0, 12.0, 80.0], dtype=torch.float64)
    u = rng.uniforms(3, rng.STREAM_JUMPS, torch.arange(n), 0, lam.numel())
    counts = poisson_counts(lam.expand(n, -1), u)
    assert (counts[:, 0] == 0).all()
    mean, var = counts.double().mean(0), counts.double().var(0)
    se = (lam / n).sqrt()
    assert ((mean - lam).abs() <= 5 * se + 1e-9).all()
    assert torch.allclose(var[1:], lam[1:], rtol=0.08)
    for j in (1, 2, 3):  # the exact pmf at small counts
        for k in range(4):
            p = math.exp(-lam[j]) * lam[j] ** k / math.factorial(k)
            freq = float((counts[:, j] == k).double().mean())
            assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-4


def brute_force(lam: torch.Tensor, x: int, y: int, s: int, max_jumps: int = 9) -> float:
    """P(clamp(x + sum n_z (z - x)) = y) by summing the product of Poisson pmfs over all count vectors."""
    total = 0.0
    for counts in itertools.product(range(max_jumps), repeat=s):
        end = min(max(x + sum(c * (z - x) for z, c in enumerate(counts)), 0), s - 1)
        if end != y:
            continue
        p = 1.0
        for z, c in enumerate(counts):
            p *= math.exp(-lam[z]) * lam[z] ** c / math.factorial(c)
        total += p
    return total


@pytest.mark.parametrize("x", [0, 2, 4])
def test_the_likelihood_is_the_compound_poisson_law_with_clamped_ends(x):
    s = 5
    g = torch.Generator().manual_seed(x)
    lam = (torch.rand(s, generator=g, dtype=torch.float64) * 0.6).scatter(0, torch.tensor([x]), 0.0)
    ys = torch.arange(s)
    got = compound_poisson_log_prob(lam.expand(s, -1), torch.full((s,), x), ys).exp()
    want = torch.tensor([brute_force(lam.tolist(), x, int(y), s) for y in ys], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-9)


def test_draws_follow_the_likelihood_and_phi_scales_the_rates():
    s, n = 7, 40000
    lam = torch.tensor([0.2, 0.0, 0.1, 0.0, 0.5, 0.3, 0.05], dtype=torch.float64)
    x = torch.full((n,), 3)
    kernel = PoissonJumps(lambda graph, noise, ls, xx, c: c * lam.expand(xx.shape[0], -1).scatter(-1, xx[:, None], 0.0), (1.0,))
    u = rng.uniforms_at(1, rng.STREAM_JUMPS, torch.arange(n)[:, None], 0, torch.arange(s)[None, :])
    out = kernel.draw(kernel.intensity(None, None, None, x), x, u)
    freq = torch.bincount(out, minlength=s).double() / n
    law = kernel.log_prob(None, None, None, x[:s], torch.arange(s)).exp()
    assert torch.allclose(freq, law, atol=5 * (0.25 / n) ** 0.5)
    # the likelihood is differentiable in the coefficient that scales every rate
    phi = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    scaled = PoissonJumps(kernel.fn, (phi,))
    ll = scaled.log_prob(None, None, None, x[:s], torch.arange(s)).sum()
    ll.backward()
    assert phi.grad is not None and torch.isfinite(phi.grad)
