"""A model's graph decides its token layout: a model whose mask sits in the middle of the vocabulary
samples and distils exactly as its mask-last twin, token for token under the permutation."""

import pytest
import torch

from lsdtool import distillation, recipes, steprules
from lsdtool.diffusion import Absorb, LogLinear, graph_of
from lsdtool.errors import LsdError
from lsdtool.samplers import Sampler, iterate, sample

V, L, MASK = 6, 20, 2  # 5 real tokens; the twin's mask is 5, the permuted model's is 2
TO_MIDDLE = torch.tensor([0, 1, 3, 4, 5, 2])  # twin id -> permuted id (real tokens keep their order)
TO_LAST = torch.argsort(TO_MIDDLE)


class Twin:
    """An absorbing model (mask last) whose log score at j depends on the tokens at j and j-1 (random tables)."""

    name, device, fingerprint = "twin", torch.device("cpu"), "twin:v1"

    def __init__(self, seed=0):
        self.vocab_size, self.seq_len, self.noise = V, L, LogLinear(1e-3)
        self.graph = Absorb(V)
        g = torch.Generator().manual_seed(seed)
        self.own = torch.randn(V, L, V, generator=g, dtype=torch.float64)
        self.left = torch.randn(V, L, V, generator=g, dtype=torch.float64)

    def log_score(self, x, t):
        prev = torch.cat([torch.full_like(x[:, :1], V - 1), x[:, :-1]], 1)
        pos = torch.arange(x.shape[1])
        logits = 2.0 * self.own[x, pos] + 1.5 * self.left[prev, pos]
        sigma = self.noise.total(t.double()).reshape(-1, 1, 1)
        ls = logits[..., :-1].log_softmax(-1) - torch.log(torch.expm1(sigma))  # log p(y | x) / (e^sigma - 1)
        ls = torch.cat([ls, torch.zeros_like(ls[..., :1])], -1)
        return ls.float().scatter(-1, x[..., None], 0.0)


class Permuted(Twin):
    """The twin with its mask moved to id 2: the same model under the permutation TO_MIDDLE."""

    name, fingerprint = "permuted", "permuted:v1"

    def __init__(self, seed=0):
        super().__init__(seed)
        self.graph = Absorb(V, mask_id=MASK)

    def log_score(self, x, t):
        ls = super().log_score(TO_LAST[x], t)  # columns in the twin's order
        return ls.index_select(-1, TO_LAST)  # column TO_MIDDLE[j] holds the twin's column j


def run(model, sampler, n=6, seed=7, **kw):
    return sample(model, sampler, torch.arange(n), seed, **kw)


ABSORBING = [name for name, rule in steprules.RULES.items() if rule.supports_graph("absorb")]


@pytest.mark.parametrize("base", ABSORBING)
@pytest.mark.parametrize("mode,denoise", [("score", False), ("temperature", True)])
def test_every_absorbing_rule_draws_the_twins_samples_under_the_permutation(base, mode, denoise):
    steps = 4 if base != "entropy-bound" else L
    coeffs = torch.linspace(0.7, 1.6, steps, dtype=torch.float64)
    sampler = Sampler(Sampler.plain(steps).timesteps, coeffs, base, mode, denoise and base in ("euler", "tweedie"))
    twin, permuted = Twin(), Permuted()
    a, b = run(twin, sampler), run(permuted, sampler)
    assert (a != V - 1).all() and (b != MASK).all()  # every mask filled
    assert torch.equal(TO_MIDDLE[a], b)
    steps_a = list(iterate(twin, sampler, torch.arange(3), 1))
    steps_b = list(iterate(permuted, sampler, torch.arange(3), 1))
    assert len(steps_a) == len(steps_b)
    for sa, sb in zip(steps_a, steps_b):  # every intermediate state, masks included
        assert torch.equal(TO_MIDDLE[sa.x_next], sb.x_next)


def test_conditioning_keeps_given_tokens_in_the_permuted_layout():
    twin, permuted = Twin(), Permuted()
    fixed = torch.zeros(2, L, dtype=torch.bool)
    fixed[:, :5] = True
    given = torch.tensor([[0, 1, 2, 3, 4] * 4] * 2)  # twin ids, all real
    x_twin = torch.where(fixed, given, V - 1)
    x_perm = TO_MIDDLE[x_twin]
    a = run(twin, Sampler.plain(3), n=2, x_init=x_twin, fixed=fixed)
    b = run(permuted, Sampler.plain(3), n=2, x_init=x_perm, fixed=fixed)
    assert torch.equal(TO_MIDDLE[a], b) and torch.equal(b[:, :5], x_perm[:, :5])


@pytest.mark.parametrize("plus", [False, True])
def test_distillation_fits_the_same_sampler_for_both_layouts(plus):
    recipe = recipes.complete({"steps": 3, "plus": plus, "teacher_steps": 12, "samples": 8, "batch": 8,
                               "candidates": 12, "iters": 3, "seed": 0})
    a = distillation.distill(Twin(), recipe).sampler
    b = distillation.distill(Permuted(), recipe).sampler
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.coeffs, b.coeffs)
    assert not torch.equal(a.coeffs, torch.ones(3, dtype=torch.float64))  # the fit moved Phi


