"""The sampler engine (DESIGN §5): time grids, step rules and the one loop every command uses.

A reverse step from time t to s < t turns the model's log concrete score into per-position
categorical probabilities and draws from them:

- ``euler``:   p = onehot(x) + (t - s) sigma'(t) R_hat(x, Phi s)
- ``tweedie``: p = staggered(Phi s, dsigma) * transp_transition(x, dsigma), dsigma = sigma_bar(t) - sigma_bar(s)

``Phi`` is the step's coefficient: in ``score`` mode it multiplies the concrete score (LSD eq. 5),
in ``temperature`` mode it multiplies the log score. The score at the current token stays 1 in
both modes, so Phi = 1 is the plain sampler. Negative mass (a step too large for Euler) is
clamped to 0 and rows are renormalised. Only rows that can move are built (masked rows for
absorb), in float64, in chunks, and drawn by inverse CDF from counter-based uniforms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from lsdtool import rng
from lsdtool.diffusion import Graph, Noise, make_graph

BASES = ("euler", "tweedie")
MODES = ("score", "temperature")
DEFAULT_EPS = 1e-5
_CHUNK_ELEMS = 1 << 24  # float64 elements per row chunk: bounds memory for V = 50k vocabularies


def uniform_grid(steps: int, t_max: float = 1.0, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """SEDD's grid linspace(t_max, eps, steps + 1) as (steps + 1,) float64."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return torch.linspace(t_max, eps, steps + 1, dtype=torch.float64)


@dataclass
class Sampler:
    """A few-step sampler: grid tau_0 > ... > tau_M, coefficients Phi_k, base rule and Phi mode."""

    timesteps: torch.Tensor  # (M+1,) float64, strictly decreasing
    coeffs: torch.Tensor  # (M,) float64
    base: str = "euler"
    mode: str = "score"
    denoise: bool = False  # one extra model call at tau_M (SEDD's final denoise step)
    meta: dict = field(default_factory=dict)

    @classmethod
    def plain(cls, steps: int, base: str = "euler", mode: str = "score", denoise: bool = False) -> "Sampler":
        """The untrained sampler: uniform grid, Phi = 1."""
        return cls(uniform_grid(steps), torch.ones(steps, dtype=torch.float64), base, mode, denoise)

    @property
    def steps(self) -> int:
        return int(self.coeffs.shape[0])

    @property
    def nfe(self) -> int:
        return self.steps + int(self.denoise)

    def check(self) -> None:
        """Raise ValueError unless the grid and coefficients describe a valid sampler."""
        ts, cs = self.timesteps, self.coeffs
        if self.base not in BASES:
            raise ValueError(f"unknown base {self.base!r} (expected one of {', '.join(BASES)})")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r} (expected one of {', '.join(MODES)})")
        if ts.ndim != 1 or cs.ndim != 1 or ts.shape[0] != cs.shape[0] + 1 or cs.shape[0] < 1:
            raise ValueError(f"timesteps {tuple(ts.shape)} and coeffs {tuple(cs.shape)} do not match (need M+1 and M, M >= 1)")
        if not (torch.isfinite(ts).all() and torch.isfinite(cs).all()):
            raise ValueError("timesteps or coeffs contain NaN or inf")
        if not (ts[1:] < ts[:-1]).all():
            raise ValueError("timesteps are not strictly decreasing")
        if ts[-1] <= 0 or ts[0] > 1:
            raise ValueError(f"timesteps must lie in (0, 1], got {ts[0].item():g} .. {ts[-1].item():g}")
        if self.mode == "score" and not (cs > 0).all():
            raise ValueError("score-mode coefficients must be positive")


def _as_rows(v, n: int, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,)/(B,1) time or coefficient to (n,) float64 on like's device."""
    v = torch.as_tensor(v, dtype=torch.float64, device=like.device).reshape(-1)
    return v.expand(n) if v.numel() == 1 else v


