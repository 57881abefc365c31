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
    normal = torch.round(80.0 + math.sqrt(80.0) * torch.special.ndtri(u[:, 5].clamp(1e-300, 1 - 1e-16))).clamp_min(0)
    assert torch.equal(counts[:, 5], normal.long())  # a mean above 50: the normal approximation's count
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


def test_the_likelihood_gradient_is_exact_and_large_rates_use_the_normal_law():
    s = 6
    g = torch.Generator().manual_seed(9)
    lam = (torch.rand(4, s, generator=g, dtype=torch.float64) * 0.8)
    x = torch.tensor([0, 2, 5, 3])
    lam = lam.scatter(-1, x[:, None], 0.0).requires_grad_()
    y = torch.tensor([1, 0, 5, 3])
    compound_poisson_log_prob(lam, x, y).sum().backward()
    fd = torch.zeros_like(lam)
    for i in range(4):
        for z in range(s):
            if z == x[i]:
                continue
            d = torch.zeros_like(lam)
            d[i, z] = 1e-6
            up = compound_poisson_log_prob((lam + d).detach(), x, y)[i]
            down = compound_poisson_log_prob((lam - d).detach(), x, y)[i]
            fd[i, z] = (up - down) / 2e-6
    assert torch.allclose(lam.grad, fd, rtol=1e-5, atol=1e-7)
    big = torch.full((1, 64), 2.0, dtype=torch.float64).scatter(-1, torch.tensor([[30]]), 0.0)  # total 126 > 50
    law = compound_poisson_log_prob(big.expand(64, -1), torch.full((64,), 30), torch.arange(64)).exp()
    assert law.sum().item() == pytest.approx(1.0, abs=1e-9) and law[0] > 0.05 and law[63] > 0.05  # clamped ends


def reference_counts(lam: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """poisson_counts as first written: P(0) = e^{-lam} at every entry, the normal approximation everywhere."""
    big = lam > 50
    n = torch.zeros_like(lam, dtype=torch.long)
    p0 = torch.exp(-torch.where(big, 0.0, lam))
    for i, j in ((u >= p0) & ~big & (lam > 0)).nonzero().tolist():
        rate, goal, p, k = float(lam[i, j]), float(u[i, j]), float(p0[i, j]), 0
        cdf = p
        while True:
            k += 1
            p = p * rate / k
            cdf = cdf + p
            n[i, j] += 1
            if not (goal >= cdf and (p > cdf * 1e-17 or k < rate)):
                break
    normal = torch.round(lam + lam.sqrt() * torch.special.ndtri(u.clamp(1e-300, 1 - 1e-16))).clamp_min(0).long()
    return torch.where(big, normal, n)


def test_poisson_counts_equal_the_full_computation_at_every_entry():
    """Screening out the entries whose uniform lies below 1 - lam, and the normal law only where a mean is above
    50, leave every count as the full computation draws it, including uniforms within an ulp of e^{-lam}."""
    g = torch.Generator().manual_seed(4)
    lam = torch.cat([torch.rand(200, 32, generator=g, dtype=torch.float64) * 0.003,
                     10 ** -(6 + 11 * torch.rand(200, 32, generator=g, dtype=torch.float64)),  # 1 - lam and e^{-lam} a few ulps apart
                     torch.rand(100, 32, generator=g, dtype=torch.float64) ** 6 * 120,
                     torch.tensor([0.0, 1e-300, 1e-17, 1e-16, 5e-16, 50.0, 50.000001, 3e3]).expand(4, -1).reshape(1, 32)])
    u = torch.rand(lam.shape, generator=g, dtype=torch.float64)
    p0 = torch.exp(-lam[:400])
    u[:400:4] = p0[::4]  # exactly on the boundary, and one float64 step either side
    u[1:400:4] = torch.nextafter(p0[1::4], torch.zeros(()))
    u[2:400:4] = torch.nextafter(p0[2::4], torch.ones(())).clamp_max(1 - 2**-53)
    assert torch.equal(poisson_counts(lam, u), reference_counts(lam, u))
