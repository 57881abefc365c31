"""The shared base of the checkpoint-backed adapters (SEDD, RADD, MDLM) and their GPT-2 tokenizer.

Loading a checkpoint into one of them is :mod:`lsdtool.models.loading`.
"""

from __future__ import annotations

import sys

import torch

from lsdtool.diffusion import make_graph
from lsdtool.models.base import DiffusionModel

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
        self.vocab_size, self.seq_len, self.noise = int(vocab_size), int(seq_len), noise
        self.graph = make_graph(graph, self.vocab_size)  # the mask, where there is one, is the last id (the families' layout)
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
        return self.graph.n_real

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
