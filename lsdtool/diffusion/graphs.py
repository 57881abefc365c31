"""Graphs of the forward CTMC (DESIGN §4, SEDD's graph_lib): what a model's tokens are and how they move.

A model owns its graph (``model.graph``): the graph's name and parameters, the mask id of an absorbing
graph (anywhere in the vocabulary), the real tokens, the start state and which positions a reverse step
can move. The rate and transition operations work on the graph's *canonical layout*: the real tokens in
the model's order, then the mask (the layout of SEDD, RADD and MDLM, where the mask is the last id). A
graph whose mask sits elsewhere maps scores and tokens into that layout and back
(:meth:`Graph.canonical_scores`, :meth:`Graph.to_canonical`, :meth:`Graph.from_canonical`), so the
engine computes one way for every layout and a permuted twin draws the same samples.

Row operations take ``x`` of shape (R,) (the current token of each row, canonical) and concrete scores
``score`` of shape (R, V) whose entry at the current token is 1 (log score 0), and return (R, V).
Per-row scalars (``dsigma``, ``sigma``) have shape (R,).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from lsdtool import rng


class Graph:
    """A forward graph over ``vocab_size`` tokens (mask included); ``mask_id`` None unless absorbing."""

    name: str
    mask_id: int | None = None

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    @property
    def params(self) -> dict:
        """The graph's parameters (JSON-able), recorded in artifacts and fingerprints."""
        return {}

    def describe(self) -> str:
        """``name`` alone for default parameters, else ``name`` plus the parameters as JSON (cache keys, fingerprints)."""
        extra = {k: v for k, v in self.params.items() if v != self._default_params().get(k)}
        return self.name if not extra else f"{self.name}{json.dumps(extra, sort_keys=True, separators=(',', ':'))}"

    def _default_params(self) -> dict:
        return {}

    @property
    def absorbing(self) -> bool:
        return self.mask_id is not None

    @property
    def n_real(self) -> int:
        """Number of real tokens (the mask excluded)."""
        return self.vocab_size - (self.mask_id is not None)

    @property
    def canonical(self) -> bool:
        """True when the model's layout is already canonical (no mask, or the mask last)."""
        return self.mask_id is None or self.mask_id == self.vocab_size - 1

    def canonical_graph(self) -> "Graph":
        """The twin of this graph in the canonical layout (itself when already canonical)."""
        return self

    def to_canonical(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (any shape, long) in the canonical layout."""
        return x

    def from_canonical(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids of the canonical layout back in the model's layout."""
        return x

    def canonical_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(..., V) columns in the canonical order (a copy only when the mask is not last)."""
        return scores

    def from_canonical_scores(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., V) columns of the canonical order back in the model's order; (..., n_real) rows (mask dropped)
        are already in order."""
        return rows

    def real_columns(self, scores: torch.Tensor) -> torch.Tensor:
        """(..., n_real) columns of the real tokens in order (a view when the mask is last or absent)."""
        return scores

    def real_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """The column of each real token id among :meth:`real_columns` (tokens any shape, long)."""
        return tokens

    def real_token(self, j: torch.Tensor) -> torch.Tensor:
        """The token id of real column j (inverse of :meth:`real_index`)."""
        return j

    def start_state(self, index: torch.Tensor, seed: int, length: int) -> torch.Tensor:
        """x at t = 1 for the samples with global ids ``index`` (B,): (B, length) long."""
        raise NotImplementedError

    def moving(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the positions a reverse step can change."""
        raise NotImplementedError

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

    def __eq__(self, other) -> bool:
        if isinstance(other, str):  # `model.graph == "absorb"` reads as it always did
            return self.name == other
        if not isinstance(other, Graph):
            return NotImplemented
        return (self.name, self.vocab_size, self.params) == (other.name, other.vocab_size, other.params)

    def __hash__(self) -> int:
        return hash((self.name, self.vocab_size, json.dumps(self.params, sort_keys=True)))

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        params = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(vocab_size={self.vocab_size}{params})"


class Absorb(Graph):
    """Absorbing graph: every token jumps to the mask at rate sigma'; the mask is ``mask_id`` (default V-1)."""

    name = "absorb"

    def __init__(self, vocab_size: int, mask_id: int | None = None):
        super().__init__(vocab_size)
        self.mask_id = self.vocab_size - 1 if mask_id is None else int(mask_id)
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask id {self.mask_id} lies outside the vocabulary 0..{self.vocab_size - 1}")
        if not self.canonical:
            m, v = self.mask_id, self.vocab_size
            self._perm = torch.tensor([*range(m), *range(m + 1, v), m])  # canonical column -> model id
            self._inverse = torch.argsort(self._perm)  # model id -> canonical column
            self._real = self._perm[:-1]

    @property
    def params(self) -> dict:
        return {"mask_id": self.mask_id}

    def _default_params(self) -> dict:
        return {"mask_id": self.vocab_size - 1}

    def canonical_graph(self) -> "Graph":
        return self if self.canonical else Absorb(self.vocab_size)

    def to_canonical(self, x):
        return x if self.canonical else self._inverse.to(x.device)[x]

    def from_canonical(self, x):
        return x if self.canonical else self._perm.to(x.device)[x]

    def canonical_scores(self, scores):
        return scores if self.canonical else scores.index_select(-1, self._perm.to(scores.device))

    def from_canonical_scores(self, rows):
        if self.canonical or rows.shape[-1] != self.vocab_size:
            return rows
        return rows.index_select(-1, self._inverse.to(rows.device))

    def real_columns(self, scores):
        if self.canonical:
            return scores[..., :-1]
        return scores.index_select(-1, self._real.to(scores.device))

    def real_index(self, tokens):
        return tokens if self.canonical else tokens - (tokens > self.mask_id).long()

    def real_token(self, j):
        return j if self.canonical else j + (j >= self.mask_id).long()

    def start_state(self, index, seed, length):
        """All mask."""
        return torch.full((index.shape[0], length), self.mask_id, dtype=torch.long, device=index.device)

    def transp_rate(self, x):
        edge = -F.one_hot(x, self.vocab_size).to(torch.float64)
        return edge + (x == self.vocab_size - 1).to(edge.dtype)[:, None]

    def staggered_score(self, score, dsigma):
        """s e^{dsigma}, plus (1 - e^{dsigma}) sum(s) on the mask entry (canonical: last)."""
        e = torch.exp(dsigma)[:, None]
        extra = (1 - e[:, 0]) * score.sum(-1)
        out = score * e
        out[:, -1] += extra
        return out

    def transp_transition(self, x, sigma):
        """e^{-sigma} onehot(x), plus (1 - e^{-sigma}) on every entry of rows where x = M (canonical: V-1)."""
        keep = torch.exp(-sigma)[:, None]
        edge = keep * F.one_hot(x, self.vocab_size).to(keep.dtype)
        return edge + torch.where(x == self.vocab_size - 1, 1 - keep[:, 0], 0.0)[:, None]

    def moving(self, x):
        return x == self.mask_id


class Uniform(Graph):
    """Uniform graph: every token jumps to a uniformly chosen token at rate sigma'."""

    name = "uniform"

    def start_state(self, index, seed, length):
        """Uniform tokens, from each sample's own stream."""
        u = rng.uniforms(seed, rng.STREAM_START, index, 0, length)
        return (u * self.vocab_size).long().clamp_max(self.vocab_size - 1)

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


GRAPHS: dict[str, type[Graph]] = {"absorb": Absorb, "uniform": Uniform}


def make_graph(kind: str, vocab_size: int, **params) -> Graph:
    """Build a graph from its name and parameters (e.g. ``mask_id`` for absorb); ``vocab_size`` includes the mask."""
    try:
        cls = GRAPHS[kind]
    except KeyError:
        raise ValueError(f"unknown graph {kind!r} (expected one of {', '.join(GRAPHS)})") from None
    return cls(vocab_size, **{k: v for k, v in params.items() if v is not None})


def graph_of(model) -> Graph:
    """The graph object of ``model``: ``model.graph`` itself, or built from a name (a model that declares
    ``graph = "absorb"``, and an int ``mask_id`` where its mask is not the last id)."""
    graph = model.graph
    if isinstance(graph, Graph):
        if graph.vocab_size != model.vocab_size:
            raise ValueError(f"the graph has {graph.vocab_size} tokens but the model's vocabulary is {model.vocab_size}")
        return graph
    mask = getattr(model, "mask_id", None) if graph == "absorb" else None
    return make_graph(graph, model.vocab_size, **({"mask_id": mask} if isinstance(mask, int) else {}))