def test_a_declared_mask_id_is_the_one_the_engine_uses():
    class Declared(Permuted):  # a model that names its graph and declares its mask id
        graph, mask_id = "absorb", MASK

    model = Declared()
    model.__dict__.pop("graph")
    assert graph_of(model).mask_id == MASK
    assert torch.equal(run(model, Sampler.plain(4)), run(Permuted(), Sampler.plain(4)))


def test_a_graph_that_does_not_fit_the_vocabulary_is_refused():
    model = Twin()
    model.graph = Absorb(V + 1)
    with pytest.raises(ValueError, match="vocabulary"):
        run(model, Sampler.plain(2))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Absorb(V, mask_id=V)


def test_artifacts_record_the_graph_and_refuse_another_mask(tmp_path):
    from lsdtool import artifacts

    sampler = Sampler.plain(3)
    sampler.meta = artifacts.model_fields(Permuted())
    path = sampler.save(tmp_path / "perm.safetensors")
    meta, _, _ = artifacts.read(path)
    assert meta["graph"] == "absorb" and meta["graph_params"] == '{"mask_id": 2}'
    other = Permuted()
    other.graph = Absorb(V, mask_id=4)
    with pytest.raises(LsdError, match="mask_id"):
        Sampler.load(path, model=other)
    Sampler.load(path, model=Permuted())


# ---- the family-neutral model interface ------------------------------------------------------------

from lsdtool.diffusion import Uniform  # noqa: E402
from lsdtool.models.base import DiffusionModel  # noqa: E402


class X0Model(DiffusionModel):
    """A model that predicts x0 only (random per-position logits over the real tokens)."""

    name, fingerprint = "x0", "x0:v1"

    def __init__(self, graph):
        self.graph, self.vocab_size, self.seq_len, self.noise = graph, graph.vocab_size, 7, LogLinear(1e-3)
        self.logits = torch.randn(7, graph.n_real, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def x0_log_probs(self, x, t):
        return self.logits.log_softmax(-1).expand(x.shape[0], -1, -1)


@pytest.mark.parametrize("graph", [Absorb(6), Absorb(6, mask_id=2), Uniform(5)])
def test_an_x0_model_gets_its_log_score_and_back(graph):
    model = X0Model(graph)
    x = graph.start_state(torch.arange(3), 0, 7)
    if graph.absorbing:
        x[:, :3] = graph.real_token(torch.tensor([0, 3, 4]))
    t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    ls = model.log_score(x, t)
    assert ls.shape == (3, 7, graph.vocab_size) and (ls.gather(-1, x[..., None]) == 0).all()
    back = graph.x0_from_log_score(ls, x, model.noise.total(t))
    moving = x == graph.mask_id if graph.absorbing else torch.ones_like(x, dtype=torch.bool)
    want = model.x0_log_probs(x, t)
    assert torch.allclose(back[moving].exp(), want[moving].exp(), atol=1e-9)
    sigma = model.noise.total(t)
    if graph.absorbing:  # at a mask s_y = p(y) / (e^sigma - 1)
        s = graph.real_columns(ls).exp()[moving]
        p = want.exp()[moving]
        assert torch.allclose(s, p / torch.expm1(sigma)[:, None, None].expand(3, 7, 1)[moving], rtol=1e-9)
    else:  # the definition: s_y = sum_x0 p(x0) q(y | x0) / q(x | x0)
        a = torch.exp(-sigma)[:, None, None, None]
        q = a * torch.eye(5, dtype=torch.float64) + (1 - a) / 5  # (B, 1, x0, y)
        p = want.exp()[..., :, None]  # (B, L, x0, 1)
        qx = q.expand(3, 7, 5, 5).gather(-1, x[:, :, None, None].expand(3, 7, 5, 1))  # q(x | x0)
        s = (p * q / qx).sum(-2)
        assert torch.allclose(ls.exp().scatter(-1, x[..., None], 1.0), s.scatter(-1, x[..., None], 1.0), rtol=1e-9)
    assert sample(model, Sampler.plain(4), torch.arange(2), 0).shape == (2, 7)


def test_the_sequence_length_is_given_per_call():
    model = Twin()
    x0 = torch.full((2, 9), V - 1)  # shorter than the model's seq_len
    out = sample(model, Sampler.plain(3), torch.arange(2), 0, x_init=x0)
    assert out.shape == (2, 9) and (out != V - 1).all()


def test_a_model_with_neither_score_is_refused():
    class Empty(DiffusionModel):
        graph, vocab_size, seq_len, noise = Absorb(4), 4, 3, LogLinear(1e-3)

    with pytest.raises(NotImplementedError, match="neither"):
        Empty().log_score(torch.zeros(1, 3, dtype=torch.long), torch.ones(1))