def scaled_score(log_score: torch.Tensor, x: torch.Tensor, coeff: torch.Tensor, mode: str) -> torch.Tensor:
    """Phi-scaled concrete score rows (R, V) float64, 1 at the current token; coeff (R,)."""
    ls = log_score.to(torch.float64)
    if mode == "temperature":
        ls = ls * coeff[:, None]
        score = torch.exp(ls)
    else:
        score = torch.exp(ls) * coeff[:, None]
    return score.scatter(-1, x[:, None], 1.0)


def _normalise(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp_min(0.0)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-300)


def step_rows(graph: Graph, noise: Noise, log_score, x, t, s, base="euler", coeff=1.0, mode="score", final=False):
    """Probabilities (R, V) float64 of one step t -> s for R rows: log_score (R, V), x/t/s/coeff (R,).

    ``final`` drops the mask column for absorb, so every remaining mask is filled.
    """
    n = x.shape[0]
    t, s, coeff = _as_rows(t, n, x), _as_rows(s, n, x), _as_rows(coeff, n, x)
    score = scaled_score(log_score, x, coeff, mode)
    if base == "euler":
        dt_rate = (t - s) * noise.rate(t)
        p = F.one_hot(x, graph.vocab_size).to(torch.float64) + dt_rate[:, None] * graph.reverse_rate(x, score)
    elif base == "tweedie":
        dsigma = noise.total(t) - noise.total(s)
        p = graph.staggered_score(score, dsigma) * graph.transp_transition(x, dsigma)
    else:
        raise ValueError(f"unknown base {base!r}")
    if final and graph.absorbing:
        p = p[:, :-1]
    return _normalise(p)


def denoise_rows(graph: Graph, noise: Noise, log_score, x, t):
    """SEDD's final denoise probabilities (R, V') float64: a Tweedie step of size sigma_bar(t), mask dropped."""
    n = x.shape[0]
    sigma = noise.total(_as_rows(t, n, x))
    score = scaled_score(log_score, x, torch.ones(n, dtype=torch.float64, device=x.device), "score")
    p = graph.staggered_score(score, sigma) * graph.transp_transition(x, sigma)
    return _normalise(p[:, :-1] if graph.absorbing else p)


def _graph(model) -> Graph:
    return make_graph(model.graph, model.vocab_size)


def _rows_call(fn, model, log_score, x, *args, **kw):
    b, l, v = log_score.shape
    out = fn(_graph(model), model.noise, log_score.reshape(b * l, v), x.reshape(-1), *args, **kw)
    return out.reshape(b, l, -1)


