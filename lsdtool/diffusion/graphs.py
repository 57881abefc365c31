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
from lsdtool.diffusion.noise import NEVER, log_expm1


class Graph:
    """A forward graph over ``vocab_size`` tokens (mask included); ``mask_id`` None unless absorbing."""

    name: str
    mask_id: int | None = None
    constant_rate: float | None = None  # Q(y -> x) when it is one number for every y != x (uniform: 1/N), else None

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    @property
    def params(self) -> dict:
        """The graph's parameters (JSON-able), recorded in artifacts and fingerprints."""
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

    def log_score_from_x0(self, log_p0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log s_y = log sum_x0 p(x0 | x) q_sigma(y | x0) / q_sigma(x | x0): log_p0 (B, L, n_real), x (B, L),
        sigma = sigma_bar(t) (B,) -> (B, L, V), 0 at the current token."""
        raise NotImplementedError

    def x0_from_log_score(self, log_score: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log p(x0 | x) (B, L, n_real) from a log score (B, L, V): the inverse of :meth:`log_score_from_x0`."""
        raise NotImplementedError

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
        """Q(y -> x) (R, V): the forward rate into each row's token from every y (diagonal: minus the row's out-rate)."""
        raise NotImplementedError

    def forward_rate(self, x: torch.Tensor) -> torch.Tensor:
        """Q(x -> y) (R, V) for y != x: the forward rates out of each row's token (0 at x)."""
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

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)

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

    def log_score_from_x0(self, log_p0, x, sigma):
        """At a mask log s_y = log p(y | x) - log(e^sigma - 1) (q(y | x0) = e^{-sigma} [y = x0], q(M | x0) =
        1 - e^{-sigma}); a real token never moves (NEVER off its own column)."""
        b, l, _ = log_p0.shape
        out = log_p0.new_full((b, l, self.vocab_size), NEVER)
        real = log_p0 - log_expm1(sigma).to(log_p0.dtype)[:, None, None]
        if self.canonical:
            out[..., :-1] = real
        else:
            out[..., self._real.to(out.device)] = real
        out[..., self.mask_id] = NEVER
        out = out.masked_fill((x != self.mask_id)[..., None], NEVER)
        return out.scatter(-1, x[..., None], 0.0)

    def x0_from_log_score(self, log_score, x, sigma):
        """At a mask p(y | x) is the score normalised over the real tokens; a real token is its own x0."""
        lp = torch.log_softmax(self.real_columns(log_score), -1)
        own = F.one_hot(self.real_index(x.clamp_max(self.vocab_size - 1)).clamp_max(self.n_real - 1), self.n_real)
        known = torch.where(own.bool(), 0.0, -torch.inf).to(lp.dtype)
        return torch.where((x == self.mask_id)[..., None], lp, known)

    def start_state(self, index, seed, length):
        """All mask."""
        return torch.full((index.shape[0], length), self.mask_id, dtype=torch.long, device=index.device)

    def transp_rate(self, x):
        edge = -F.one_hot(x, self.vocab_size).to(torch.float64)
        return edge + (x == self.vocab_size - 1).to(edge.dtype)[:, None]

    def forward_rate(self, x):
        """A real token jumps to the mask (canonical: last) at rate 1; the mask never leaves."""
        rate = torch.zeros(x.shape[0], self.vocab_size, dtype=torch.float64, device=x.device)
        rate[:, -1] = (x != self.vocab_size - 1).to(rate.dtype)
        return rate

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

    def __init__(self, vocab_size: int):
        super().__init__(vocab_size)
        self.constant_rate = 1.0 / self.vocab_size  # the reverse rates out of x are the scores over N

    def log_score_from_x0(self, log_p0, x, sigma):
        """q_sigma(y | x0) = e^{-sigma} [y = x0] + (1 - e^{-sigma}) / N, so with a = e^{-sigma}, b = (1 - a) / N:
        s_y = p(x) b / (a + b) + p(y) (a + b) / b + 1 - p(x) - p(y) for y != x."""
        p = log_p0.double().exp()
        a = torch.exp(-sigma.double())[:, None, None]
        b = (1 - a) / self.vocab_size
        px = p.gather(-1, x[..., None])
        score = px * b / (a + b) + p * (a + b) / b + (1 - px - p)
        return score.log().to(log_p0.dtype).scatter(-1, x[..., None], 0.0)

    def x0_from_log_score(self, log_score, x, sigma):
        """Inverting :meth:`log_score_from_x0`: s_y - 1 = (p(y) - p(x) a / (a + b)) a / b for y != x, so with
        S = sum_{y != x} (s_y - 1), p(x) = (1 - S b / a) / (1 + (N - 1) b / (a + b)) and
        p(y) = (s_y - 1 + p(x) a / (a + b)) b / a (clamped at 0 and renormalised for an inexact score)."""
        s = log_score.double().exp().scatter(-1, x[..., None], 1.0)
        a = torch.exp(-sigma.double())[:, None, None]
        b = (1 - a) / self.vocab_size
        total = (s - 1).sum(-1, keepdim=True)
        px = (1 - total * b / a) / (1 + (self.vocab_size - 1) * b / (a + b))
        p = ((s - 1 + px * a / (a + b)) * b / a).scatter(-1, x[..., None], px).clamp_min(0.0)
        return (p / p.sum(-1, keepdim=True)).log().to(log_score.dtype)

    def start_state(self, index, seed, length):
        """Uniform tokens, from each sample's own stream."""
        u = rng.uniforms(seed, rng.STREAM_START, index, 0, length)
        return (u * self.vocab_size).long().clamp_max(self.vocab_size - 1)

    def transp_rate(self, x):
        n = self.vocab_size
        edge = torch.full((x.shape[0], n), 1.0 / n, dtype=torch.float64, device=x.device)
        return edge.scatter(-1, x[:, None], -(n - 1) / n)

    def forward_rate(self, x):
        """1/N to every other token."""
        rate = torch.full((x.shape[0], self.vocab_size), 1.0 / self.vocab_size, dtype=torch.float64, device=x.device)
        return rate.scatter(-1, x[:, None], 0.0)

    def staggered_score(self, score, dsigma):
        """e^{dsigma} s + ((1 - e^{dsigma}) / N) sum(s)."""
        e = torch.exp(dsigma)[:, None]
        return e * score + (1 - e) / self.vocab_size * score.sum(-1, keepdim=True)

    def transition_parts(self, sigma):
        """(off, diag) of the transition over sigma (any shape): off = (1 - e^{-sigma}) / N off the diagonal,
        diag = 1 - (N - 1) off on it (so a row sums to 1); the step kernels use these very numbers."""
        off = (1 - torch.exp(-sigma)) / self.vocab_size
        return off, 1 - (self.vocab_size - 1) * off

    def transp_transition(self, x, sigma):
        """(1 - e^{-sigma}) / N off the diagonal, the rest of the row's mass on it."""
        off, diag = self.transition_parts(sigma[:, None])
        return off.expand(x.shape[0], self.vocab_size).clone().scatter(-1, x[:, None], diag)

    def moving(self, x):
        return torch.ones_like(x, dtype=torch.bool)


GRAPHS: dict[str, type[Graph]] = {"absorb": Absorb, "uniform": Uniform}  # "gaussian" joins from its own module


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
