"""Image metrics (DESIGN §11-12): FID and KID of samples against a reference, on Inception-v3 pool3 features.

The distances are computed here in float64 from two sets of features (N, d):
- Fréchet distance FD = |mu1 − mu2|² + tr(S1 + S2 − 2 (S1 S2)^{1/2}), with tr (S1 S2)^{1/2} =
  tr (A S2 A)^{1/2}, A = S1^{1/2}: both square roots of symmetric PSD matrices by ``eigh`` (no scipy).
- KID: the unbiased MMD² with the cubic kernel k(x, y) = (x·y/d + 1)³, averaged over ``subsets`` random
  subsets of ``subset_size`` from each set, as torch-fidelity draws them (numpy RandomState(2020)); its
  standard error is the delete-one jackknife over the generated samples of the MMD² of all of them.
The features are torch-fidelity's ``inception-v3-compat`` 2048-d pool3 (optional: ``lsdtool[image]``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from lsdtool import images
from lsdtool.errors import LsdError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
FEATURES = "inception-v3-compat pool3 (2048), torch-fidelity"
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020  # torch-fidelity's defaults
REFERENCE_HELP = "a directory of PNG images, a statistics .npz with mu and sigma, or cifar10-train"


# ---- the math -------------------------------------------------------------------------------------------

def statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu (d,), sigma (d, d)) of features (N, d) in float64; sigma with the N − 1 normalisation."""
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / max(f.shape[0] - 1, 1)


def _psd_eigenvalues(w: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix with round-off (below d·eps·max|w|) set to 0: a singular
    covariance (n < d) has exact zeros whose square roots would otherwise add ~sqrt(eps) each."""
    tol = w.abs().max().clamp_min(1e-300) * w.numel() * torch.finfo(w.dtype).eps
    return torch.where(w > tol, w, torch.zeros_like(w))


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    """The symmetric PSD square root of a symmetric (d, d) matrix (round-off eigenvalues set to 0)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * _psd_eigenvalues(w).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 − mu2|² + tr(S1 + S2 − 2 (S1 S2)^{1/2}) in float64; mu (d,), sigma (d, d)."""
    mu1, mu2, s1, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    a = _sqrt_psd(s1)
    m = a @ s2 @ a
    tr_sqrt = _psd_eigenvalues(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x·y/d + 1)³ for rows x (n, d), y (m, d) -> (n, m) float64."""
    return (x.double() @ y.double().T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² of equal-size sets (m, d), as torch-fidelity's: diagonals of K_XX, K_YY left out,
    K_XY averaged over all m² pairs."""
    m = x.shape[0]
    kxx, kyy, kxy = poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kid(generated: torch.Tensor, reference: torch.Tensor, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> dict:
    """KID of features (n, d) against (r, d): mean and std of :func:`mmd2_unbiased` over ``subsets`` subsets of
    min(subset_size, n, r) rows of each (drawn as torch-fidelity does), and the jackknife s.e. (:func:`kid_se`)."""
    import numpy as np

    n, r = generated.shape[0], reference.shape[0]
    size = min(subset_size, n, r)
    if size < 2:
        raise LsdError(f"KID needs at least 2 samples and 2 reference images, got {n} and {r}")
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        a = torch.as_tensor(rng.choice(n, size, replace=False))
        b = torch.as_tensor(rng.choice(r, size, replace=False))
        values.append(mmd2_unbiased(generated[a], reference[b]))
    v = torch.tensor(values, dtype=torch.float64)
    return {"kid": v.mean().item(), "kid_se": kid_se(generated, reference), "kid_std": v.std(unbiased=False).item(),
            "kid_subsets": subsets, "kid_subset_size": size}


def kid_se(generated: torch.Tensor, reference: torch.Tensor, block: int = 2048) -> float:
    """Delete-one jackknife s.e., over the n generated samples, of the unbiased MMD² of all of them against all
    r reference rows: sqrt((n−1)/n Σ_i (θ_(i) − θ̄)²), θ_(i) from row sums (the K_YY term cancels); blocked."""
    n, r = generated.shape[0], reference.shape[0]
    if n < 3:
        return float("nan")
    within = torch.zeros(n, dtype=torch.float64)  # Σ_{j≠i} k(x_i, x_j)
    cross = torch.zeros(n, dtype=torch.float64)  # Σ_j k(x_i, y_j)
    for s in range(0, n, block):
        x = generated[s : s + block]
        kxx = torch.cat([poly_kernel(x, generated[t : t + block]) for t in range(0, n, block)], 1)
        within[s : s + block] = kxx.sum(1) - kxx[torch.arange(len(x)), torch.arange(s, s + len(x))]
        cross[s : s + block] = sum(poly_kernel(x, reference[t : t + block]).sum(1) for t in range(0, r, block))
    a, c = within.sum(), cross.sum()
    theta = (a - 2 * within) / ((n - 1) * (n - 2)) - 2 * (c - cross) / ((n - 1) * r)
    return math.sqrt((n - 1) / n * ((theta - theta.mean()) ** 2).sum().item())


# ---- features -------------------------------------------------------------------------------------------

def _inception_class():
    """torch-fidelity's Inception-v3 feature extractor class (without importing torchvision, which only its
    dataset helpers need)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3
    except ImportError as exc:
        import importlib.util
        import sys
        import types

        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or not spec.submodule_search_locations:
            raise LsdError("FID and KID need torch-fidelity: pip install 'lsdtool[image]'") from None
        if getattr(exc, "name", "") and not str(exc.name).startswith("torchvision"):
            raise LsdError(f"cannot import torch-fidelity ({exc}); reinstall it: pip install 'lsdtool[image]'") from None
        for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
            del sys.modules[name]  # a half-imported package from the failed attempt
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)  # submodules import without the package's __init__
        sys.modules["torch_fidelity"] = package
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3


