"""Offline image metrics for 8×8, 17-level digit models (DESIGN §12): ``fd-digits`` and ``kid-digits``.

They are not FID: the features are the 64-d penultimate layer of a small CNN trained on the training
split of scikit-learn's handwritten digits (shipped with ``digits-net``, with its held-out accuracy),
and the reference is that data set's held-out split, which neither the classifier nor ``digits-net``
ever saw. The distances reuse :mod:`lsdtool.metrics_image`'s float64 Fréchet distance and unbiased
KID (cubic kernel, jackknife s.e.). Beside them, the diversity figure: the entropy (nats) of the
predicted class over the samples, log 10 ≈ 2.303 when every digit is equally common.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lsdtool.errors import LsdError

SHAPE, LEVELS, CLASSES, FEATURES = (1, 8, 8), 17, 10, 64
HOME = Path(__file__).resolve().parent / "models" / "embedded" / "digits-net"
CLASSIFIER_FILE, HELDOUT_FILE = "classifier.safetensors", "heldout.safetensors"
KID_SUBSETS = 100


class DigitsClassifier(nn.Module):
    """Levels (B, 8, 8) in 0..16 -> 10 class logits; ``features`` is the 64-d layer before them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, CLASSES)

    def features(self, levels: torch.Tensor) -> torch.Tensor:
        """(B, 8, 8) levels -> (B, 64) float32 features."""
        return self.conv(levels.float().reshape(-1, 1, 8, 8) / (LEVELS - 1))

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(levels))


def load_classifier(home: Path = HOME) -> tuple[DigitsClassifier, dict]:
    """The shipped classifier (eval mode, CPU) and its entry in the model's config (held-out accuracy, digest)."""
    from safetensors.torch import load_file

    from lsdtool.models.tauldr import read_yaml_config

    path = home / CLASSIFIER_FILE
    if not path.is_file():
        raise LsdError(f"the digits classifier {path} is missing: reinstall lsdtool")
    net = DigitsClassifier()
    net.load_state_dict(load_file(path))
    meta = read_yaml_config(home / "config.yaml").get("classifier", {})
    return net.eval(), meta


def load_heldout(home: Path = HOME) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out digits: levels (N, 8, 8) uint8 in 0..16 and labels (N,) int64."""
    from safetensors.torch import load_file

    path = home / HELDOUT_FILE
    if not path.is_file():
        raise LsdError(f"the held-out digits {path} are missing: reinstall lsdtool")
    data = load_file(path)
    return data["levels"], data["labels"]


def class_entropy(predicted: torch.Tensor, classes: int = CLASSES) -> float:
    """H of the predicted-class histogram (nats): -Σ_c p_c log p_c, p_c = share of samples predicted c."""
    p = torch.bincount(predicted.long(), minlength=classes).double() / max(predicted.numel(), 1)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def check_model(model) -> None:
    """An 8×8 greyscale model with 17 levels, else one line saying what the metric needs."""
    from lsdtool import images

    shape, levels = tuple(images.shape_of(model)), images.levels_of(model)
    if shape != SHAPE or levels != LEVELS:
        raise LsdError(f"fd-digits and kid-digits score 8x8 greyscale images with {LEVELS} levels; model "
                       f"{model.name} makes {shape[1]}x{shape[2]}x{shape[0]} with {levels} levels")


class DigitsEval:
    """FD and KID of samples against the held-out digits in the classifier's features, with the class entropy."""

    dtype = "float64"
    diversity = ("class_entropy", "H class")

    def __init__(self, kind: str, model, home: Path = HOME):
        from lsdtool.metrics_image import statistics

        check_model(model)
        self.kind, self.model, self.primary = kind, model, kind
        self.net, meta = load_classifier(home)
        levels, _ = load_heldout(home)
        self.reference = self.features(levels)
        self.ref_mu, self.ref_sigma = statistics(self.reference)
        self.name = f"{kind} (digits classifier features, {FEATURES}-d)"
        self.identity = f"{self.name} @ {meta.get('sha256', '?')}"
        self.protocol = {"metric": kind, "features": f"digits-net classifier penultimate layer ({FEATURES}-d)",
                         "classifier_heldout_accuracy": float(meta["heldout_accuracy"]) if "heldout_accuracy" in meta else None,
                         "reference": "scikit-learn digits, held-out split", "reference_n": int(levels.shape[0]),
                         "fd": "Frechet distance of the feature Gaussians (float64, eigh square roots)",
                         "kid": f"unbiased MMD^2, cubic kernel, {KID_SUBSETS} subsets, jackknife s.e.",
                         "diversity": "entropy (nats) of the predicted class over the samples; log 10 = 2.303 if uniform"}

    def features(self, levels: torch.Tensor) -> torch.Tensor:
        """(N, 8, 8) levels -> (N, 64) float64 features."""
        with torch.no_grad():
            return torch.cat([self.net.features(levels[s : s + 4096].cpu()) for s in range(0, levels.shape[0], 4096)]).double()

    def classes(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 64) features -> (N,) the classifier's predicted digit."""
        with torch.no_grad():
            return self.net.head(features.float()).argmax(-1)

    def __call__(self, x: torch.Tensor) -> dict:
        from lsdtool import images

        return self.figures(self.features(images.levels_tensor(self.model, x).reshape(-1, 8, 8)))

    def figures(self, f: torch.Tensor) -> dict:
        """fd-digits, kid-digits (± s.e.) and the class entropy of sample features (N, 64)."""
        from lsdtool.metrics_image import frechet_distance, kid, statistics

        if f.shape[0] < 2:
            raise LsdError(f"{self.kind} needs at least 2 samples")
        mu, sigma = statistics(f)
        found = kid(f, self.reference, subsets=KID_SUBSETS)
        predicted = self.classes(f)
        return {"fd-digits": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma),
                "kid-digits": found["kid"], "kid-digits_se": found["kid_se"],
                "class_entropy": class_entropy(predicted)}


def fd_digits_metric(*, model, **_) -> DigitsEval:
    """Fréchet distance to the held-out digits in the digits classifier's features (not FID)."""
    return DigitsEval("fd-digits", model)


def kid_digits_metric(*, model, **_) -> DigitsEval:
    """Unbiased KID to the held-out digits in the digits classifier's features, with its jackknife s.e."""
    return DigitsEval("kid-digits", model)

