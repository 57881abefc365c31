"""tau-leaping and its predictor-corrector on a tauLDR checkpoint (the official tiny fixture), through the one
engine: tauLDR's grid and NFE, batch independence, fixed pixels, and distillation (LSD/LSD+) end to end."""

from pathlib import Path

import pytest
import torch

from lsdtool import distillation, recipes
from lsdtool.models import load
from lsdtool.samplers import Sampler, iterate, sample

FIX = Path(__file__).parent / "fixtures" / "tauldr-tiny"


@pytest.fixture(scope="module")
def model():
    return load(str(FIX))


def test_tau_leaping_follows_tauldr_grid_and_nfe(model):
    s = Sampler.plain(4, base="tau-leaping")
    assert s.timesteps.tolist()[:4] == pytest.approx([1.0, 0.67, 0.34, 0.01]) and s.timesteps[-1] > 0
    assert s.nfe == 5  # 4 Poisson steps and the final argmax
    with torch.no_grad():
        steps = list(iterate(model, s, torch.arange(2), 0))
    assert len(steps) == 5 and steps[-1].stage == 1
    out = steps[-1].x_next
    assert out.shape == (2, 192) and out.min() >= 0 and out.max() <= 255
    # the last call is the argmax of p(x0 | x) at min_t
    lp = model.x0_log_probs(steps[-1].x, torch.full((2,), 0.01))
    assert torch.equal(out, lp.argmax(-1))


def test_samples_do_not_depend_on_the_batch_and_fixed_pixels_stay(model):
    s = Sampler.plain(3, base="tau-leaping")
    a = sample(model, s, torch.arange(4), 5)
    b = torch.cat([sample(model, s, torch.arange(2), 5), sample(model, s, torch.arange(2, 4), 5)])
    assert torch.equal(a, b)
    start = model.graph.start_state(torch.arange(4), 5, model.seq_len)
    assert start.float().mean().sub(127).abs() < 20  # tauLDR's start law is centred one level below S // 2
    fixed = torch.zeros(4, 192, dtype=torch.bool)
    fixed[:, :50] = True
    x0 = start.clone()
    x0[:, :50] = 7
    c = sample(model, s, torch.arange(4), 5, x_init=x0, fixed=fixed)
    assert (c[:, :50] == 7).all()


def test_predictor_corrector_spends_its_corrector_calls(model):
    s = Sampler.plain(4, base="tau-leaping-pc", options={"corrector_steps": 2, "corrector_entry": 0.5})
    s.check()
    with torch.no_grad():
        steps = list(iterate(model, s, torch.arange(2), 1))
    assert len(steps) == s.nfe == 4 + 2 * 2 + 1  # steps starting at 0.34 and 0.01 get two correctors each
    assert sample(model, s, torch.arange(2), 1).shape == (2, 192)


@pytest.mark.parametrize("plus,size", [(True, "small"), pytest.param(False, "larger", marks=pytest.mark.slow),
                                       pytest.param(True, "larger", marks=pytest.mark.slow)])
def test_distillation_fits_a_valid_tau_leaping_sampler(model, plus, size):
    small = size == "small"
    recipe = recipes.complete({"steps": 3, "plus": plus, "base": "tau-leaping", "teacher_steps": 6 if small else 12,
                               "samples": 1 if small else 2, "batch": 2, "candidates": 6, "iters": 1 if small else 2,
                               "seed": 0})
    fit = distillation.distill(model, recipe)
    fit.sampler.check()
    assert fit.sampler.base == "tau-leaping" and fit.sampler.nfe == 4
    assert sum(fit.fit["loss_after"]) <= sum(fit.fit["loss_before"]) + 1e-9  # the fit never does worse than untrained
    if plus:
        assert fit.fit["schedule_loss_after"] and sum(fit.fit["schedule_loss_after"]) <= sum(fit.fit["schedule_loss_before"]) + 1e-6
    else:
        assert torch.equal(fit.sampler.timesteps, Sampler.plain(3, base="tau-leaping").timesteps)
    untrained = distillation.distill(model, dict(recipe, iters=0)).sampler
    assert untrained == Sampler.plain(3, base="tau-leaping")


def test_text_rules_refuse_an_ordinal_model_and_back(model):
    with pytest.raises(ValueError, match="needs an absorbing or a uniform model|needs an absorbing or uniform model"):
        sample(model, Sampler.plain(2), torch.arange(1), 0)


def test_the_command_line_distils_samples_pngs_and_compares_a_tauldr_folder(tmp_path):
    from PIL import Image

    from conftest import run_cli

    cache = tmp_path / "cache"
    recipe = tmp_path / "small.toml"
    recipe.write_text("candidates = 4\n")
    small = ["--teacher-steps", "4", "--samples", "1", "--batch", "1", "--iters", "1", "--recipe", recipe]
    r = run_cli("distill", "--model", FIX, "--steps", "2", "--plus", "--base", "tau-leaping", *small, "--cache-dir", cache)
    assert r.exit_code == 0, r.output
    art = r.stdout.strip()
    grid = tmp_path / "grid.png"
    r = run_cli("sample", "--sampler", art, "-n", "2", "--format", "png", "-o", grid)
    assert r.exit_code == 0, r.output
    img = Image.open(grid)
    assert img.mode == "RGB" and img.size[0] >= 8 and img.size[1] >= 8
    metric = Path(__file__).parent / "image_model.py"
    r = run_cli("compare", "--model", FIX, "--steps", "3", "--samplers", "tau-leaping", "-n", "2", "--no-teacher",
                "--metric", f"{metric}:mean_level", "--json", "--cache-dir", cache)
    assert r.exit_code == 0, r.output
    r = run_cli("distill", "--model", FIX, "--steps", "2", *small, "--cache-dir", cache)  # no base named: tau-leaping
    assert r.exit_code == 0, r.output
    assert Sampler.load(r.stdout.strip()).base == "tau-leaping"
    r = run_cli("distill", "--model", FIX, "--steps", "2", "--base", "euler", *small, "--cache-dir", cache)
    assert r.exit_code == 1 and "needs an absorbing or uniform model" in r.stderr and r.stdout == ""
