"""The count and theta-trapezoidal step rules, the power grid and NFE counting."""

import math

import pytest
import torch

from lsdtool.diffusion import Geometric, LogLinear, Noise
from lsdtool.diffusion.graphs import make_graph
from lsdtool.samplers import (
    Sampler, count_schedule, iterate, power_grid, sample, step_rows, tau_leap_probs, tau_leap_rows, trapezoidal_alphas,
    trapezoidal_rows, uniform_grid,
)


class ToyModel:
    """A fixed random log score as a function of (x, t), counting its calls."""

    def __init__(self, graph="absorb", vocab=7, length=23, noise=None, seed=0):
        self.name, self.graph, self.vocab_size, self.seq_len = "toy", graph, vocab, length
        self.noise = noise or LogLinear(1e-3)
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, length, vocab, generator=g, dtype=torch.float64)
        self.calls = 0

    def log_score(self, x, t):
        self.calls += 1
        ls = 0.7 * self.table[x, torch.arange(self.seq_len)] - 1.0 + 0.1 * t[:, None, None].double()
        return ls.scatter(-1, x[..., None], 0.0)


class LinearRate(Noise):
    """sigma'(t) = a + b t (so a rate exactly linear in time)."""

    name = "linear-rate"

    def __init__(self, a=0.5, b=2.0):
        self.a, self.b = a, b

    def total(self, t):
        return self.a * t + 0.5 * self.b * t**2

    def rate(self, t):
        return self.a + self.b * t


