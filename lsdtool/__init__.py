"""lsd: learnable sampler distillation for discrete diffusion models.

The Python API (see README, "Python API"): :func:`load_model`, :func:`distill`, :func:`sample`,
:func:`sample_batches` and :class:`Sampler`; the engine's :func:`iterate` and its :class:`Step`; the
adapter contract :class:`DiffusionModel` (see docs/your-own-model.md). They are imported on first
use, so importing the package (and ``lsd --help``) does not import torch.
"""

from lsdtool.version import __version__

_API = ("load_model", "load_artifact", "distill", "sample", "sample_batches", "conditions", "Sampler")
_ELSEWHERE = {"iterate": "lsdtool.samplers", "Step": "lsdtool.samplers", "DiffusionModel": "lsdtool.models.base"}


def __getattr__(name):
    if name in _API:
        from lsdtool import api

        return getattr(api, name)
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module 'lsdtool' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API, *_ELSEWHERE])


__all__ = ["__version__", *_API, *_ELSEWHERE]