def _per_position(v, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample (B,) / (B, 1) value repeated for each of the L positions -> (B*L,)."""
    v = torch.as_tensor(v, dtype=torch.float64, device=x.device).reshape(-1)
    if v.numel() == 1:
        return v
    return v[:, None].expand(x.shape[0], x.shape[1]).reshape(-1)


def transition_probs(model, log_score, x, t, s, base="euler", coeff=1.0, mode="score", final=False):
    """(B, L, V) float64 probabilities of the step t -> s; log_score (B, L, V), x (B, L), t/s (B,)."""
    return _rows_call(step_rows, model, log_score, x, _per_position(t, x), _per_position(s, x), base,
                      _per_position(coeff, x), mode, final)


def denoise_probs(model, log_score, x, t):
    """(B, L, V') float64 probabilities of the final denoise step at t (mask column dropped for absorb)."""
    return _rows_call(denoise_rows, model, log_score, x, _per_position(t, x))


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF categorical draw in float64: probs (R, V), u (R,) uniforms -> (R,) long."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def start_state(model, index: torch.Tensor, seed: int) -> torch.Tensor:
    """x at t = 1: all mask for absorb, uniform tokens (from the sample's own stream) for uniform; (B, L)."""
    b, l = index.shape[0], model.seq_len
    if model.graph == "absorb":
        return torch.full((b, l), model.vocab_size - 1, dtype=torch.long, device=index.device)
    u = rng.uniforms(seed, rng.STREAM_START, index, 0, l)
    return (u * model.vocab_size).long().clamp_max(model.vocab_size - 1)


@dataclass
class Step:
    """What one engine step saw: k, times t/s (scalars), state before and after, the model's log score."""

    k: int
    t: torch.Tensor
    s: torch.Tensor
    x: torch.Tensor  # (B, L) before the step
    log_score: torch.Tensor  # (B, L, V) at (x, t)
    x_next: torch.Tensor  # (B, L) after the step
    final: bool


def advance(model, rows_fn, log_score, x, draws, fixed=None, *args, **kw) -> torch.Tensor:
    """Draw new tokens at the rows that can move (and are not fixed); other rows keep their token.

    ``draws`` = (seed, index (B,), step): the uniform of row (i, j) is a hash of
    (seed, index[i], step, j), computed only for the rows that move.
    """
    graph = _graph(model)
    moving = graph.moving(x)
    if fixed is not None:
        moving = moving & ~fixed
    idx = moving.reshape(-1).nonzero().squeeze(-1)
    x_flat = x.reshape(-1).clone()
    if idx.numel() == 0:
        return x_flat.reshape(x.shape)
    seed, index, step = draws
    v, l = log_score.shape[-1], x.shape[1]
    ls_flat = log_score.reshape(-1, v)
    chunk = max(1, _CHUNK_ELEMS // v)
    for start in range(0, idx.numel(), chunk):
        rows = idx[start : start + chunk]
        probs = rows_fn(graph, model.noise, ls_flat[rows].detach(), x_flat[rows], *args, **kw)
        u = rng.uniforms_at(seed, rng.STREAM_STEP, index[rows // l], step, rows % l)
        x_flat[rows] = draw(probs, u)
    return x_flat.reshape(x.shape)


def iterate(model, sampler: Sampler, index: torch.Tensor, seed: int, x_init=None, fixed=None,
            grad: bool = False, timesteps=None) -> Iterator[Step]:
    """Run the sampler, yielding a :class:`Step` after each model call (the one engine loop).

    index (B,) global sample ids; x_init (B, L) start state (default :func:`start_state`); fixed (B, L)
    bool positions that never change; ``timesteps`` overrides the grid (a differentiable tensor when
    ``grad``, so the log scores keep their graph to the time input).
    """
    device = index.device
    x = start_state(model, index, seed) if x_init is None else x_init.to(device)
    ts = sampler.timesteps if timesteps is None else timesteps
    coeffs = sampler.coeffs.detach().to(device=device, dtype=torch.float64)
    b, m = x.shape[0], sampler.steps
    for k in range(m):
        t, s = ts[k], ts[k + 1]
        final = k == m - 1 and not sampler.denoise
        with torch.set_grad_enabled(grad):
            log_score = model.log_score(x, t.to(device=device, dtype=torch.float32).expand(b))
        x_next = advance(model, step_rows, log_score, x, (seed, index, k), fixed, t.detach().double().to(device),
                         s.detach().double().to(device), sampler.base, coeffs[k], sampler.mode, final)
        yield Step(k, t, s, x, log_score, x_next, final)
        x = x_next
    if sampler.denoise:
        t = ts[m]
        with torch.set_grad_enabled(grad):
            log_score = model.log_score(x, t.to(device=device, dtype=torch.float32).expand(b))
        x_next = advance(model, denoise_rows, log_score, x, (seed, index, m), fixed, t.detach().double().to(device))
        yield Step(m, t, t, x, log_score, x_next, True)


def sample(model, sampler: Sampler, index: torch.Tensor, seed: int, x_init=None, fixed=None,
           callback: Callable[[Step], None] | None = None) -> torch.Tensor:
    """Final tokens (B, L) of the samples with global ids ``index`` (B,)."""
    x = x_init if x_init is not None else None
    with torch.no_grad():
        for step in iterate(model, sampler, index, seed, x_init, fixed):
            if callback is not None:
                callback(step)
            x = step.x_next
    return x
