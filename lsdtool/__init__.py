"""lsd: learnable sampler distillation for discrete diffusion models.

The Python API (see README, "Python API"): :func:`load_model`, :func:`distill`, :func:`sample`,
:func:`sample_batches` and :class:`Sampler`. They are imported on first use, so importing the package
(and ``lsd --help``) does not import torch.
"""

from lsdtool.version import __version__

_API = ("load_model", "load_artifact", "distill", "sample", "sample_batches", "conditions", "Sampler")


def __getattr__(name):
    if name in _API:
        from lsdtool import api

        return getattr(api, name)
    raise AttributeError(f"module 'lsdtool' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
