import pytest
import torch

from lsdtool.diffusion import Geometric, LogLinear
from lsdtool.samplers import Sampler, denoise_probs, draw, iterate, sample, transition_probs, uniform_grid


class RandomModel:
    """A model whose log score is a fixed random function of (x, t): enough to test the engine."""

    def __init__(self, graph="absorb", vocab=7, length=10, noise=None, seed=0):
        self.graph, self.vocab_size, self.seq_len = graph, vocab, length
        self.noise = noise or LogLinear(1e-3)
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, length, vocab, generator=g, dtype=torch.float64)

    def log_score(self, x, t):
        ls = 0.7 * self.table[x, torch.arange(self.seq_len)] - 2.5 + 0.1 * t[:, None, None].double()
        return ls.scatter(-1, x[..., None], 0.0)


def random_case(graph, b=4, l=10, v=7, seed=0):
    model = RandomModel(graph, v, l, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if graph == "absorb":
        x = torch.where(torch.rand(b, l, generator=g) < 0.6, v - 1, torch.randint(0, v - 1, (b, l), generator=g))
    else:
        x = torch.randint(0, v, (b, l), generator=g)
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.9 + 0.1
    s = t * (0.75 + 0.2 * torch.rand(b, generator=g, dtype=torch.float64))
    return model, x, model.log_score(x, t), t, s


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("base", ["euler", "tweedie"])
@pytest.mark.parametrize("mode", ["score", "temperature"])
def test_rows_are_distributions(graph, base, mode):
    model, x, ls, t, s = random_case(graph)
    p = transition_probs(model, ls, x, t, s, base=base, coeff=torch.rand(4, dtype=torch.float64) + 0.5, mode=mode)
    assert p.dtype == torch.float64 and p.shape == ls.shape
    assert (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(4, 10, dtype=torch.float64))


@pytest.mark.parametrize("base", ["euler", "tweedie"])
def test_absorb_unmasked_rows_stay(base):
    model, x, ls, t, s = random_case("absorb")
    p = transition_probs(model, ls, x, t, s, base=base)
    unmasked = x != model.vocab_size - 1
    assert torch.equal(p[unmasked], torch.nn.functional.one_hot(x[unmasked], model.vocab_size).double())


@pytest.mark.parametrize("coeff", [1.0, 0.5, 1.7])
@pytest.mark.parametrize("mode", ["score", "temperature"])
def test_euler_equals_tweedie_for_absorb_loglinear(coeff, mode):
    model, x, ls, t, s = random_case("absorb", seed=3)
    e = transition_probs(model, ls, x, t, s, base="euler", coeff=coeff, mode=mode)
    w = transition_probs(model, ls, x, t, s, base="tweedie", coeff=coeff, mode=mode)
    assert torch.allclose(e, w, atol=1e-12)
    assert not torch.allclose(e, transition_probs(model, ls, x, t, (t + s) / 2, base="euler", coeff=coeff, mode=mode))


def test_euler_and_tweedie_differ_for_geometric_noise():
    model, x, ls, t, s = random_case("absorb", seed=4)
    model.noise = Geometric(1e-4, 20.0)
    e = transition_probs(model, ls, x, t, s, base="euler")
    w = transition_probs(model, ls, x, t, s, base="tweedie")
    assert (e - w).abs().max() > 1e-3


def test_euler_matches_hand_formula_on_a_masked_row():
    model, x, ls, t, s = random_case("absorb", seed=5)
    x[0, 0] = model.vocab_size - 1
    ls = model.log_score(x, t)
    p = transition_probs(model, ls, x, t, s, base="euler", coeff=0.8)
    c = (t[0] - s[0]) * model.noise.rate(t[0]) * 0.8
    raw = c * ls[0, 0, :-1].exp()
    expect = torch.cat([raw, (1 - raw.sum())[None]]).clamp_min(0)
    assert torch.allclose(p[0, 0], expect / expect.sum(), atol=1e-12)


def test_score_mode_coefficient_is_a_step_size_multiplier_for_euler():
    model, x, ls, t, s = random_case("absorb", seed=6)
    a = transition_probs(model, ls, x, t, s, base="euler", coeff=0.5)
    b = transition_probs(model, ls, x, t, t - 0.5 * (t - s), base="euler", coeff=1.0)
    assert torch.allclose(a, b, atol=1e-12)


def test_temperature_mode_sharpens_the_final_step():
    model, x, ls, t, s = random_case("absorb", seed=7)
    hot = transition_probs(model, ls, x, t, s, coeff=1.0, mode="temperature", final=True)
    cold = transition_probs(model, ls, x, t, s, coeff=3.0, mode="temperature", final=True)
    masked = x == model.vocab_size - 1
    ent = lambda p: -(p * p.clamp_min(1e-300).log()).sum(-1)  # noqa: E731
    assert (ent(cold[masked]) < ent(hot[masked])).all()
    assert hot.shape[-1] == model.vocab_size - 1


def test_denoise_drops_mask_and_sums_to_one():
    model, x, ls, t, _ = random_case("absorb")
    p = denoise_probs(model, ls, x, t)
    assert p.shape[-1] == model.vocab_size - 1
    assert torch.allclose(p.sum(-1), torch.ones_like(p[..., 0]))


def test_draw_follows_probabilities_in_float64():
    probs = torch.tensor([[0.0, 1e-9, 1 - 1e-9, 0.0]], dtype=torch.float64).expand(5, 4)
    u = torch.tensor([0.0, 5e-10, 1e-9 + 1e-12, 0.5, 1 - 1e-16], dtype=torch.float64)
    assert draw(probs, u).tolist() == [1, 1, 2, 2, 2]
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=torch.float64)
    x = draw(p.expand(200000, 4), torch.rand(200000, generator=g, dtype=torch.float64))
    freq = torch.bincount(x, minlength=4).double() / 200000
    assert torch.allclose(freq, p, atol=5e-3) and freq[1] == 0


