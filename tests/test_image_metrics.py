"""FID and KID: the Fréchet distance against closed forms and a direct eigen-decomposition, the unbiased
MMD² against a hand loop and torch-fidelity's subset protocol, KID's unbiasedness and its standard error,
the offline/missing-input one-liners, and compare --plot's image grid."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lsdtool import images, metrics_image as mi
from lsdtool.errors import LsdError
from conftest import run_cli

from image_model import TinyImage

HERE = Path(__file__).resolve().parent
MODEL = str(HERE / "image_model.py")


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- Fréchet distance -----------------------------------------------------------------------------

def test_frechet_distance_of_1d_gaussians_is_the_closed_form():
    for m1, s1, m2, s2 in [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -0.5, 0.5), (3.0, 0.1, 3.0, 7.0)]:
        fd = mi.frechet_distance([m1], [[s1**2]], [m2], [[s2**2]])
        assert fd == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12, abs=1e-12)


def test_frechet_distance_of_diagonal_covariances_is_the_closed_form():
    a, b = torch.rand(6, generator=gen(1), dtype=torch.float64) + 0.1, torch.rand(6, generator=gen(2), dtype=torch.float64)
    mu1, mu2 = torch.randn(6, generator=gen(3), dtype=torch.float64), torch.randn(6, generator=gen(4), dtype=torch.float64)
    want = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert mi.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(want.item(), rel=1e-12)


def test_frechet_distance_matches_a_direct_eigen_decomposition_of_s1_s2():
    d = 12
    f1 = torch.randn(40, d, generator=gen(5), dtype=torch.float64) @ torch.randn(d, d, generator=gen(6), dtype=torch.float64)
    f2 = torch.randn(50, d, generator=gen(7), dtype=torch.float64) * 2 + 1
    (mu1, s1), (mu2, s2) = mi.statistics(f1), mi.statistics(f2)
    assert torch.allclose(s1, torch.as_tensor(np.cov(f1.numpy(), rowvar=False)), atol=1e-12)
    eig = torch.linalg.eigvals(s1 @ s2)  # S1 S2 is similar to a PSD matrix: real, non-negative eigenvalues
    tr_sqrt = eig.real.clamp_min(0).sqrt().sum()
    want = ((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt
    assert mi.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want.item(), rel=1e-9)
    assert abs(mi.frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_frechet_distance_stays_finite_for_singular_covariances():
    f1, f2 = torch.randn(5, 30, generator=gen(8)), torch.randn(6, 30, generator=gen(9))  # n < d: rank-deficient
    fd = mi.frechet_distance(*mi.statistics(f1), *mi.statistics(f2))
    assert math.isfinite(fd) and fd > 0


# ---- KID ------------------------------------------------------------------------------------------

def test_unbiased_mmd2_is_the_hand_loop():
    x, y = torch.randn(5, 3, generator=gen(10)), torch.randn(5, 3, generator=gen(11)) + 0.5
    k = lambda a, b: (float(a.double() @ b.double()) / 3 + 1) ** 3  # noqa: E731
    m = 5
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert mi.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_draws_torch_fidelitys_subsets():
    x, y = torch.randn(30, 4, generator=gen(12)), torch.randn(25, 4, generator=gen(13)) + 0.3
    rng, values = np.random.RandomState(2020), []  # torch-fidelity's loop, written plainly
    for _ in range(7):
        a, b = x.numpy()[rng.choice(30, 20, replace=False)], y.numpy()[rng.choice(25, 20, replace=False)]
        values.append(mi.mmd2_unbiased(torch.as_tensor(a), torch.as_tensor(b)))
    out = mi.kid(x, y, subsets=7, subset_size=20)
    assert out["kid"] == pytest.approx(float(np.mean(values)), rel=1e-12)
    assert out["kid_std"] == pytest.approx(float(np.std(values)), rel=1e-9) and out["kid_subset_size"] == 20


def test_kid_is_unbiased_for_two_samples_of_one_distribution_and_detects_a_shift():
    reps, same, shifted, biased = 300, [], [], []
    for r in range(reps):
        x, y = torch.randn(20, 3, generator=gen(100 + r)), torch.randn(20, 3, generator=gen(10_000 + r))
        same.append(mi.mmd2_unbiased(x, y))
        shifted.append(mi.mmd2_unbiased(x + 0.5, y))
        kxx, kyy, kxy = mi.poly_kernel(x, x), mi.poly_kernel(y, y), mi.poly_kernel(x, y)
        biased.append(float(kxx.mean() + kyy.mean() - 2 * kxy.mean()))  # the diagonal kept: biased upwards
    for values, zero in [(same, True), (shifted, False), (biased, False)]:
        v = torch.tensor(values, dtype=torch.float64)
        z = v.mean() / (v.std() / reps**0.5)
        assert (abs(z) < 3.5) if zero else (z > 5), (zero, z)


def test_kid_standard_error_matches_the_spread_over_repeated_draws():
    ref = torch.randn(200, 4, generator=gen(20))
    thetas, ses = [], []
    for r in range(200):
        x = torch.randn(30, 4, generator=gen(300 + r)) * 1.3
        thetas.append(_full_mmd2(x, ref))
        ses.append(mi.kid_se(x, ref))
    spread = torch.tensor(thetas, dtype=torch.float64).std().item()
    assert 0.75 < (sum(ses) / len(ses)) / spread < 1.35, (sum(ses) / len(ses), spread)


def _full_mmd2(x, y):
    """The unbiased MMD² of all of x against all of y (unequal sizes): what kid_se's jackknife is about."""
    n, r = len(x), len(y)
    kxx, kyy, kxy = mi.poly_kernel(x, x), mi.poly_kernel(y, y), mi.poly_kernel(x, y)
    return float((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (r * (r - 1)) - 2 * kxy.mean())


def test_kid_se_is_blocked_exactly():
    x, y = torch.randn(9, 3, generator=gen(30)), torch.randn(7, 3, generator=gen(31))
    assert mi.kid_se(x, y, block=2) == pytest.approx(mi.kid_se(x, y, block=100), rel=1e-12)
    loo = [_full_mmd2(torch.cat([x[:i], x[i + 1:]]), y) for i in range(9)]  # delete-one, written plainly
    t = torch.tensor(loo, dtype=torch.float64)
    assert mi.kid_se(x, y) == pytest.approx(math.sqrt(8 / 9 * ((t - t.mean()) ** 2).sum().item()), rel=1e-9)


# ---- the metric on an image model, with a stand-in feature extractor ---------------------------------

def flat_features(pixels):
    return pixels.reshape(pixels.shape[0], -1).double()


def _reference_dir(tmp_path, model, n=12, seed=3):
    d = tmp_path / "ref"
    d.mkdir()
    x = torch.randint(0, model.vocab_size, (n, model.seq_len), generator=gen(seed))
    for i, px in enumerate(images.samples_to_images(model, x)):
        (d / f"{i:03d}.png").write_bytes(images.encode(px))
    return d, x


def test_fid_and_kid_of_samples_use_the_features_of_their_pixels(tmp_path):
    model = TinyImage(16, (3, 4, 4))
    ref_dir, ref_x = _reference_dir(tmp_path, model)
    ref_f = flat_features(images.samples_to_images(model, ref_x))
    x = torch.randint(0, 16, (10, 48), generator=gen(4))
    f = flat_features(images.samples_to_images(model, x))
    fid = mi.ImageEval("fid", model, "cpu", str(ref_dir), features=flat_features)
    out = fid(x)
    assert out["fid"] == pytest.approx(mi.frechet_distance(*mi.statistics(f), *mi.statistics(ref_f)), rel=1e-12)
    assert abs(fid(ref_x)["fid"]) < 1e-6  # the reference against itself
    from lsdtool.metrics import unigram_entropy

    assert out["entropy"] == pytest.approx(unigram_entropy(x, 16).mean().item())
    kid = mi.ImageEval("kid", model, "cpu", str(ref_dir), features=flat_features)(x)
    assert kid["kid"] == pytest.approx(mi.kid(f, ref_f)["kid"]) and kid["kid_se"] > 0
    np.savez(tmp_path / "stats.npz", mu=mi.statistics(ref_f)[0].numpy(), sigma=mi.statistics(ref_f)[1].numpy())
    assert mi.ImageEval("fid", model, "cpu", str(tmp_path / "stats.npz"), features=flat_features)(x)["fid"] == pytest.approx(out["fid"])
    with pytest.raises(LsdError, match="KID needs"):
        mi.ImageEval("kid", model, "cpu", str(tmp_path / "stats.npz"), features=flat_features)


def test_offline_without_weights_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(LsdError) as info:
        mi.weights_path(None, offline=True)
    msg = str(info.value)
    assert mi.WEIGHTS_URL in msg and "--inception-weights" in msg and str(tmp_path / "torch") in msg and "\n" not in msg
    with pytest.raises(LsdError, match="no such file"):
        mi.weights_path(str(tmp_path / "none.pth"), offline=True)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a state dict")
    try:
        import torch_fidelity  # noqa: F401  (the image extra)
        missing = None
    except ImportError:
        missing = "FID and KID need torch-fidelity"
    with pytest.raises(LsdError, match=missing or "not an Inception state dict"):
        mi.InceptionFeatures(str(bad))


def _one_line(r):
    assert r.exit_code == 1 and r.stdout == "" and "Traceback" not in r.stderr, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_compare_refuses_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ref = tmp_path / "ref"
    ref.mkdir()
    base = ["compare", "--model", f"{MODEL}:make", "--steps", "2", "--samplers", "euler", "-n", "4", "--no-teacher",
            "--offline", "--cache-dir", tmp_path / "cache"]
    try:
        import torch_fidelity  # noqa: F401  (the image extra)
        weights = "--inception-weights PATH"
    except ImportError:  # without the extra the first thing missing is torch-fidelity itself
        weights = "lsdtool[image]"
    for extra, what in [(["--metric", "fid", "--reference", ref], weights),
                        (["--metric", "kid", "--reference", ref], weights),
                        (["--metric", "fid"], "need --reference"),
                        (["--metric", "fid", "--reference", tmp_path / "nope"], "no such file")]:
        r = run_cli(*base, *extra)
        line = _one_line(r)
        assert what in line and "sampling" not in r.stderr and "euler NFE" not in r.stderr, r.stderr
    r = run_cli("compare", "--model", "countdown", "--steps", "2", "--samplers", "euler", "-n", "4", "--no-teacher",
                "--metric", "fid", "--reference", ref, "--cache-dir", tmp_path / "cache")
    assert "not images" in _one_line(r)


def test_compare_plot_of_an_image_model_is_a_grid_of_the_cells_samples(tmp_path):
    plot = tmp_path / "grid.png"
    r = run_cli("compare", "--model", f"{MODEL}:full", "--steps", "2,4", "--samplers", "euler,tweedie", "-n", "6",
                "--seed", "3", "--no-teacher", "--metric", f"{MODEL}:mean_level", "--plot", plot, "--json",
                "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"][0]["sampler"] == "euler"
    got = images.read(plot).pixels
    cells = {}
    for name in ("euler", "tweedie"):
        for steps in (2, 4):
            out = tmp_path / f"{name}{steps}"
            assert run_cli("sample", "--model", f"{MODEL}:full", "--steps", steps, "--base", name, "-n", 6, "--seed", 3,
                           "--format", "png", "-o", f"{out}/").exit_code == 0
            cells[name, steps] = torch.stack([images.read(out / f"{i:06d}.png").pixels for i in range(6)])
    assert torch.equal(got, images.table([[cells["euler", 2], cells["euler", 4]], [cells["tweedie", 2], cells["tweedie", 4]]],
                                         least=32))
    tile = images.grid(cells["tweedie", 4].new_zeros(6, 32, 32, 3), 4, pad=1)  # a cell's size: 4x4 images shown 8x
    h, w = tile.shape[:2]
    assert got.shape[:2] == (6 + 2 * (h + 6), 6 + 2 * (w + 6))
    y, x = 6 + (h + 6) + 1, 6 + (w + 6) + 1  # tweedie (second row), NFE 4 (second column), first sample
    first = cells["tweedie", 4][0]
    assert torch.equal(got[y : y + 32 : 8, x : x + 32 : 8], first) and torch.equal(got[y + 7 : y + 32 : 8, x + 7 : x + 32 : 8], first)
    assert torch.equal(images.enlarge(first[None], 32)[0, 8:16, 8:16], first[1, 1].expand(8, 8, 3))
