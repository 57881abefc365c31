"""Model adapters and the registry: ``load(name_or_path)`` returns a :class:`DiffusionModel`."""

from __future__ import annotations

import os

from lsdtool.errors import LsdError

# Short names users type -> Hugging Face hub ids (None: embedded, needs no download; "countdown-net"
# is a checkpoint shipped inside the package, see locate.EMBEDDED_DIR).
REGISTRY: dict[str, str | None] = {
    "countdown": None,
    "countdown-net": None,
    "sedd-small": "louaaron/sedd-small",
    "sedd-medium": "louaaron/sedd-medium",
    "radd-lambda-dce": "JingyangOu/radd-lambda-dce",
    "radd-t-dce": "JingyangOu/radd-t-dce",
    "mdlm-owt": "kuleshov-group/mdlm-owt",
}


def load(name_or_path: str, device=None, offline: bool | None = None) -> DiffusionModel:
    """Load a model by short name, hub id or local directory, on ``device`` (default CPU)."""
    if name_or_path == "countdown":
        from lsdtool.models.countdown import CountdownModel

        model = CountdownModel()
    elif name_or_path in REGISTRY or os.path.isdir(name_or_path) or "/" in name_or_path:
        from lsdtool.models.pretrained import load_pretrained

        model = load_pretrained(name_or_path, offline=offline)
    else:
        identify(name_or_path)  # raises the one "unknown model" error
    # How to load this model again (an artifact records it, so `lsd sample --sampler` needs no --model).
    model.source = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path
    return model.to(device or "cpu")


def availability(name: str) -> tuple[str, bool]:
    """(source, usable offline now) for a registry name."""
    hub_id = REGISTRY[name]
    if hub_id is None:
        return "embedded", True
    from lsdtool.models.locate import cached_locally

    return hub_id, cached_locally(hub_id)


def identify(name_or_path: str, offline: bool | None = None) -> tuple[str, str]:
    """(name, fingerprint) of a model without loading it or importing torch."""
    if name_or_path == "countdown":
        from lsdtool.models.countdown_id import FINGERPRINT

        return "countdown", FINGERPRINT
    if name_or_path in REGISTRY or os.path.isdir(name_or_path) or "/" in name_or_path:
        from lsdtool.models.locate import locate

        found = locate(name_or_path, offline)
        return found.name, found.fingerprint
    raise LsdError(f"unknown model {name_or_path!r}: use one of {', '.join(REGISTRY)}, a hub id or a local directory")


def __getattr__(name):
    if name == "DiffusionModel":
        from lsdtool.models.base import DiffusionModel

        return DiffusionModel
    raise AttributeError(name)


__all__ = ["DiffusionModel", "REGISTRY", "availability", "identify", "load"]
