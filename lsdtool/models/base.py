"""The adapter contract every model meets (DESIGN §3)."""

from __future__ import annotations

import torch

from lsdtool.diffusion import Graph, Noise


class DiffusionModel:
    """A frozen discrete diffusion model seen through its log concrete score.

    Attributes: ``name`` (short name stored in artifacts), ``graph`` (a :class:`lsdtool.diffusion.Graph`
    that says where the mask is, if any; a name, "absorb" or "uniform", is read with ``mask_id``),
    ``vocab_size`` V (mask included), ``seq_len`` L, ``noise`` (a :class:`Noise`),
    ``fingerprint`` (architecture + weights), ``task`` (the ``task`` key of a checkpoint's config), ``device``.
    """

    name: str
    graph: Graph | str
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
        """The mask token id (None without one): the graph's, or V - 1 for a model that names an absorbing graph."""
        if isinstance(self.graph, Graph):
            return self.graph.mask_id
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