def test_grid_and_sampler_checks():
    g = uniform_grid(4)
    assert g[0] == 1.0 and g[-1] == pytest.approx(1e-5) and len(g) == 5
    with pytest.raises(ValueError):
        uniform_grid(0)
    bad = Sampler(torch.tensor([1.0, 0.5, 0.6], dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="decreasing"):
        bad.check()
    nan = Sampler(uniform_grid(2), torch.tensor([1.0, float("nan")], dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        nan.check()


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_engine_invariants(graph):
    model = RandomModel(graph, vocab=9, length=12)
    sampler = Sampler.plain(5)
    seen = []
    with torch.no_grad():
        for step in iterate(model, sampler, torch.arange(6), seed=1):
            seen.append(step)
            if graph == "absorb":
                unmasked = step.x != model.vocab_size - 1
                assert torch.equal(step.x_next[unmasked], step.x[unmasked])
    assert len(seen) == sampler.nfe
    final = seen[-1].x_next
    if graph == "absorb":
        assert (final != model.vocab_size - 1).all()
    assert final.min() >= 0 and final.max() < model.vocab_size


def test_denoise_option_adds_one_model_call():
    model = RandomModel("absorb")
    calls = []
    sample(model, Sampler.plain(3, denoise=True), torch.arange(2), 0, callback=calls.append)
    assert len(calls) == 4 and Sampler.plain(3, denoise=True).nfe == 4
    assert (calls[-1].x_next != model.vocab_size - 1).all()


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_sample_depends_only_on_seed_and_index(graph):
    model = RandomModel(graph, vocab=9, length=12)
    sampler = Sampler.plain(4, base="tweedie")
    full = sample(model, sampler, torch.arange(10), seed=5)
    part = sample(model, sampler, torch.tensor([7, 3]), seed=5)
    assert torch.equal(full[[7, 3]], part)
    assert not torch.equal(full, sample(model, sampler, torch.arange(10), seed=6))


def test_fixed_positions_never_change():
    model = RandomModel("uniform", vocab=9, length=12)
    x0 = torch.randint(0, 9, (3, 12))
    fixed = torch.zeros(3, 12, dtype=torch.bool)
    fixed[:, :4] = True
    out = sample(model, Sampler.plain(6), torch.arange(3), 0, x_init=x0, fixed=fixed)
    assert torch.equal(out[:, :4], x0[:, :4])


@pytest.mark.parametrize("base", ["euler", "tweedie"])
@pytest.mark.parametrize("mode", ["score", "temperature"])
@pytest.mark.parametrize("final", [False, True])
def test_masked_row_closed_form_equals_the_general_rule(base, mode, final):
    from lsdtool.diffusion import make_graph
    from lsdtool.samplers import step_rows

    model, x, ls, t, s = random_case("absorb", seed=11)
    masked = x == model.vocab_size - 1
    rows_t = t[:, None].expand_as(x)[masked]
    rows_s = s[:, None].expand_as(x)[masked]
    coeff = torch.rand(int(masked.sum()), dtype=torch.float64) + 0.5
    graph = make_graph("absorb", model.vocab_size)
    fast = step_rows(graph, model.noise, ls[masked], x[masked], rows_t, rows_s, base, coeff, mode, final)
    # one unmasked row in the batch sends every row through the general rule
    mixed_x = torch.cat([x[masked], x[~masked][:1]])
    mixed_ls = torch.cat([ls[masked], ls[~masked][:1]])
    general = step_rows(graph, model.noise, mixed_ls, mixed_x, torch.cat([rows_t, rows_t[:1]]),
                        torch.cat([rows_s, rows_s[:1]]), base, torch.cat([coeff, coeff[:1]]), mode, final)[:-1]
    assert torch.allclose(fast, general, atol=1e-12, rtol=1e-10)


class ScoreLifetimes(RandomModel):
    """Records, at each model call, whether the previous call's (B, L, V) scores are still alive."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.previous, self.overlapped = None, []

    def log_score(self, x, t):
        import weakref

        self.overlapped.append(self.previous is not None and self.previous() is not None)
        out = super().log_score(x, t)
        self.previous = weakref.ref(out)
        return out


@pytest.mark.parametrize("base", ["euler", "tweedie", "count"])
def test_a_step_scores_are_freed_before_the_next_model_call(base):
    """Peak memory is one step's scores plus one forward, not two steps' scores (SEDD-small at B = 64:
    12 GiB each)."""
    model = ScoreLifetimes("absorb", 7, 10)
    sample(model, Sampler.plain(6, base=base, denoise=True), torch.arange(3), seed=2, callback=lambda step: None)
    assert len(model.overlapped) == 7 and not any(model.overlapped)


def test_the_teacher_rollout_frees_each_step_scores_before_the_next_call():
    from lsdtool import distillation, recipes

    model = ScoreLifetimes("absorb", 7, 10)
    recipe = recipes.effective("countdown", overrides=dict(teacher_steps=12, samples=4, batch=2, candidates=4, steps=2))
    distillation.TeacherRollout(model, recipe, torch.device("cpu"))
    assert len(model.overlapped) == 24 and not any(model.overlapped)