def default_weights_path() -> Path:
    """Where torch-fidelity keeps the Inception weights: torch hub's checkpoints directory."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def weights_path(weights: str | None, offline: bool) -> Path:
    """The Inception weights file: ``weights``, else torch-fidelity's cache (downloaded there when online);
    an LsdError saying what is missing and how to supply it."""
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise LsdError(f"--inception-weights {weights}: no such file (torch-fidelity's {WEIGHTS_FILE}, from {WEIGHTS_URL})")
        return path
    path = default_weights_path()
    if path.is_file():
        return path
    how = (f"the Inception-v3 weights for FID/KID are not in {path.parent} (torch-fidelity's cache): download "
           f"{WEIGHTS_URL} there, or pass --inception-weights PATH")
    if offline:
        raise LsdError(how)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, str(path), progress=False)
    except Exception as exc:  # no network, proxy, HTTP error: all mean the same to the user
        raise LsdError(f"{how} (download failed: {str(exc).splitlines()[0][:120]})") from None
    return path


class InceptionFeatures:
    """Pixels (N, H, W, C) uint8 -> pool3 features (N, 2048) float64 on CPU, through torch-fidelity's network."""

    def __init__(self, weights: str | None = None, offline: bool = False, device="cpu", batch_size: int = 64):
        cls = _inception_class()
        path = weights_path(weights, offline)
        try:
            torch.load(path, map_location="cpu", weights_only=True)  # refuse anything but plain tensors
        except Exception as exc:
            raise LsdError(f"{path} is not an Inception state dict ({str(exc).splitlines()[0][:120]})") from None
        self.net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)).to(device)
        self.device, self.batch_size, self.path = torch.device(device), batch_size, path
        self._last = None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        key = (tuple(pixels.shape), hash(pixels.numpy().tobytes()))
        if self._last is not None and self._last[0] == key:  # fid and kid of one cell share the features
            return self._last[1]
        x = pixels.permute(0, 3, 1, 2)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # greyscale as RGB
        out = []
        with torch.no_grad():
            for s in range(0, x.shape[0], self.batch_size):
                out.append(self.net(x[s : s + self.batch_size].contiguous().to(self.device))[0].double().cpu())
        features = torch.cat(out)
        self._last = (key, features)
        return features


_EXTRACTORS: dict = {}


