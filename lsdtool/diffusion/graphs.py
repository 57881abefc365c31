"""Graphs of the forward CTMC, as row operations on (R, V) score rows (DESIGN §4, SEDD's graph_lib).

Every method takes ``x`` of shape (R,) (the current token of each row) and concrete scores
``score`` of shape (R, V) whose entry at the current token is 1 (log score 0), and returns (R, V).
Per-row scalars (``dsigma``, ``sigma``) have shape (R,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Graph:
    name: str
    absorbing: bool

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def reverse_rate(self, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """R_hat(x, s): the off-diagonal reverse rates, with the diagonal set to minus their sum."""
        rate = self.transp_rate(x) * score
        rate = rate.scatter(-1, x[:, None], 0.0)
        return rate.scatter(-1, x[:, None], -rate.sum(-1, keepdim=True))

    def transp_rate(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def staggered_score(self, score: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transp_transition(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def moving(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the positions a reverse step can change."""
        raise NotImplementedError


class Absorb(Graph):
    """Absorbing graph: every token jumps to the mask M = V-1 at rate sigma'."""

    name = "absorb"
    absorbing = True

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1

    def transp_rate(self, x):
        edge = -F.one_hot(x, self.vocab_size).to(torch.float64)
        return edge + (x == self.mask_id).to(edge.dtype)[:, None]

    def staggered_score(self, score, dsigma):
        """s e^{dsigma}, plus (1 - e^{dsigma}) sum(s) on the mask entry."""
        e = torch.exp(dsigma)[:, None]
        extra = (1 - e[:, 0]) * score.sum(-1)
        out = score * e
        out[:, -1] += extra
        return out

    def transp_transition(self, x, sigma):
        """e^{-sigma} onehot(x), plus (1 - e^{-sigma}) on every entry of rows where x = M."""
        keep = torch.exp(-sigma)[:, None]
        edge = keep * F.one_hot(x, self.vocab_size).to(keep.dtype)
        return edge + torch.where(x == self.mask_id, 1 - keep[:, 0], 0.0)[:, None]

    def moving(self, x):
        return x == self.mask_id


class Uniform(Graph):
    """Uniform graph: every token jumps to a uniformly chosen token at rate sigma'."""

    name = "uniform"
    absorbing = False
    mask_id = None

    def transp_rate(self, x):
        n = self.vocab_size
        edge = torch.full((x.shape[0], n), 1.0 / n, dtype=torch.float64, device=x.device)
        return edge.scatter(-1, x[:, None], -(n - 1) / n)

    def staggered_score(self, score, dsigma):
        """e^{dsigma} s + ((1 - e^{dsigma}) / N) sum(s)."""
        e = torch.exp(dsigma)[:, None]
        return e * score + (1 - e) / self.vocab_size * score.sum(-1, keepdim=True)

    def transp_transition(self, x, sigma):
        """(1 - e^{-sigma}) / N off the diagonal, the rest of the row's mass on it."""
        n = self.vocab_size
        off = (1 - torch.exp(-sigma))[:, None] / n
        trans = off.expand(x.shape[0], n).clone()
        trans = trans.scatter(-1, x[:, None], 0.0)
        return trans.scatter(-1, x[:, None], 1 - trans.sum(-1, keepdim=True))

    def moving(self, x):
        return torch.ones_like(x, dtype=torch.bool)


def make_graph(kind: str, vocab_size: int) -> Graph:
    """Build a graph from its name (``absorb`` or ``uniform``); ``vocab_size`` includes the mask."""
    if kind == "absorb":
        return Absorb(vocab_size)
    if kind == "uniform":
        return Uniform(vocab_size)
    raise ValueError(f"unknown graph {kind!r} (expected absorb or uniform)")