def rows_case(graph, r=40, v=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ls = torch.randn(r, v, generator=g, dtype=torch.float64) - 1.0
    if graph == "absorb":
        x = torch.where(torch.rand(r, generator=g) < 0.7, v - 1, torch.randint(0, v - 1, (r,), generator=g))
    else:
        x = torch.randint(0, v, (r,), generator=g)
    ls = ls.scatter(-1, x[:, None], 0.0)
    return make_graph(graph, v), ls, x


# ---- count --------------------------------------------------------------------------------------

def test_count_rows_are_the_model_distribution_without_mask():
    graph, ls, x = rows_case("absorb")
    p = step_rows(graph, LogLinear(1e-3), ls, x, 0.5, 0.4, base="count", coeff=1.7)
    masked = x == graph.vocab_size - 1
    assert p.shape == (x.shape[0], graph.vocab_size - 1) and (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones_like(p[:, 0]))
    expect = ls[masked, :-1].exp()
    assert torch.allclose(p[masked], expect / expect.sum(-1, keepdim=True))  # score-mode Phi cancels
    assert torch.equal(p[~masked].argmax(-1), x[~masked]) and (p[~masked].max(-1).values == 1).all()
    hot = step_rows(graph, LogLinear(1e-3), ls, x, 0.5, 0.4, base="count", coeff=2.0, mode="temperature")
    assert torch.allclose(hot[masked], (2 * ls[masked, :-1]).softmax(-1))


def test_count_schedule_adds_up_with_cumulative_rounding():
    noise = LogLinear(1e-3)
    ts = uniform_grid(7)
    left = count_schedule(noise, ts, torch.tensor([256, 100, 3, 0]))
    assert left[:, 0].tolist() == [256, 100, 3, 0] and (left[:, -1] == 0).all()
    assert (left[:, 1:] <= left[:, :-1]).all()
    alpha = -torch.expm1(-noise.total(ts))
    frac = (alpha - alpha[-1]) / (alpha[0] - alpha[-1])
    assert left[0, 1:-1].tolist() == torch.round(256 * frac[1:-1]).long().tolist()
    n_k = left[0, :-1] - left[0, 1:]
    assert n_k.sum() == 256 and n_k.min() >= 0


def test_count_unmasks_exactly_n_k_per_step_and_fills_everything():
    model = ToyModel(length=37)
    sampler = Sampler.plain(6, base="count")
    index = torch.arange(5)
    left = count_schedule(model.noise, sampler.timesteps, torch.full((5,), 37))
    seen = 0
    for step in iterate(model, sampler, index, seed=3):
        before = (step.x == model.vocab_size - 1).sum(-1)
        after = (step.x_next == model.vocab_size - 1).sum(-1)
        assert torch.equal(before - after, left[:, step.k] - left[:, step.k + 1])
        assert ((step.x != model.vocab_size - 1) <= (step.x_next == step.x)).all()  # unmasked tokens stay
        seen += 1
    assert seen == sampler.nfe == 6 and (step.x_next < model.vocab_size - 1).all()


def test_count_is_batch_independent_and_respects_fixed_positions():
    model = ToyModel(length=30)
    sampler = Sampler.plain(5, base="count")
    full = sample(model, sampler, torch.arange(6), seed=11)
    halves = torch.cat([sample(model, sampler, torch.arange(0, 3), 11), sample(model, sampler, torch.arange(3, 6), 11)])
    assert torch.equal(full, halves)
    assert not torch.equal(full, sample(model, sampler, torch.arange(6), seed=12))
    x0 = torch.full((2, 30), model.vocab_size - 1)
    x0[:, :4] = torch.tensor([1, 2, 3, 4])
    fixed = torch.zeros(2, 30, dtype=torch.bool)
    fixed[:, :4] = True
    out = sample(model, sampler, torch.arange(2), 0, x_init=x0, fixed=fixed)
    assert torch.equal(out[:, :4], x0[:, :4]) and (out < model.vocab_size - 1).all()


def test_count_needs_an_absorbing_model():
    with pytest.raises(ValueError, match="absorbing"):
        sample(ToyModel("uniform"), Sampler.plain(3, base="count"), torch.arange(2), 0)


# ---- theta-trapezoidal --------------------------------------------------------------------------

def test_trapezoidal_alphas():
    assert trapezoidal_alphas(0.5) == (2.0, 1.0)
    for theta in (0.2, 0.5, 0.7):
        a1, a2 = trapezoidal_alphas(theta)
        assert a1 - a2 == pytest.approx(1.0)
    with pytest.raises(ValueError):
        trapezoidal_alphas(1.0)


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("mode", ["score", "temperature"])
@pytest.mark.parametrize("final", [False, True])
def test_trapezoidal_rows_are_distributions(graph_name, mode, final):
    graph, ls, x = rows_case(graph_name, seed=1)
    _, ls0, x0 = rows_case(graph_name, seed=2)
    if graph_name == "absorb":
        x0 = torch.where(x == graph.vocab_size - 1, x, x0)  # masks only shrink along a path
    p = trapezoidal_rows(graph, LogLinear(1e-3), ls, x, ls0, x0, 0.8, 0.6, 0.4, coeff=1.3, mode=mode, final=final)
    width = graph.vocab_size - (1 if final and graph.absorbing else 0)
    assert p.shape == (x.shape[0], width) and (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones_like(p[:, 0]))
    if graph_name == "absorb":
        stay = x != graph.vocab_size - 1
        assert torch.equal(p[stay].argmax(-1), x[stay]) and (p[stay].max(-1).values == 1).all()
    # the rule's Poisson step: jump to y in proportion to (1 - theta)(t - s)(a1 R(x*, rho) - a2 R(x0, t))_+
    a1, a2 = trapezoidal_alphas(0.5)
    noise = LogLinear(1e-3)

    def rate(l, xx, tt):
        score = torch.exp(l.double()) * 1.3 if mode == "score" else torch.exp(1.3 * l.double())
        r = graph.transp_rate(xx) * score.scatter(-1, xx[:, None], 1.0) * noise.rate(torch.tensor(tt, dtype=torch.float64))
        return r.scatter(-1, xx[:, None], 0.0)

    lam = (0.5 * 0.4) * (a1 * rate(ls, x, 0.6) - a2 * rate(ls0, x0, 0.8)).clamp_min(0.0).scatter(-1, x[:, None], 0.0)
    moving = lam.sum(-1) > 0
    if final and graph.absorbing:
        return
    jump = p.scatter(-1, x[:, None], 0.0)[moving]
    want = lam[moving] * (-torch.expm1(-lam[moving].sum(-1, keepdim=True)) / lam[moving].sum(-1, keepdim=True))
    assert torch.allclose(jump, want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(p[moving].gather(-1, x[moving, None]).squeeze(-1), torch.exp(-lam[moving].sum(-1)), rtol=1e-9)


class ConstantRate(Noise):
    name = "constant"

    def total(self, t):
        return 1.5 * t

    def rate(self, t):
        return torch.full_like(torch.as_tensor(t, dtype=torch.float64), 1.5)


def test_tau_leap_probs_are_poisson_steps():
    graph = make_graph("absorb", 4)
    x = torch.tensor([3, 3, 1])
    lam = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    p = tau_leap_probs(graph, lam, x)
    assert p[0, 3] == pytest.approx(math.exp(-0.6)) and torch.allclose(p[0, :3], (1 - math.exp(-0.6)) * lam[0, :3] / 0.6)
    assert p[1].tolist() == [0, 0, 0, 1] and p[2].tolist() == [0, 1, 0, 0]
    fin = tau_leap_probs(graph, lam, x, final=True)
    assert torch.allclose(fin[0], lam[0, :3] / 0.6) and fin[2].tolist() == [0, 1, 0]


def _intensity(p, x):
    """Recover Poisson intensities from tau-leaping probabilities."""
    stay = p.gather(-1, x[:, None])
    total = -stay.log()
    return (p * total / (1 - stay)).scatter(-1, x[:, None], 0.0)


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_trapezoidal_with_unchanged_rates_is_a_tau_leap_over_the_second_stage(graph_name):
    graph, ls, x = rows_case(graph_name, seed=3)
    noise = ConstantRate()
    t, s, theta = 0.9, 0.7, 0.5
    rho = t - theta * (t - s)
    p = trapezoidal_rows(graph, noise, ls, x, ls, x, t, rho, s, theta=theta)
    e = tau_leap_rows(graph, noise, ls, x, rho, s)  # (alpha_1 - alpha_2) R = R over (1 - theta) dt
    assert torch.allclose(p, e, atol=1e-12)


@pytest.mark.parametrize("theta", [0.5, 0.3])
def test_trapezoidal_integrates_a_linear_rate_exactly(theta):
    graph, ls, x = rows_case("absorb", seed=4)
    noise = LinearRate(0.5, 2.0)
    t, s = 0.6, 0.45
    rho = t - theta * (t - s)
    masked = x == graph.vocab_size - 1
    stage1 = _intensity(tau_leap_rows(graph, noise, ls, x, t, rho), x)[masked, :-1]
    stage2 = _intensity(trapezoidal_rows(graph, noise, ls, x, ls, x, t, rho, s, theta=theta), x)[masked, :-1]
    integral = noise.total(torch.tensor(t, dtype=torch.float64)) - noise.total(torch.tensor(s, dtype=torch.float64))
    exact = integral * ls[masked, :-1].exp()  # the exact integrated intensity over [s, t]
    assert torch.allclose(stage1 + stage2, exact, rtol=1e-9)
    held = _intensity(tau_leap_rows(graph, noise, ls, x, t, s), x)[masked, :-1]
    assert (held - exact).abs().max() > 1e-3  # holding the rate of t misses it


def _final_tv(steps_rule, nfe):
    """TV distance between the exact data distribution and a one-position uniform-graph sampler's output
    (factorised data, so the exact score is known), propagated exactly over the V states."""
    v = 6
    pi = torch.rand(v, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 3
    pi = pi / pi.sum()
    graph, noise = make_graph("uniform", v), Geometric(1e-2, 1.5)
    xs = torch.arange(v)

    def marg(t):
        a = torch.exp(-noise.total(torch.tensor(t, dtype=torch.float64)))
        return a * pi + (1 - a) / v

    def ls(t):
        lp = marg(t).log()
        return lp[None, :] - lp[:, None]

    trap = steps_rule == "trap"
    ts = uniform_grid(nfe // 2 if trap else nfe).tolist()
    m = marg(ts[0])
    for t, s in zip(ts[:-1], ts[1:]):
        if not trap:
            m = m @ step_rows(graph, noise, ls(t), xs, t, s)
            continue
        rho = t - 0.5 * (t - s)
        stage1 = tau_leap_rows(graph, noise, ls(t), xs, t, rho)
        m = sum(m[a] * (stage1[a] @ trapezoidal_rows(graph, noise, ls(rho), xs, ls(t)[a].expand(v, v),
                                                      torch.full((v,), a), t, rho, s)) for a in range(v))
    return 0.5 * (m - marg(ts[-1])).abs().sum().item()


def test_trapezoidal_is_second_order_where_euler_is_first():
    euler = [_final_tv("euler", k) for k in (16, 64)]
    trap = [_final_tv("trap", k) for k in (16, 64)]
    assert 3 < euler[0] / euler[1] < 5  # first order: 4x fewer errors for 4x the NFE
    assert trap[0] / trap[1] > 8  # second order (16x in the limit)
    assert trap[1] < euler[1] / 5


def test_trapezoidal_counts_two_calls_per_step_and_is_batch_independent():
    model = ToyModel(length=15)
    sampler = Sampler.plain(3, base="theta-trapezoidal")
    assert sampler.nfe == 6 and Sampler.plain(3, base="theta-trapezoidal", denoise=True).nfe == 7
    steps = list(iterate(model, sampler, torch.arange(4), seed=5))
    assert model.calls == 6 == len(steps)
    assert [(st.k, st.stage) for st in steps] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    ts = sampler.timesteps
    assert float(steps[0].s) == pytest.approx(float(ts[0] - 0.5 * (ts[0] - ts[1])))
    assert float(steps[1].t) == float(steps[0].s) and float(steps[1].s) == float(ts[1])
    assert [st.final for st in steps] == [False] * 5 + [True]
    assert (steps[-1].x_next < model.vocab_size - 1).all()
    full = sample(model, sampler, torch.arange(4), seed=5)
    halves = torch.cat([sample(model, sampler, torch.arange(2), 5), sample(model, sampler, torch.arange(2, 4), 5)])
    assert torch.equal(full, halves) and torch.equal(full, steps[-1].x_next)


@pytest.mark.parametrize("base,calls", [("euler", 1), ("tweedie", 1), ("count", 1), ("theta-trapezoidal", 2)])
@pytest.mark.parametrize("denoise", [False, True])
def test_nfe_counts_every_model_call(base, calls, denoise):
    model = ToyModel(length=12)
    sampler = Sampler.plain(4, base=base, denoise=denoise)
    sample(model, sampler, torch.arange(3), seed=0)
    assert model.calls == sampler.nfe == 4 * calls + int(denoise)


class Factorised:
    """The exact concrete score of data whose positions are independent with marginals ``p0`` (L, N):
    uniform graph s_y = p_t(y) / p_t(x), p_t = e^{-sigma} p0 + (1 - e^{-sigma}) / N; absorb, at a mask,
    s_y = p0(y) / (e^sigma - 1)."""

    def __init__(self, graph, p0):
        self.name, self.graph, self.p0 = "factorised", graph, p0
        self.seq_len, n = p0.shape
        self.vocab_size = n + (graph == "absorb")
        self.noise = Geometric(1e-3, 8.0) if graph == "uniform" else LogLinear(1e-3)

    def log_score(self, x, t):
        sigma = self.noise.total(t.double())[:, None, None]
        pos = torch.arange(self.seq_len)
        if self.graph == "uniform":
            pt = torch.exp(-sigma) * self.p0 + -torch.expm1(-sigma) / self.p0.shape[1]  # (B, L, N)
            return (pt.log() - pt.gather(-1, x[..., None]).log()).float()
        ls = self.p0.log().expand(x.shape[0], -1, -1) - torch.log(torch.expm1(sigma))
        ls = torch.cat([ls, torch.zeros_like(ls[..., :1])], -1)
        return ls.float().scatter(-1, x[..., None], 0.0)


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("base", ["euler", "tweedie", "theta-trapezoidal"])
def test_many_steps_on_an_exact_score_draw_the_data_marginals(graph_name, base):
    """With the exact score of independent positions, a fine grid samples the data distribution: the empirical
    marginals of 3000 samples lie within 4.5 standard errors of p0 at every position and token."""
    g = torch.Generator().manual_seed(3)
    p0 = torch.softmax(1.5 * torch.randn(5, 6, generator=g, dtype=torch.float64), -1)
    model, n = Factorised(graph_name, p0), 3000
    out = sample(model, Sampler.plain(64, base=base), torch.arange(n), seed=4)
    assert (out < p0.shape[1]).all()  # absorb: every mask filled
    freq = torch.nn.functional.one_hot(out, p0.shape[1]).double().mean(0)
    se = (p0 * (1 - p0) / n).sqrt()
    assert ((freq - p0).abs() <= 4.5 * se + 2e-3).all(), (freq - p0).abs().max()


# ---- grids --------------------------------------------------------------------------------------

def test_power_grid():
    assert torch.allclose(power_grid(8, 1.0), uniform_grid(8))
    g = power_grid(8, 2.0)
    assert g[0] == 1.0 and g[-1] == pytest.approx(1e-5) and (g[1:] < g[:-1]).all()
    steps = g[:-1] - g[1:]
    assert (steps[1:] < steps[:-1]).all()  # rho > 1: big steps first
    Sampler(g, torch.ones(8, dtype=torch.float64)).check()
    with pytest.raises(ValueError):
        power_grid(4, 0.0)


def test_even_schedule_splits_as_llada_does():
    from lsdtool.samplers import even_schedule

    left = even_schedule(torch.tensor([10, 3, 0]), 4)
    assert left[0].tolist() == [10, 7, 4, 2, 0]  # [3, 3, 2, 2], not the noise-driven [2, 3, 2, 3]
    assert left[1].tolist() == [3, 2, 1, 0, 0] and left[2].tolist() == [0] * 5


@pytest.mark.parametrize("base", ["count", "confidence"])
def test_even_counts_commit_the_even_split_per_step(base):
    model = ToyModel(length=10)
    sampler = Sampler.plain(4, base=base, options={"counts": "even"})
    sampler.check()
    with torch.no_grad():
        steps = list(iterate(model, sampler, torch.arange(3), seed=1))
    mask = model.vocab_size - 1
    done = [int(((st.x == mask) & (st.x_next != mask)).sum(-1).unique()) for st in steps]
    assert done == [3, 3, 2, 2]
