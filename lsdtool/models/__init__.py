"""Model adapters and loading: ``load(name_or_path)`` returns a :class:`DiffusionModel`.

The registry of names (:mod:`lsdtool.models.registry`), the table of families
(:mod:`lsdtool.models.families`), naming a checkpoint without loading it (:mod:`lsdtool.models.locate`)
and your own models (:mod:`lsdtool.models.own`: :func:`register`, MODULE:FACTORY) are torch-free;
loading imports torch.
"""

from __future__ import annotations

import os

from lsdtool.models import own
from lsdtool.models.locate import availability, find_tauldr, identify
from lsdtool.models.own import register
from lsdtool.models.registry import DOWNLOAD_ONLY, REGISTRY


def load(name_or_path: str, device=None, offline: bool | None = None, trust_remote_code: bool = False) -> DiffusionModel:
    """Load a model by short name, hub id, local directory, MODULE:FACTORY or registered name, on ``device``
    (default CPU); a transformers model that ships its own code loads only with ``trust_remote_code``."""
    from lsdtool.models import dllm

    if own.is_own(name_or_path):
        model = own.build(name_or_path)
        source = own.source(name_or_path)
    elif find_tauldr(name_or_path) is not None:  # a yaml config beside ckpt_*.pt: not a JSON-config family
        from lsdtool.models.tauldr import load_tauldr

        model = load_tauldr(name_or_path)
        source = name_or_path if name_or_path in REGISTRY else os.path.abspath(name_or_path)
    elif (found := dllm.find(name_or_path, offline)) is not None:  # a transformers masked diffusion LM
        model = dllm.load(name_or_path, found, trust_remote_code=trust_remote_code, device=device)
        source = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path
    else:
        from lsdtool.models.loading import load_located

        model = load_located(name_or_path, offline=offline)
        source = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path
    # How to load this model again (an artifact records it, so `lsd sample --sampler` needs no --model).
    model.source = source
    return model.to(device or "cpu")


def __getattr__(name):
    if name == "DiffusionModel":
        from lsdtool.models.base import DiffusionModel

        return DiffusionModel
    raise AttributeError(name)


__all__ = ["DiffusionModel", "DOWNLOAD_ONLY", "REGISTRY", "availability", "identify", "load", "register"]
