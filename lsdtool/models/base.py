"""The adapter contract every model meets (DESIGN §3)."""

from __future__ import annotations

import torch

from lsdtool.diffusion import Noise


class DiffusionModel:
    """A frozen discrete diffusion model seen through its log concrete score.

    Attributes: ``name`` (short name stored in artifacts), ``graph`` ("absorb" | "uniform"),
    ``vocab_size`` V (mask included), ``seq_len`` L, ``noise`` (a :class:`Noise`),
    ``fingerprint`` (architecture + weights), ``task`` (the ``task`` key of a checkpoint's config), ``device``.
    """

    name: str
    graph: str
    vocab_size: int
    seq_len: int
    noise: Noise
    fingerprint: str
    task: str | None = None  # what the data is, when the model says (``countdown``: scored by its rule)
    device: torch.device = torch.device("cpu")

    def log_score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log s_theta(x_t, t): x (B, L) long, t (B,) -> (B, L, V), 0 at the current token; differentiable in t."""
        raise NotImplementedError

    @property
    def mask_id(self) -> int | None:
        return self.vocab_size - 1 if self.graph == "absorb" else None

    @property
    def has_tokenizer(self) -> bool:
        return False

    def decode(self, tokens: list[int]) -> str | None:
        """Text of one sample, or None where the model has no tokenizer."""
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids of a conditioning string."""
        raise ValueError(f"model {self.name} has no tokenizer to encode text with")

    def to(self, device) -> "DiffusionModel":
        self.device = torch.device(device)
        return self