def shared_features(weights, offline, device) -> InceptionFeatures:
    """One feature extractor per (weights, device), shared by the FID and KID of one run."""
    key = (str(weights), str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionFeatures(weights, offline, device)
    return _EXTRACTORS[key]


# ---- the reference --------------------------------------------------------------------------------------

def _png_pixels(directory: Path) -> torch.Tensor:
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise LsdError(f"--reference {directory} holds no .png images")
    first = images.read(files[0]).pixels
    out = torch.empty(len(files), first.shape[0], first.shape[1], 3, dtype=torch.uint8)
    for k, f in enumerate(files):
        px = images.read(f).pixels
        if px.shape[:2] != first.shape[:2]:
            raise LsdError(f"--reference {directory}: {f.name} is {px.shape[1]}x{px.shape[0]}, "
                           f"{files[0].name} {first.shape[1]}x{first.shape[0]}; the images must share one size")
        out[k] = px.expand(-1, -1, 3)
    return out


def _cifar10_pixels(offline: bool) -> torch.Tensor:
    root = os.path.join(torch.hub._get_torch_home(), "fidelity_datasets")
    try:
        from torch_fidelity.datasets import Cifar10_RGB  # needs torchvision
    except ImportError:
        raise LsdError(f"--reference cifar10-train needs torchvision (torch-fidelity's CIFAR-10 loader); or pass "
                       f"{REFERENCE_HELP.split(', or')[0]}") from None
    try:
        data = Cifar10_RGB(root, train=True, download=not offline)
    except Exception as exc:
        raise LsdError(f"--reference cifar10-train: the CIFAR-10 training set is not in {root} "
                       f"({str(exc).splitlines()[0][:100]}); fetch it once online, or pass a directory of PNGs") from None
    return torch.as_tensor(data.data)  # (50000, 32, 32, 3) uint8


def check_reference(reference) -> None:
    """Before any work: ``reference`` names something that can be one (see :data:`REFERENCE_HELP`)."""
    if not reference:
        raise LsdError(f"FID and KID need --reference: {REFERENCE_HELP}")
    if reference != "cifar10-train" and not os.path.exists(reference):
        raise LsdError(f"--reference {reference}: no such file or directory ({REFERENCE_HELP})")


def reference_features(reference: str, features, offline: bool, need_features: bool) -> dict:
    """{"mu", "sigma"} and, from images, {"features"} of the reference; a .npz gives mu/sigma (and features)."""
    path = Path(reference)
    if reference != "cifar10-train" and path.is_file():
        import numpy as np

        try:
            data = np.load(path, allow_pickle=False)
            stats = {k: torch.as_tensor(data[k], dtype=torch.float64) for k in data.files if k in ("mu", "sigma", "features")}
        except Exception as exc:
            raise LsdError(f"--reference {reference} is not a statistics .npz ({str(exc).splitlines()[0][:100]})") from None
        if "features" in stats and "mu" not in stats:
            stats["mu"], stats["sigma"] = statistics(stats["features"])
        if "mu" not in stats or "sigma" not in stats:
            raise LsdError(f"--reference {reference} holds no mu and sigma")
        if need_features and "features" not in stats:
            raise LsdError(f"--reference {reference} holds only mu and sigma; KID needs the reference's features or "
                           "images (a directory of PNGs, or cifar10-train)")
        return stats
    pixels = _cifar10_pixels(offline) if reference == "cifar10-train" else _png_pixels(path)
    f = features(pixels)
    mu, sigma = statistics(f)
    return {"mu": mu, "sigma": sigma, "features": f}


# ---- the metrics ----------------------------------------------------------------------------------------

class ImageEval:
    """FID or KID of an image model's samples against a reference; the mean per-sample pixel entropy beside it."""

    dtype = "float64"
    diversity = ("entropy", "H")

    def __init__(self, kind: str, model, device, reference, weights=None, offline: bool = False, features=None):
        images.shape_of(model)  # a text model: refused before anything else
        check_reference(reference)
        self.kind, self.model, self.primary = kind, model, kind
        self.features = features or shared_features(weights, offline, device)
        self.reference = reference_features(reference, self.features, offline, need_features=kind == "kid")
        self.name = f"{kind} ({FEATURES})"
        self.identity = f"{self.name} vs {reference}"
        self.protocol = {"metric": kind, "features": FEATURES, "reference": str(reference),
                         "reference_n": int(self.reference["features"].shape[0]) if "features" in self.reference else None,
                         "pixels": "level k -> round(k*255/(S-1)), greyscale repeated to RGB",
                         "diversity": "mean per-sample entropy (nats) of the levels of each image"}
        if kind == "kid":
            self.protocol.update(kid_kernel="(x.y/d + 1)^3", kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE,
                                 kid_seed=KID_SEED, kid_se="delete-one jackknife over generated samples")

    def __call__(self, x: torch.Tensor) -> dict:
        from lsdtool.metrics import mean_se, unigram_entropy

        f = self.features(images.samples_to_images(self.model, x))
        if self.kind == "fid":
            if f.shape[0] < 2:
                raise LsdError("FID needs at least 2 samples")
            mu, sigma = statistics(f)
            out = {"fid": frechet_distance(mu, sigma, self.reference["mu"], self.reference["sigma"])}
        else:
            found = kid(f, self.reference["features"])
            self.protocol["kid_subset_size"] = found.pop("kid_subset_size")
            found.pop("kid_subsets")
            out = found
        out["entropy"], out["entropy_se"] = mean_se(unigram_entropy(x, images.levels_of(self.model)))
        return out


def fid_metric(*, model, device, reference=None, inception_weights=None, local_files_only=None, **_) -> ImageEval:
    """FID of samples against ``reference`` (DESIGN §12) on torch-fidelity's Inception pool3 features."""
    return ImageEval("fid", model, device, reference, inception_weights, _offline(local_files_only))


def kid_metric(*, model, device, reference=None, inception_weights=None, local_files_only=None, **_) -> ImageEval:
    """KID (unbiased, cubic kernel, torch-fidelity's subsets) with its jackknife s.e."""
    return ImageEval("kid", model, device, reference, inception_weights, _offline(local_files_only))


def _offline(local_files_only) -> bool:
    if local_files_only is not None:
        return bool(local_files_only)
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
