"""The adapter contract every model meets (DESIGN §3)."""

from __future__ import annotations

import torch

from lsdtool.diffusion import Graph, Noise, graph_of


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
        """log s_theta(x_t, t): x (B, L) long (any L), t (B,) -> (B, L, V), 0 at the current token; differentiable
        in t. A model that predicts x0 implements :meth:`x0_log_probs` instead and gets this from its graph."""
        if type(self).x0_log_probs is DiffusionModel.x0_log_probs:
            raise NotImplementedError(f"{type(self).__name__} implements neither log_score nor x0_log_probs")
        graph = graph_of(self)
        return graph.log_score_from_x0(self.x0_log_probs(x, t), x, self.noise.total(t))

    def x0_log_probs(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_theta(x0 | x_t) over the real tokens: x (B, L), t (B,) -> (B, L, n_real); from :meth:`log_score`
        unless the model predicts x0 itself."""
        if type(self).log_score is DiffusionModel.log_score:
            raise NotImplementedError(f"{type(self).__name__} implements neither log_score nor x0_log_probs")
        return graph_of(self).x0_from_log_score(self.log_score(x, t), x, self.noise.total(t))

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
