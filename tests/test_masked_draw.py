"""The engine's draw at masked rows (decide from the row total, build a CDF only where a row moves) is the
inverse-CDF draw of the full-row reference probabilities: the same token for the same uniform."""

import math

import pytest
import torch

from lsdtool import kernels, rng
from lsdtool.diffusion import LogLinear, make_graph
from lsdtool.kernels import Categorical, _draw_masked, denoise_kernel, draw, masked_kernel
from lsdtool.samplers import advance, denoise_rows, step_rows

V = 8  # 7 real tokens and the mask
NOISE = LogLinear(1e-3)
GRAPH = make_graph("absorb", V)


def score_rows(seed=0):
    """(R, V) float32 log scores at masked rows: ordinary rows, rows whose float32 exp underflows or
    overflows, and a row with one dominant token (0 at the mask column, as adapters give)."""
    g = torch.Generator().manual_seed(seed)
    ls = torch.randn(7, V, generator=g) * 1.5 - 1.0
    ls[3] -= 120.0  # e^{ls} below float32's range
    ls[4] += 95.0  # e^{ls} above float32's range
    ls[5, 2] = 6.0
    ls[:, -1] = 0.0
    return ls


RULES = [  # (rows_fn, args after x): euler/tweedie steps, a step too large (stay clamped to 0), final, count, denoise
    (step_rows, (0.6, 0.45, "euler", 1.0, "score", False)),
    (step_rows, (0.6, 0.45, "tweedie", 1.3, "score", False)),
    (step_rows, (0.3, 0.25, "euler", 0.8, "temperature", False)),
    (step_rows, (0.95, 0.05, "euler", 2.5, "score", False)),
    (step_rows, (0.2, 1e-5, "tweedie", 1.2, "temperature", True)),
    (step_rows, (0.5, 0.4, "count", 1.7, "temperature", True)),
    (denoise_rows, (1e-5,)),
]


def reference_tokens(rows_fn, args, ls, u):
    """draw() on the full float64 rows the general rule builds, one row per uniform in u (R, G)."""
    x = torch.full((ls.shape[0],), V - 1)
    probs = rows_fn(GRAPH, NOISE, ls.double(), x, *args)
    g = u.shape[1]
    return draw(probs.repeat_interleave(g, 0), u.reshape(-1)).reshape(ls.shape[0], g)


@pytest.mark.parametrize("exact_sums", [False, True], ids=["float32-pass", "float64-totals"])
@pytest.mark.parametrize("rows_fn,args", RULES)
def test_same_token_as_the_full_row_draw_for_every_uniform(rows_fn, args, exact_sums, monkeypatch):
    """Both ways a masked row decides (the float32 pass with its float64 redo; on a GPU, float64 totals at once)."""
    monkeypatch.setattr(kernels, "_exact_sums", lambda device: exact_sums)
    ls = score_rows()
    x = torch.full((ls.shape[0],), V - 1)
    probs = rows_fn(GRAPH, NOISE, ls.double(), x, *args)
    grid = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000
    # uniforms a relative 1e-9 either side of every CDF boundary, so the float32 band and its float64 redo decide
    edges = probs.cumsum(-1)[:, :-1].clamp(1e-12, 1 - 1e-12)
    near = torch.cat([edges * (1 - 1e-9), edges * (1 + 1e-9)], -1).clamp_max(1 - 1e-16)
    u = torch.cat([grid.expand(ls.shape[0], -1), near], -1)
    rule = masked_kernel(NOISE, *args) if rows_fn is step_rows else denoise_kernel(x.device)
    assert rule is not None
    r, g = u.shape
    fast = _draw_masked(ls[:, :-1], torch.arange(r).repeat_interleave(g), u.reshape(-1), rule).reshape(r, g)
    want = reference_tokens(rows_fn, args, ls, u)
    assert torch.equal(fast, want)
    # the implied probabilities equal the reference ones to the grid's resolution
    freq = torch.stack([torch.bincount(row[:4000], minlength=probs.shape[1]) for row in fast]).double() / 4000
    assert torch.allclose(freq, probs, atol=1 / 4000 + 1e-12)


def test_full_rows_are_used_where_the_closed_form_does_not_apply():
    assert masked_kernel(NOISE, 0.6, 0.45, "euler", torch.tensor([1.0, 2.0]), "score", False) is None
    assert masked_kernel(NOISE, 0.6, 0.45, "euler", -1.0, "score", False) is None
    assert masked_kernel(NOISE, 0.6, 0.45, "theta-trapezoidal", 1.0, "score", False) is None


