import itertools
import math

import pytest
import torch

from lsdtool import distillation, recipes
from lsdtool.metrics import countdown_errors
from lsdtool.samplers import Sampler, sample

SMALL = dict(teacher_steps=64, samples=32, batch=32, candidates=32, iters=5, seed=0)


def test_best_path_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    k, m = 7, 3
    cost = torch.rand(k, k, generator=g, dtype=torch.float64)
    cost = torch.where(torch.arange(k)[:, None] < torch.arange(k)[None, :], cost, torch.full_like(cost, math.inf))
    path = distillation.best_path(cost, m)
    best = min(itertools.combinations(range(1, k - 1), m - 1),
               key=lambda mid: sum(cost[a, b] for a, b in zip((0, *mid), (*mid, k - 1))))
    assert path == [0, *best, k - 1]
    with pytest.raises(Exception):
        distillation.best_path(cost, k)


def test_grid_from_logits_is_valid_by_construction():
    uniform = distillation.grid_from_logits(torch.zeros(8, dtype=torch.float64))
    assert torch.allclose(uniform, torch.linspace(1, 1e-5, 9, dtype=torch.float64), atol=1e-12)
    wild = distillation.grid_from_logits(torch.tensor([30.0, -30.0, 5.0, 0.0], dtype=torch.float64))
    assert (wild[1:] < wild[:-1]).all() and wild[0] == 1 and wild[-1] == 1e-5


def test_zero_iterations_is_the_base_sampler(countdown):
    r = recipes.effective("countdown", overrides=dict(SMALL, steps=4, plus=True, iters=0))
    fit = distillation.distill(countdown, r)
    plain = Sampler.plain(4)
    assert torch.equal(fit.sampler.timesteps, plain.timesteps) and torch.equal(fit.sampler.coeffs, plain.coeffs)


def test_teacher_path_plus_beats_euler_on_countdown(countdown):
    r = recipes.effective("countdown", overrides=dict(SMALL, steps=8, plus=True, teacher_steps=128))
    fit = distillation.distill(countdown, r)
    s = fit.sampler
    s.check()
    assert sum(fit.fit["schedule_loss_after"]) < sum(fit.fit["schedule_loss_before"])
    assert sum(fit.fit["loss_after"]) <= sum(fit.fit["loss_before"])
    idx = torch.arange(256)
    e_plain = countdown_errors(sample(countdown, Sampler.plain(8), idx, seed=99))["error"]
    e_lsd = countdown_errors(sample(countdown, s, idx, seed=99))["error"]
    assert e_lsd < 0.6 * e_plain


def test_likelihood_coefficient_fit_never_hurts_and_is_recorded(countdown):
    r = recipes.effective("countdown", overrides=dict(SMALL, steps=4, plus=False, mode="temperature"))
    fit = distillation.distill(countdown, r)
    assert torch.equal(fit.sampler.timesteps, Sampler.plain(4).timesteps)
    assert all(a <= b + 1e-12 for a, b in zip(fit.fit["loss_after"], fit.fit["loss_before"]))
    assert (fit.sampler.coeffs != 1).any() and fit.sampler.mode == "temperature"


def test_paper_step_loss_optimum_is_the_closed_form():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(50, 7, generator=g, dtype=torch.float64)
    target = 0.3 * s + 0.05 * torch.rand(50, 7, generator=g, dtype=torch.float64)
    closed = (s * target).sum() / (s * s).sum()
    log_phi = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_phi], lr=0.05)
    for _ in range(400):
        loss = distillation.paper_score_loss(s.log(), target, log_phi.exp(), "score")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert log_phi.exp().item() == pytest.approx(closed.item(), rel=1e-3)


