"""Checkpoint-backed adapters: the shared adapter base, and loading from the hub cache or a local directory.

A model is a directory holding ``config.json`` and one weight file (``model.safetensors`` or
``pytorch_model.bin``). Hub ids resolve through the Hugging Face cache, never running remote code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lsdtool.errors import LsdError
from lsdtool.models.base import DiffusionModel
from lsdtool.models.ddit import freeze, load_weights
from lsdtool.models.locate import HUB_ID, cached_locally, family_name, first_line, locate, read_config  # noqa: F401

GPT2_TOKENS = 50257
MASK_TEXT, UNKNOWN_TEXT = "[MASK]", "[UNK]"

_tokenizer_state: dict = {}


def gpt2_tokenizer():
    """The GPT-2 tokenizer from the Hugging Face cache, loaded once; None (said once on stderr) if absent."""
    if "tokenizer" not in _tokenizer_state:
        try:
            from transformers import AutoTokenizer

            _tokenizer_state["tokenizer"] = AutoTokenizer.from_pretrained("gpt2", local_files_only=True)
        except Exception:
            _tokenizer_state["tokenizer"] = None
            print("lsd: the GPT-2 tokenizer is not in the Hugging Face cache; emitting token ids instead of text",
                  file=sys.stderr)
    return _tokenizer_state["tokenizer"]


class PretrainedModel(DiffusionModel):
    """An adapter around a frozen torch network ``net``; text through GPT-2 when the vocabulary is GPT-2's."""

    family: str
    weight_prefix = ""  # stripped from checkpoint keys before loading

    def __init__(self, net: torch.nn.Module, *, name: str, fingerprint: str, graph: str, vocab_size: int,
                 seq_len: int, noise):
        self.net = net
        self.name, self.fingerprint = name, fingerprint
        self.graph, self.vocab_size, self.seq_len, self.noise = graph, int(vocab_size), int(seq_len), noise
        self.device = torch.device("cpu")

    def to(self, device) -> "PretrainedModel":
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def sigma_bar(self, t, batch: int) -> torch.Tensor:
        """Total noise (B,) at t given as a scalar, (B,) or (B, 1); differentiable in t."""
        t = torch.as_tensor(t, device=self.device)
        t = t if t.is_floating_point() else t.float()
        return self.noise.total(t.reshape(-1).expand(batch))

    @property
    def n_tokens(self) -> int:
        """Number of real tokens (the mask excluded)."""
        return self.vocab_size - (self.graph == "absorb")

    def _tokenizer(self):
        return gpt2_tokenizer() if self.n_tokens == GPT2_TOKENS else None

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer() is not None

    def decode(self, tokens) -> str | None:
        """Text of one sample; the mask and ids GPT-2 lacks show as placeholders."""
        tok = self._tokenizer()
        if tok is None:
            return None
        parts, run = [], []
        for v in (int(v) for v in tokens):
            if 0 <= v < GPT2_TOKENS:
                run.append(v)
                continue
            if run:
                parts.append(tok.decode(run))
                run = []
            parts.append(MASK_TEXT if v == self.mask_id else UNKNOWN_TEXT)
        if run:
            parts.append(tok.decode(run))
        return "".join(parts)

    def encode(self, text: str) -> list[int]:
        tok = self._tokenizer()
        if tok is None:
            raise ValueError(f"model {self.name} has no GPT-2 tokenizer available to encode text with")
        return list(tok.encode(text))


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


def family_of(config: dict, path: Path) -> type[PretrainedModel]:
    """The adapter class for a config (see :func:`locate.family_name`)."""
    from lsdtool.models.mdlm import MDLM
    from lsdtool.models.radd import RADD
    from lsdtool.models.sedd import SEDD

    return {"mdlm": MDLM, "sedd": SEDD, "radd": RADD}[family_name(config, path)]


# --- loading -----------------------------------------------------------------------------------


def load_pretrained(name_or_path: str, offline: bool | None = None) -> DiffusionModel:
    """A SEDD, RADD or MDLM adapter from a registry short name, a hub id or a local directory (on CPU)."""
    found = locate(name_or_path, offline)
    config = read_config(found.config_path)
    cls = family_of(config, found.config_path)
    with torch.device("meta"):  # parameters are assigned from the checkpoint, never initialised
        try:
            model = cls(config, name=found.name, fingerprint=found.fingerprint)
        except (KeyError, TypeError, ValueError) as e:
            why = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else first_line(e)
            raise LsdError(f"{found.config_path} is not a valid {cls.family.upper()} config: {why}") from None
    state = read_weights(found.weight_path)
    prefix = cls.weight_prefix
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    load_weights(model.net, state, str(found.weight_path))
    freeze(model.net)
    task = config.get("task")
    model.task = str(task) if task is not None else None
    return model
