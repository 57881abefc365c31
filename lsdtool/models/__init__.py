"""Model adapters and loading: ``load(name_or_path)`` returns a :class:`DiffusionModel`.

The registry of names (:mod:`lsdtool.models.registry`) and naming a checkpoint without loading it
(:mod:`lsdtool.models.locate`) are torch-free; loading imports torch.
"""

from __future__ import annotations

import os

from lsdtool.models.locate import availability, identify, is_checkpoint_name
from lsdtool.models.registry import REGISTRY


def load(name_or_path: str, device=None, offline: bool | None = None, trust_remote_code: bool = False) -> DiffusionModel:
    """Load a model by short name, hub id or local directory, on ``device`` (default CPU); a transformers model
    that ships its own code loads only with ``trust_remote_code``."""
    from lsdtool.models import dllm

    source = dllm.find(name_or_path, offline) if name_or_path != "countdown" else None
    if name_or_path == "countdown":
        from lsdtool.models.countdown import CountdownModel

        model = CountdownModel()
    elif source is not None:
        model = dllm.load(name_or_path, source, trust_remote_code=trust_remote_code, device=device)
    elif is_checkpoint_name(name_or_path):
        from lsdtool.models.loading import load_pretrained

        model = load_pretrained(name_or_path, offline=offline)
    else:
        identify(name_or_path)  # raises the one "unknown model" error
    # How to load this model again (an artifact records it, so `lsd sample --sampler` needs no --model).
    model.source = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path
    return model.to(device or "cpu")


def __getattr__(name):
    if name == "DiffusionModel":
        from lsdtool.models.base import DiffusionModel

        return DiffusionModel
    raise AttributeError(name)


__all__ = ["DiffusionModel", "REGISTRY", "availability", "identify", "load"]
