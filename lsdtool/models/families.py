"""The one table of model families (torch-free): how a checkpoint is recognised and what builds it.

A checkpoint is a directory (local, in the hub cache, or embedded in the package under
``models/embedded/<name>``) holding a JSON config and, for most families, one weight file. Each
row says which config file to read, how to recognise that family's config (rows are tried in
order), which weight files it takes (none: the model is defined by its code, and ``fingerprint``
names it) and which function builds the adapter, as ``"module:function"`` imported only when a
model is loaded: ``build(config: dict, found: Located) -> DiffusionModel``. A new family is one
row here plus its adapter module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lsdtool.errors import LsdError
from lsdtool.models.countdown_id import FINGERPRINT as COUNTDOWN_FINGERPRINT

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Family:
    name: str  # also the prefix of a local checkpoint's fingerprint (``sedd:sha256:...``)
    label: str  # how messages name it
    recognise: Callable[[dict], bool]  # config sniffing
    build: str  # "module:function", (config, Located) -> DiffusionModel
    config_file: str = "config.json"
    weight_files: tuple[str, ...] = WEIGHT_FILES  # the first present is loaded; () for a code-defined model
    fingerprint: str | None = None  # the fixed fingerprint of a code-defined model (no weight file to hash)


def _mdlm(config: dict) -> bool:
    """MDLM's Hugging Face config; it wins over the SEDD and RADD tests, which would also match a few."""
    return config.get("model_type") == "mdlm" or "model_length" in config


FAMILIES: tuple[Family, ...] = (
    Family("countdown", "countdown", lambda c: c.get("model_type") == "countdown", "lsdtool.models.countdown:build",
           weight_files=(), fingerprint=COUNTDOWN_FINGERPRINT),
    Family("sedd", "SEDD", lambda c: "graph" in c and not _mdlm(c), "lsdtool.models.sedd:build"),
    Family("radd", "RADD", lambda c: "tokens" in c and "model" in c and not _mdlm(c), "lsdtool.models.radd:build"),
    Family("mdlm", "MDLM", _mdlm, "lsdtool.models.mdlm:build"),
    # tauLDR keeps a yaml config beside ckpt_*.pt (or config/ and checkpoints/ of a training run): found by
    # that layout (locate.find_tauldr), never by sniffing a JSON config
    Family("tauldr", "tauLDR", lambda c: False, "lsdtool.models.tauldr:build", config_file="config.yaml", weight_files=()),
)
BY_NAME = {f.name: f for f in FAMILIES}
CONFIG_FILES = tuple(dict.fromkeys(f.config_file for f in FAMILIES if f.config_file.endswith(".json")))  # read in this order


def recognise(config: dict, path: Path) -> Family:
    """The first family whose test accepts ``config`` (read from ``path``); LsdError if none does."""
    for family in FAMILIES:
        if family.config_file == path.name and family.recognise(config):
            return family
    labels = [f.label for f in FAMILIES if f.weight_files]  # code-defined families are not checkpoint formats
    raise LsdError(f"{path} is not a {', '.join(labels[:-1])} or {labels[-1]} config")


def builder(family: Family) -> Callable:
    """The family's build function, imported now."""
    from lsdtool.plugins import import_object

    return import_object(family.build, "model family", "module:function")[0]
