import math

import pytest
import torch

from lsdtool.diffusion import Geometric, LogLinear, make_graph


@pytest.mark.parametrize("noise", [LogLinear(1e-3), Geometric(1e-4, 20.0)])
def test_rate_is_derivative_of_total(noise):
    t = torch.linspace(0.01, 0.99, 17, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(noise.total(t).sum(), t)
    assert torch.allclose(grad, noise.rate(t.detach()), rtol=1e-10)


def test_loglinear_survival_is_linear():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(torch.exp(-LogLinear(1e-3).total(t)), 1 - (1 - 1e-3) * t, atol=1e-14)


def test_geometric_endpoints():
    g = Geometric(1e-4, 20.0)
    assert g.total(torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(1e-4)
    assert g.total(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(20.0)
    assert g.rate(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(20.0 * math.log(2e5))


def test_absorb_transp_transition_and_staggered():
    g = make_graph("absorb", 5)
    x = torch.tensor([4, 2])
    sigma = torch.tensor([0.7, 0.7], dtype=torch.float64)
    tr = g.transp_transition(x, sigma)
    k = math.exp(-0.7)
    assert torch.allclose(tr[0], torch.tensor([1 - k] * 4 + [1.0], dtype=torch.float64))
    assert torch.allclose(tr[1], torch.tensor([0, 0, k, 0, 0], dtype=torch.float64))
    score = torch.rand(2, 5, dtype=torch.float64)
    st = g.staggered_score(score, sigma)
    e = math.exp(0.7)
    assert torch.allclose(st[:, :4], score[:, :4] * e)
    assert torch.allclose(st[:, 4], score[:, 4] * e + (1 - e) * score.sum(-1))


def test_uniform_transition_rows_sum_to_one():
    g = make_graph("uniform", 7)
    x = torch.randint(0, 7, (9,))
    tr = g.transp_transition(x, torch.rand(9, dtype=torch.float64) * 3)
    assert torch.allclose(tr.sum(-1), torch.ones(9, dtype=torch.float64))
    off = tr.scatter(-1, x[:, None], 0.0)
    assert torch.allclose(off.sum(-1), tr.sum(-1) - tr.gather(-1, x[:, None])[:, 0])


def test_reverse_rate_rows_sum_to_zero_and_absorb_unmasked_rows_are_zero():
    for kind in ("absorb", "uniform"):
        g = make_graph(kind, 6)
        x = torch.randint(0, 6, (20,))
        rate = g.reverse_rate(x, torch.rand(20, 6, dtype=torch.float64))
        assert torch.allclose(rate.sum(-1), torch.zeros(20, dtype=torch.float64), atol=1e-12)
        if kind == "absorb":
            assert (rate[x != 5] == 0).all()
