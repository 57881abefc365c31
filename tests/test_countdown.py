import itertools

import pytest
import torch

from lsdtool.metrics import countdown_error_reference, countdown_errors
from lsdtool.models.countdown import ChainPosterior, generate, posterior_recursive, transition_matrix
from lsdtool.samplers import Sampler, sample


def brute_force_posterior(x, n_values, leak):
    """Marginals p(x0_i | observed) by enumerating every sequence of the chain."""
    trans = transition_matrix(leak, n_values)
    l = len(x)
    post = torch.zeros(l, n_values, dtype=torch.float64)
    for seq in itertools.product(range(n_values), repeat=l):
        if any(o < n_values and o != v for o, v in zip(x, seq)):
            continue
        p = 1.0 / n_values
        for a, b in zip(seq, seq[1:]):
            p *= trans[a, b].item()
        for i, v in enumerate(seq):
            post[i, v] += p
    return post / post.sum(-1, keepdim=True)


@pytest.mark.parametrize("x", [[4, 4, 4, 4, 4, 4], [4, 2, 4, 4, 0, 4], [3, 4, 4, 1, 4, 4], [4, 1, 3, 4, 4, 2], [0, 0, 4, 4, 4, 3]])
def test_posterior_equals_brute_force_on_a_short_chain(x):
    n, leak = 4, 1e-3
    expect = brute_force_posterior(x, n, leak)
    xt = torch.tensor([x])
    assert torch.allclose(posterior_recursive(xt, leak, n)[0], expect, atol=1e-12)
    assert torch.allclose(ChainPosterior(6, leak, n)(xt)[0], expect, atol=1e-12)


def test_vectorised_posterior_equals_recursion_at_full_size():
    g = torch.Generator().manual_seed(0)
    data = generate(8, generator=g)
    x = torch.where(torch.rand(8, 256, generator=g) < 0.7, 32, data)
    x[0, 5] = 7  # an impossible neighbour: the leak must keep it a valid distribution
    fast, slow = ChainPosterior()(x), posterior_recursive(x)
    assert torch.isfinite(fast).all() and torch.allclose(fast, slow, atol=1e-12)


def test_generated_data_is_countdown_and_scores_zero():
    x = generate(50, generator=torch.Generator().manual_seed(1))
    assert x.shape == (50, 256) and x.min() >= 0 and x.max() <= 31
    assert countdown_errors(x) == {"error": 0.0, "break_rate": 0.0, "valid": 1.0}
    assert (x[:, 1:][x[:, :-1] != 0] == x[:, :-1][x[:, :-1] != 0] - 1).all()


def test_metric_on_hand_made_sequences():
    assert countdown_errors(torch.tensor([[3, 2, 1, 0, 5, 4]])) == {"error": 0.0, "break_rate": 0.0, "valid": 1.0}
    # 3->5 wrong (prev resets to 0), 5->9 forgiven, 9->2 wrong, 2->7 forgiven, 7->6 fine.
    y = torch.tensor([[3, 5, 9, 2, 7, 6], [3, 2, 1, 0, 5, 4]])
    got = countdown_errors(y)
    assert got["error"] == pytest.approx((2 / 6 + 0) / 2)
    assert got["break_rate"] == pytest.approx((4 / 5 + 0) / 2)
    assert got["valid"] == pytest.approx(0.5)
    assert countdown_error_reference(y) == pytest.approx(got["error"])


def test_vectorised_metric_equals_reference_loop():
    g = torch.Generator().manual_seed(2)
    x = torch.where(torch.rand(64, 256, generator=g) < 0.1, torch.randint(0, 32, (64, 256), generator=g), generate(64, generator=g))
    assert countdown_errors(x)["error"] == pytest.approx(countdown_error_reference(x), abs=1e-12)
    r = torch.randint(0, 32, (64, 256), generator=g)
    assert countdown_errors(r)["error"] == pytest.approx(countdown_error_reference(r), abs=1e-12)
    assert 0.44 < countdown_errors(r)["error"] < 0.51


def test_log_score_is_differentiable_in_t(countdown):
    x = torch.full((2, 256), 32)
    t = torch.tensor([0.5, 0.9], dtype=torch.float64, requires_grad=True)
    ls = countdown.log_score(x, t)
    (g,) = torch.autograd.grad(ls[:, 3, 5].sum(), t)
    sig = countdown.noise.total(t.detach())
    expect = -countdown.noise.rate(t.detach()) * torch.exp(sig) / torch.expm1(sig)
    assert torch.allclose(g, expect)


def test_euler_error_rates_on_the_exact_model(countdown):
    idx = torch.arange(512)
    e8 = countdown_errors(sample(countdown, Sampler.plain(8), idx, seed=0))["error"]
    assert 0.06 <= e8 <= 0.11
    e128 = countdown_errors(sample(countdown, Sampler.plain(128), idx[:256], seed=0))["error"]
    assert e128 * 4 <= e8