class FixedScores:
    """Every sample sees the same log scores (L, V): a model for counting draws."""

    graph, vocab_size, noise = "absorb", V, NOISE

    def __init__(self, ls):
        self.ls, self.seq_len = ls, ls.shape[0]

    def log_score(self, x, t):
        return self.ls.expand(x.shape[0], -1, -1)


@pytest.mark.parametrize("args", [(0.6, 0.45, "euler", 1.0, "score", False), (0.2, 1e-5, "tweedie", 1.4, "temperature", True)])
def test_engine_draws_follow_the_reference_probabilities(args):
    """Chi-square over 6000 fixed-seed samples of one engine step at each of 7 positions, against the
    exact full-row probabilities; and each sample's token equals draw() of the reference with its uniform."""
    ls = score_rows(seed=4)
    model, n = FixedScores(ls), 6000
    x = torch.full((n, ls.shape[0]), V - 1)
    index = torch.arange(n)
    out = advance(model, masked_kernel(NOISE, *args), model.log_score(x, None), x, (11, index, 2), None)
    probs = step_rows(GRAPH, NOISE, ls.double(), x[0], *args)
    u = rng.uniforms(11, rng.STREAM_STEP, index, 2, ls.shape[0])  # (n, L)
    assert torch.equal(out, reference_tokens(step_rows, args, ls, u.T).T)
    for j in range(ls.shape[0]):
        p = probs[j]
        counts = torch.bincount(out[:, j], minlength=p.shape[0]).double()
        keep = p > 0
        assert counts[~keep].sum() == 0
        expected = n * p[keep]
        big = expected >= 5
        chi2 = (((counts[keep] - expected) ** 2 / expected)[big]).sum()
        df = int(big.sum()) - 1
        if df > 0:
            p_value = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2)
            assert p_value > 1e-4, (j, float(chi2), df)


@pytest.mark.parametrize("rows_fn,args", RULES)
def test_the_closed_form_log_prob_is_the_full_rows(rows_fn, args):
    """Every kernel has the log-probability of a transition: the masked closed form gives the full rows' values."""
    ls = score_rows()[[0, 1, 2, 5, 6]]
    x = torch.full((ls.shape[0],), V - 1)
    kernel = masked_kernel(NOISE, *args) if rows_fn is step_rows else denoise_kernel(x.device)
    general = Categorical(rows_fn, args)
    width = general.probs(GRAPH, NOISE, ls.double(), x).shape[1]
    for y in range(width):
        target = torch.full_like(x, y)
        want = general.log_prob(GRAPH, NOISE, ls.double(), x, target)
        got = kernel.log_prob(GRAPH, NOISE, ls.double(), x, target)
        finite = want > -600
        assert torch.equal(finite, got > -600) and torch.allclose(got[finite], want[finite], rtol=1e-10, atol=1e-12)


# ---- the uniform graph: rows that stay are decided from float32 sums ------------------------------

@pytest.mark.parametrize("args", [(0.6, 0.55, "euler", 1.0, "score", False), (0.3, 0.25, "euler", 0.7, "temperature", False),
                                  (0.9, 0.2, "euler", 1.4, "score", True), (0.6, 0.55, "tweedie", 1.0, "score", False),
                                  (0.3, 0.25, "tweedie", 0.7, "temperature", False), (0.95, 0.6, "tweedie", 1.4, "score", True),
                                  (0.99, 0.9, "tweedie", 1.0, "score", False)])