@pytest.mark.parametrize("plus", [False, True])
def test_paper_objective_runs_and_keeps_a_valid_grid(countdown, plus):
    r = recipes.effective("countdown", overrides=dict(SMALL, steps=4, plus=plus, objective="paper", iters=6, samples=16, batch=8))
    fit = distillation.distill(countdown, r)
    fit.sampler.check()
    history = fit.fit["history"]
    assert fit.fit["objective"] == "paper" and len(history) == 6
    assert history[4] < history[2] < history[0]  # iterations 0, 2, 4 fit the same batch: the loss falls
    assert torch.isfinite(fit.sampler.coeffs).all() and (fit.sampler.coeffs != 1).all()  # gradients reached every Phi_k
    uniform = Sampler.plain(4).timesteps
    assert torch.equal(fit.sampler.timesteps, uniform) != plus  # LSD+ moved the grid, LSD kept it


def test_relaxed_start_changes_ceil_zeta_l_positions(countdown):
    r = recipes.effective("countdown", overrides=dict(SMALL, steps=4, objective="paper", samples=4, batch=4))
    ro = distillation.TeacherRollout(countdown, r, torch.device("cpu"))
    for fill in ("teacher", "uniform"):
        x = distillation._relaxed_start(ro, slice(0, 4), dict(r, fill=fill), 0)
        changed = x != 32
        assert (changed.sum(-1) == math.ceil(0.05 * 256)).all()
        if fill == "teacher":
            assert torch.equal(x[changed], ro.final[:4][changed])


def test_candidate_times_match_candidates_when_the_uniform_grid_is_merged_in(countdown):
    r = recipes.effective("countdown", overrides=dict(SMALL, steps=3, samples=4, batch=4, candidates=5, iters=1))
    ro = distillation.TeacherRollout(countdown, r, torch.device("cpu"))
    assert len(ro.candidates) > 6  # 5 candidate intervals plus the 3-step uniform grid's points
    assert torch.equal(ro.times, ro.teacher.timesteps[ro.candidates])
    assert torch.equal(ro.times[ro.uniform_path(3)], ro.teacher.timesteps[torch.tensor([0, 21, 43, 64])])


def test_a_step_where_the_teacher_moves_nothing_keeps_phi_one(countdown):
    r = recipes.effective("countdown", overrides=dict(SMALL, steps=2, samples=4, batch=4, candidates=8, iters=2))
    rollout = distillation.TeacherRollout(countdown, r, torch.device("cpu"))
    kk = len(rollout.candidates)
    rollout.states[kk // 2] = rollout.final  # all revealed by the middle: the second step moves nothing
    coeffs, before, after = distillation.fit_coeffs(rollout, [0, kk // 2, kk - 1], r)
    assert coeffs[1] == 1 and before[1] == after[1] == 0
    assert after[0] <= before[0]


def test_fitting_in_row_blocks_gives_the_whole_interval_fit(countdown, monkeypatch):
    """Back-propagating the NLL block by block (bounded memory on large vocabularies) must give the
    same loss, gradient and fitted Phi as one graph over all moving rows."""
    r = recipes.effective("countdown", overrides=dict(SMALL, steps=3, samples=6, batch=3, candidates=8, iters=5,
                                                      mode="temperature"))
    rollout = distillation.TeacherRollout(countdown, r, torch.device("cpu"))
    path = rollout.uniform_path(3)
    whole = distillation.fit_coeffs(rollout, path, r)
    phi = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    one_graph = distillation.interval_nll(rollout, path[0], path[1], phi, r, False, slice(0, 3))
    one_graph.backward()
    monkeypatch.setattr(distillation, "_NLL_BLOCK", 7 * countdown.vocab_size)  # 7 rows a block
    leaf = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    blocked = distillation.interval_nll(rollout, path[0], path[1], leaf, r, False, slice(0, 3), grad_scale=1.0)
    assert not blocked.requires_grad and blocked.item() == pytest.approx(one_graph.item(), rel=1e-12)
    assert leaf.grad.item() == pytest.approx(phi.grad.item(), rel=1e-9) and phi.grad.item() != 0
    in_blocks = distillation.fit_coeffs(rollout, path, r)
    assert torch.allclose(in_blocks[0], whole[0], rtol=1e-9) and not torch.equal(whole[0], torch.ones(3, dtype=torch.float64))
    assert in_blocks[2] == pytest.approx(whole[2], rel=1e-9)
