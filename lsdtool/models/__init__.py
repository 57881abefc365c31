"""Model adapters and loading: ``load(name_or_path)`` returns a :class:`DiffusionModel`.

The registry of names (:mod:`lsdtool.models.registry`) and naming a checkpoint without loading it
(:mod:`lsdtool.models.locate`) are torch-free; loading imports torch.
"""

from __future__ import annotations

import os

from lsdtool.models.locate import availability, find_tauldr, identify, is_checkpoint_name
from lsdtool.models.registry import DOWNLOAD_ONLY, REGISTRY


def load(name_or_path: str, device=None, offline: bool | None = None) -> DiffusionModel:
    """Load a model by short name, hub id or local directory, on ``device`` (default CPU)."""
    if name_or_path == "countdown":
        from lsdtool.models.countdown import CountdownModel

        model = CountdownModel()
    elif find_tauldr(name_or_path) is not None:
        from lsdtool.models.tauldr import load_tauldr

        model = load_tauldr(name_or_path)
    elif is_checkpoint_name(name_or_path):
        from lsdtool.models.loading import load_pretrained

        model = load_pretrained(name_or_path, offline=offline)
    else:
        identify(name_or_path)  # raises the one "unknown model" error
    # How to load this model again (an artifact records it, so `lsd sample --sampler` needs no --model).
    model.source = os.path.abspath(name_or_path) if os.path.exists(name_or_path) else name_or_path
    return model.to(device or "cpu")


def __getattr__(name):
    if name == "DiffusionModel":
        from lsdtool.models.base import DiffusionModel

        return DiffusionModel
    raise AttributeError(name)


__all__ = ["DiffusionModel", "DOWNLOAD_ONLY", "REGISTRY", "availability", "identify", "load"]
