"""digits-net and its offline metrics: fd-digits/kid-digits against a hand computation, KID's unbiasedness
on two halves of the held-out digits, the training loss against tauLDR's GenericAux as its authors wrote
it, bit-exact training at one thread, and distil + sample + compare on the shipped model."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lsdtool import images, metrics_digits as md
from lsdtool.errors import LsdError
from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def digits():
    from lsdtool.models import load

    return load("digits-net")


def sqrtm_2x2(m: torch.Tensor) -> torch.Tensor:
    """The PSD square root of a 2×2 PSD matrix in closed form: (M + √det I) / √(tr + 2√det)."""
    s = math.sqrt(float(torch.linalg.det(m)))
    return (m + s * torch.eye(2, dtype=m.dtype)) / math.sqrt(float(m.trace()) + 2 * s)


def test_fd_kid_and_class_entropy_by_hand_on_a_toy_feature_set(digits, monkeypatch):
    """Two features per image (mean level, share of lit pixels): FD from the closed-form 2×2 square root."""

    def toy(self, levels):
        lv = levels.reshape(levels.shape[0], -1).double()
        return torch.stack([lv.mean(1), (lv > 0).double().mean(1)], 1)

    monkeypatch.setattr(md.DigitsEval, "features", toy)
    ev = md.DigitsEval("fd-digits", digits)
    monkeypatch.setattr(ev, "classes", lambda f: (f[:, 0] > 3).long())  # two "classes" by mean level
    x = torch.randint(0, 17, (40, 64), generator=torch.Generator().manual_seed(0))
    out = ev(x)
    f, r = toy(None, x), toy(None, md.load_heldout()[0])
    mu1, mu2 = f.mean(0), r.mean(0)
    s1, s2 = torch.cov(f.T), torch.cov(r.T)
    a = sqrtm_2x2(s1)
    fd = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * sqrtm_2x2(a @ s2 @ a).trace())
    assert out["fd-digits"] == pytest.approx(fd, rel=1e-9, abs=1e-12)
    share = (f[:, 0] > 3).double().mean().item()
    h = -sum(p * math.log(p) for p in (share, 1 - share) if p > 0)
    assert out["class_entropy"] == pytest.approx(h, abs=1e-12)
    assert {"kid-digits", "kid-digits_se"} <= set(out) and out["kid-digits_se"] > 0


def test_class_entropy_is_log_10_for_equal_classes_and_0_for_one():
    assert md.class_entropy(torch.arange(10).repeat(7)) == pytest.approx(math.log(10))
    assert md.class_entropy(torch.full((50,), 3)) == 0.0


def test_kid_digits_is_unbiased_on_two_halves_of_the_heldout_digits_and_sees_a_shift(digits):
    ev = md.DigitsEval("kid-digits", digits)
    levels, labels = md.load_heldout()
    perm = torch.randperm(levels.shape[0], generator=torch.Generator().manual_seed(1))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    from lsdtool.metrics_image import kid

    same = kid(ev.features(levels[a]), ev.features(levels[b]), subsets=50)
    assert abs(same["kid"]) < 3 * same["kid_se"], same
    ones = levels[labels == 1]  # one digit only: the classes' mix is gone
    shifted = kid(ev.features(ones), ev.features(levels[b]), subsets=50)
    assert shifted["kid"] > 5 * shifted["kid_se"], shifted


def test_the_classifier_and_reference_ship_with_the_model(digits):
    net, meta = md.load_classifier()
    levels, labels = md.load_heldout()
    assert levels.dtype == torch.uint8 and levels.shape[1:] == (8, 8) and int(levels.max()) <= 16
    with torch.no_grad():
        accuracy = (net(levels).argmax(-1) == labels).double().mean().item()
    assert accuracy == pytest.approx(float(meta["heldout_accuracy"]), abs=1e-6) and accuracy > 0.9
    assert digits.task == "digits" and tuple(digits.shape) == (1, 8, 8) and digits.vocab_size == 17


def test_the_metric_refuses_other_images_in_one_line(tmp_path):
    from image_model import TinyImage

    with pytest.raises(LsdError, match="8x8 greyscale images with 17 levels"):
        md.DigitsEval("fd-digits", TinyImage())


def official_generic_aux(model, minibatch, ts, x_tilde, eps=1e-9, nll_weight=1e-3):
    """tauLDR's GenericAux.calc_loss (lib/losses/losses.py) after its sampling of x_tilde, transcribed as written
    (its indexing kept), with model.transition / model.rate / model(x, t) from the graph and the network."""
    B, D = minibatch.shape
    S = model.vocab_size
    qt0 = model.graph.transition(ts)
    rate = model.graph.beta(ts)[:, None, None] * model.graph.rate_matrix()
    x_logits = model.x0_logits(x_tilde, ts.float()).double()
    p0t_reg = F.softmax(x_logits, dim=2)
    reg_x = x_tilde
    mask_reg = torch.ones((B, D, S), dtype=torch.float64)
    mask_reg[torch.arange(B).repeat_interleave(D), torch.arange(D).repeat(B), reg_x.long().flatten()] = 0.0
    qt0_numer_reg = qt0.view(B, S, S)
    qt0_denom_reg = qt0[torch.arange(B).repeat_interleave(D), :, reg_x.long().flatten()].view(B, D, S) + eps
    rate_vals_reg = rate[torch.arange(B).repeat_interleave(D), :, reg_x.long().flatten()].view(B, D, S)
    reg_tmp = (mask_reg * rate_vals_reg) @ qt0_numer_reg.transpose(1, 2)
    reg_term = torch.sum((p0t_reg / qt0_denom_reg) * reg_tmp, dim=(1, 2))
    p0t_sig = p0t_reg
    outer_qt0_numer_sig = qt0[torch.arange(B).repeat_interleave(D * S), minibatch.long().flatten().repeat_interleave(S),
                              torch.arange(S).repeat(B * D)].view(B, D, S)
    outer_qt0_denom_sig = qt0[torch.arange(B).repeat_interleave(D), minibatch.long().flatten(),
                              x_tilde.long().flatten()] + eps
    qt0_numer_sig = qt0.view(B, S, S)
    qt0_denom_sig = qt0[torch.arange(B).repeat_interleave(D), :, x_tilde.long().flatten()].view(B, D, S) + eps
    inner_log_sig = torch.log((p0t_sig / qt0_denom_sig) @ qt0_numer_sig + eps)
    x_tilde_mask = torch.ones((B, D, S), dtype=torch.float64)
    x_tilde_mask[torch.arange(B).repeat_interleave(D), torch.arange(D).repeat(B), x_tilde.long().flatten()] = 0.0
    outer_rate_sig = rate[torch.arange(B).repeat_interleave(D * S), torch.arange(S).repeat(B * D),
                          x_tilde.long().flatten().repeat_interleave(S)].view(B, D, S)
    outer_sum_sig = torch.sum(x_tilde_mask * outer_rate_sig * (outer_qt0_numer_sig / outer_qt0_denom_sig.view(B, D, 1))
                              * inner_log_sig, dim=(1, 2))
    rate_row_sums = -rate[torch.arange(B).repeat_interleave(S), torch.arange(S).repeat(B), torch.arange(S).repeat(B)].view(B, S)
    base_Z_tmp = rate_row_sums[torch.arange(B).repeat_interleave(D), x_tilde.long().flatten()].view(B, D)
    base_Z = torch.sum(base_Z_tmp, dim=1)
    Z_sig_norm = base_Z.view(B, 1, 1) - base_Z_tmp.view(B, D, 1) + rate_row_sums.view(B, 1, S)
    rate_sig_norm = rate[torch.arange(B).repeat_interleave(D * S), torch.arange(S).repeat(B * D),
                         x_tilde.long().flatten().repeat_interleave(S)].view(B, D, S)
    qt0_sig_norm_numer = qt0[torch.arange(B).repeat_interleave(D * S), minibatch.long().flatten().repeat_interleave(S),
                             torch.arange(S).repeat(B * D)].view(B, D, S)
    qt0_sig_norm_denom = qt0[torch.arange(B).repeat_interleave(D), minibatch.long().flatten(),
                             x_tilde.long().flatten()].view(B, D) + eps
    sig_norm = torch.sum((rate_sig_norm * qt0_sig_norm_numer * x_tilde_mask) / (Z_sig_norm * qt0_sig_norm_denom.view(B, D, 1)),
                         dim=(1, 2))
    neg_elbo = torch.mean(-outer_sum_sig / sig_norm) + torch.mean(reg_term)
    nll = F.cross_entropy(x_logits.permute(0, 2, 1), minibatch.long())
    return neg_elbo + nll_weight * nll


def test_the_training_loss_is_tauldrs_generic_aux(digits):
    import train_digits_net as T

    g = torch.Generator().manual_seed(3)
    x0 = md.load_heldout()[0][:6].reshape(6, -1).long()
    ts = torch.tensor([0.011, 0.05, 0.2, 0.45, 0.8, 1.0], dtype=torch.float64)
    x_tilde = torch.randint(0, 17, x0.shape, generator=g)
    ours = T.negative_elbo(digits, x0, ts, x_tilde)
    theirs = official_generic_aux(digits, x0, ts, x_tilde)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)
    with torch.no_grad():  # and it sees the network: another model's logits give another loss
        p = next(digits.net.parameters())
        p.add_(0.1)
        try:
            assert T.negative_elbo(digits, x0, ts, x_tilde).item() != pytest.approx(ours.item(), rel=1e-6)
        finally:
            p.sub_(0.1)


def test_training_twice_from_one_seed_at_one_thread_writes_equal_files(tmp_path, monkeypatch):
    import train_digits_net as T

    fake = torch.randint(0, 17, (600, 8, 8), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(T, "load_data", lambda: (fake, torch.arange(600) % 10))
    threads = torch.get_num_threads()
    try:
        for run in ("a", "b"):
            assert T.main(["--out", str(tmp_path / run), "--steps", "3", "--ch", "8", "--res-blocks", "1",
                           "--batch", "4", "--classifier-epochs", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["ckpt_0000000003.safetensors", "classifier.safetensors", "config.yaml", "heldout.safetensors"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    from lsdtool.models import load

    model = load(str(tmp_path / "a"))  # the one tauldr adapter reads what the script writes
    assert model.task == "digits" and model.vocab_size == 17


def test_distil_sample_and_compare_on_digits_net(tmp_path):
    art, recipe = tmp_path / "d.safetensors", tmp_path / "small.toml"
    recipe.write_text('base = "tau-leaping"\nteacher_steps = 16\nsamples = 8\nbatch = 8\ncandidates = 8\niters = 2\n')
    r = run_cli("distill", "--model", "digits-net", "--recipe", recipe, "--steps", "2", "--plus", "--out", art,
                "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.stderr
    r = run_cli("sample", "--sampler", art, "-n", "4", "--format", "tokens")
    assert r.exit_code == 0, r.stderr
    rows = [list(map(int, line.split())) for line in r.stdout.splitlines()]
    assert len(rows) == 4 and all(len(row) == 64 and 0 <= min(row) and max(row) <= 16 for row in rows)
    # lsd+ at NFE 3 is the 2-step artifact: tau-leaping spends one more call (the final argmax) than its steps
    r = run_cli("compare", "--model", "digits-net", "--samplers", "tau-leaping,lsd+", "--steps", "3", "-n", "32", "--json",
                "--recipe", recipe, "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["protocol"]["metric"] == "fd-digits" and result["protocol"]["teacher_sampler"] == "tau-leaping"
    rows = {row["sampler"]: row for row in result["rows"]}
    assert rows["lsd+"]["nfe"] == 3 and "cache hit" in r.stderr
    for row in rows.values():
        cell = row["metrics"]
        assert cell["fd-digits"] > 0 and 0 <= cell["class_entropy"] <= math.log(10) + 1e-9
    plot = tmp_path / "grid.png"
    r = run_cli("compare", "--model", "digits-net", "--samplers", "tau-leaping,lsd+", "--steps", "3", "-n", "32",
                "--recipe", recipe, "--cache-dir", tmp_path / "cache", "--plot", plot)
    assert r.exit_code == 0, r.stderr
    assert "teacher NFE 17" in r.stderr and "cached" in r.stderr  # its steps + the final argmax, even from the cache
    cell = images.grid(torch.zeros(16, 32, 32, 1, dtype=torch.uint8), 4, pad=1).shape  # 16 digits shown 4x
    assert images.read(plot).pixels.shape[:2] == (6 + 3 * (cell[0] + 6), 6 + (cell[1] + 6))  # + the cached teacher's row
    assert "teacher (tau-leaping)" in r.stdout and "±" not in r.stdout  # a Fréchet distance has no per-sample s.e.


def test_energy_distance_by_hand():
    from lsdtool.distillation import energy_distance

    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0]])
    assert energy_distance(x, y) == pytest.approx(2 * 1.5 - 0.5 - 0.0)  # 2 E|X-Y| - E|X-X'| - E|Y-Y'|
    assert energy_distance(x, x) == pytest.approx(0.0)


def test_lsd_plus_searches_an_ordinal_grid_that_beats_the_uniform_one_and_reports_it_truly(digits):
    """The schedule search (energy distance of the student's finals to the teacher's) on digits-net: the grid
    it keeps is a valid path, strictly better than the uniform grid by its loss, and that loss is what the
    student's own finals give when sampled again independently of the search."""
    from lsdtool import distillation, recipes
    from lsdtool.samplers import Sampler, sample

    recipe = recipes.complete({"base": "tau-leaping", "steps": 3, "plus": True, "teacher_steps": 32, "samples": 48,
                               "batch": 48, "candidates": 16, "iters": 2, "seed": 3})
    rollout = distillation.TeacherRollout(digits, recipe, torch.device("cpu"))
    uniform = rollout.uniform_path(3)
    path, before, after = distillation.search_grid(rollout, recipe, uniform)
    assert path[0] == 0 and path[-1] == len(rollout.candidates) - 1 and path == sorted(set(path)) and len(path) == 4
    assert after[0] < before[0] and path != uniform
    student = Sampler(rollout.times[path].clone(), torch.ones(3, dtype=torch.float64), "tau-leaping", "score")
    finals = sample(digits, student, torch.arange(48), recipe["seed"] + 1, x_init=rollout.states[0])
    assert distillation.energy_distance(finals / 16.0, rollout.final / 16.0) == pytest.approx(after[0], rel=1e-12)
