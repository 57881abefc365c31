"""Loading a located model into its adapter: the family's build function (:mod:`lsdtool.models.families`)
and, for the checkpoint families, reading their weights.

A model is a directory holding ``config.json`` and one weight file (``model.safetensors`` or
``pytorch_model.bin``). Hub ids resolve through the Hugging Face cache, never running remote code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lsdtool.errors import LsdError
from lsdtool.models.base import DiffusionModel
from lsdtool.models.ddit import freeze, load_weights
from lsdtool.models.families import builder
from lsdtool.models.locate import Located, first_line, locate
from lsdtool.models.pretrained import PretrainedModel


# --- reading a checkpoint ----------------------------------------------------------------------


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from safetensors or a weights-only torch pickle; LsdError naming the file otherwise."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LsdError(f"cannot load {path}: truncated, corrupt or not only tensors ({first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise LsdError(f"{path} does not hold a flat dictionary of named tensors")
    return state


# --- loading -----------------------------------------------------------------------------------


def load_located(name_or_path: str, offline: bool | None = None) -> DiffusionModel:
    """The adapter of a registry name, hub id or local directory (on CPU), built by its family's row."""
    found = locate(name_or_path, offline)
    return builder(found.family)(found.config, found)


def construct(cls, config: dict, found: Located, label: str):
    """``cls(config, name=..., fingerprint=...)`` on the meta device (the parameters are assigned from the
    checkpoint, never initialised); a config the adapter cannot read is one line naming the file."""
    with torch.device("meta"):
        try:
            return cls(config, name=found.name, fingerprint=found.fingerprint)
        except (KeyError, TypeError, ValueError) as e:
            why = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else first_line(e)
            raise LsdError(f"{found.config_path} is not a valid {label} config: {why}") from None


def load_checkpoint(cls: type[PretrainedModel], config: dict, found: Located) -> PretrainedModel:
    """A SEDD, RADD or MDLM adapter ``cls`` for ``config`` with the weights of ``found`` (frozen, on CPU)."""
    model = construct(cls, config, found, cls.family.upper())
    state = read_weights(found.weight_path)
    prefix = cls.weight_prefix
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    load_weights(model.net, state, str(found.weight_path))
    freeze(model.net)
    task = config.get("task")
    model.task = str(task) if task is not None else None
    return model