@pytest.mark.parametrize("width", [V, 203])
def test_uniform_euler_and_tweedie_keep_the_full_row_draw_for_every_uniform(args, width, monkeypatch):
    """Uniforms on a grid and a relative 1e-9 either side of every CDF boundary (including both ends of the
    stay segment): the fast decision plus exact movers gives exactly the full-row draw. Width 203 puts x
    in the first, a middle and the last (partial) block of the float32 partial sums, and on block edges."""
    from lsdtool.diffusion import Uniform
    from lsdtool.samplers import stay_or_jump_kernel

    graph, noise = Uniform(width), LogLinear(1e-3)
    g = torch.Generator().manual_seed(2)
    ls = torch.randn(6, width, generator=g) * 1.5 - 3.0 + (math.log(V / width) if width > V else 0.0)
    ls[3] -= 120.0  # underflows in float32
    x = torch.tensor([0, 3, 7, 5, 1, 6]) if width == V else torch.tensor([0, 63, 64, 130, 191, 202])
    ls = ls.scatter(-1, x[:, None], 0.0)
    kernel = stay_or_jump_kernel(graph, noise, *args)
    assert kernel is not None
    probs = kernel.exact.probs(graph, noise, ls.double(), x)
    grid = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    edges = probs.cumsum(-1)[:, :-1].clamp(1e-12, 1 - 1e-12)
    near = torch.cat([edges * (1 - 1e-9), edges * (1 + 1e-9)], -1).clamp_max(1 - 1e-16)
    u = torch.cat([grid.expand(6, -1), near], -1)
    r, gcount = u.shape
    rows = torch.arange(r).repeat_interleave(gcount)
    tokens, settled = kernel.decide(ls[rows], x[rows], u.reshape(-1))
    want = draw(probs[rows], u.reshape(-1))
    assert torch.equal(tokens[settled], want[settled])  # every settled row is the full-row draw, stay or move
    assert torch.equal(tokens[~settled], x[rows][~settled])
    on_grid = settled.reshape(r, gcount)[:, :2000]
    assert on_grid.float().mean() > 0.95  # the float32 masses settle nearly every uniform away from the edges
    near_edge = settled.reshape(r, gcount)[:, 2000:]
    assert not near_edge.all()  # and leave those within 1e-9 of a boundary to the exact rows
    class Fixed:
        graph, vocab_size, noise = Uniform(width), width, LogLinear(1e-3)
        seq_len = 6

        def log_score(self, xx, t):
            return ls.expand(xx.shape[0], -1, -1)

    model, n = Fixed(), 3000
    xs = x.expand(n, -1).clone()
    fast = advance(model, kernel, model.log_score(xs, None), xs, (5, torch.arange(n), 1), None)
    slow = advance(model, kernel.exact, model.log_score(xs, None), xs, (5, torch.arange(n), 1), None)
    assert torch.equal(fast, slow)
    monkeypatch.setattr(kernels, "_exact_sums", lambda device: True)  # a GPU's order: float64 decisions alone
    assert torch.equal(advance(model, kernel, model.log_score(xs, None), xs, (5, torch.arange(n), 1), None), slow)


@pytest.mark.parametrize("width", [8, 64, 1000, 50258])
def test_block_totals_and_the_mass_before_x_are_the_float64_sums(width):
    """The float32 partial sums of 64 masses keep the row total and the mass before x within 4e-6 of the
    float64 sums (the band of the stay decision is 1e-4), for x on block edges and in the last block."""
    from lsdtool.kernels import _block_totals, _mass_before

    g = torch.Generator().manual_seed(width)
    w = (torch.randn(5, width, generator=g) * 3 - 4).exp()
    x = torch.tensor([0, min(63, width - 1), min(64, width - 1), width // 2, width - 1])
    cum = _block_totals(w)
    exact = w.double()
    assert torch.allclose(cum[:, -1], exact.sum(-1), rtol=4e-6, atol=0)
    want = torch.stack([exact[i, : x[i]].sum() for i in range(5)])
    assert ((_mass_before(w, cum, x) - want).abs() <= 4e-6 * exact.sum(-1)).all()
    assert _mass_before(w, cum, x)[0] == 0


@pytest.mark.parametrize("base", ["euler", "tweedie"])
@pytest.mark.parametrize("mode,coeff", [("score", 1.0), ("score", 0.55), ("temperature", 1.3)])
@pytest.mark.parametrize("rows,width", [(1, 50257), (7, 50257), (33, 97), (300, 8)])
def test_uniform_movers_rows_are_the_full_rows_bit_for_bit(base, mode, coeff, rows, width):
    """The movers' fused float64 rows (one buffer) equal step_rows' bit for bit, and so do their draws."""
    from lsdtool.diffusion import Uniform
    from lsdtool.samplers import stay_or_jump_kernel

    graph, noise = Uniform(width), LogLinear(1e-3)
    g = torch.Generator().manual_seed(rows)
    ls = (torch.randn(rows, width, generator=g) * 2.0 - 1.0).float()
    x = torch.randint(0, width, (rows,), generator=g)
    ls = ls.scatter(-1, x[:, None], 0.0)
    kernel = stay_or_jump_kernel(graph, noise, 0.8, 0.55, base, coeff, mode, False)
    want = kernel.exact.probs(graph, noise, ls, x)
    buf = torch.empty(rows + 3, width, dtype=torch.float64)
    assert torch.equal(kernel.probs_into(ls, x, buf[:rows]), want)
    u = torch.rand(rows, generator=g, dtype=torch.float64)
    assert torch.equal(kernel.draw(ls, x, u, buf), draw(want, u))
