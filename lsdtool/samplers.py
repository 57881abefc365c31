"""The sampler engine (DESIGN §5): time grids, step rules and the one loop every command uses.

A reverse step from time t to s < t turns the model's log concrete score into per-position
categorical probabilities and draws from them:

- ``euler``:   p = onehot(x) + (t - s) sigma'(t) R_hat(x, Phi s)
- ``tweedie``: p = staggered(Phi s, dsigma) * transp_transition(x, dsigma), dsigma = sigma_bar(t) - sigma_bar(s)
- ``count`` (absorb only): fixed-count random order; step k unmasks exactly n_k masked positions, chosen
  uniformly by a per-sample random order, each drawn from the model's distribution with the mask column
  dropped. n_k follows the masked fraction alpha(t) = 1 - e^{-sigma_bar(t)} of the grid with cumulative
  rounding (:func:`count_schedule`), so the counts add up to the number of masked positions.
- ``theta-trapezoidal`` (Ren et al. 2025, two model calls per step): stage 1 is a tau-leaping step
  t -> rho = t - theta (t - s) with the rates R at (x, t); stage 2 goes rho -> s from the stage-1 state x*
  with the rates (alpha_1 R(x*, rho) - alpha_2 R(x, t))_+, alpha_1 = 1 / (2 theta (1 - theta)),
  alpha_2 = ((1 - theta)^2 + theta^2) / (2 theta (1 - theta)). The two stages together integrate a rate
  that is linear in time exactly (second order); with theta = 1/2 it is 2 R* - R over the second half.
  Both stages are Poisson (tau-leaping) steps: with intensities Lambda_y = h R_y a position jumps with
  probability 1 - e^{-sum Lambda}, to y in proportion to Lambda_y (:func:`tau_leap_probs`).

``Phi`` is the step's coefficient: in ``score`` mode it multiplies the concrete score (LSD eq. 5),
in ``temperature`` mode it multiplies the log score. The score at the current token stays 1 in
both modes, so Phi = 1 is the plain sampler. Negative mass (a step too large for Euler) is
clamped to 0 and rows are renormalised. Only rows that can move are touched (masked rows for
absorb), in chunks, and drawn by inverse CDF from counter-based uniforms. For absorbing models a
masked row under euler, tweedie, count or the denoise step moves iff u Z < (its total jump mass), so
the decision needs one float32 exp-sum pass over the row (redone in float64 near the threshold) and
only the rows that move get a float64 CDF: the same token as the full-row draw for the same uniform.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from lsdtool import artifacts, rng, steprules
from lsdtool.diffusion import Graph, Noise, make_graph
from lsdtool.grids import grid_problem, options_problem

THETA = 0.5  # theta of the theta-trapezoidal rule
DEFAULT_EPS = 1e-5
_CHUNK_ELEMS = 1 << 24  # float64 elements per row chunk: bounds memory for V = 50k vocabularies


def uniform_grid(steps: int, t_max: float = 1.0, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """SEDD's grid linspace(t_max, eps, steps + 1) as (steps + 1,) float64."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return torch.linspace(t_max, eps, steps + 1, dtype=torch.float64)


def power_grid(steps: int, rho: float, t_max: float = 1.0, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """tau_k = eps + (t_max - eps) (1 - k/M)^rho: rho = 1 is :func:`uniform_grid`, rho > 1 takes big steps
    early (high noise) and small ones near the end."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    u = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return eps + (t_max - eps) * u**rho


@dataclass
class Sampler:
    """A few-step sampler: grid tau_0 > ... > tau_M, coefficients Phi_k, base rule and Phi mode."""

    timesteps: torch.Tensor  # (M+1,) float64, strictly decreasing
    coeffs: torch.Tensor  # (M,) float64
    base: str = "euler"
    mode: str = "score"
    denoise: bool = False  # one extra model call at tau_M (SEDD's final denoise step)
    meta: dict = field(default_factory=dict)  # artifact metadata: model, recipe, fit, ... (strings)
    options: dict = field(default_factory=dict)  # the base rule's options (lsdtool.adaptive: temperature, score, gamma)
    path: Path | None = field(default=None, compare=False)  # the artifact it was loaded from or saved to

    @classmethod
    def plain(cls, steps: int, base: str = "euler", mode: str = "score", denoise: bool = False,
              options: dict | None = None) -> "Sampler":
        """The untrained sampler: uniform grid, Phi = 1."""
        return cls(uniform_grid(steps), torch.ones(steps, dtype=torch.float64), base, mode, denoise, options=dict(options or {}))

    @classmethod
    def load(cls, path: str | Path, model=None, force: bool = False) -> "Sampler":
        """The sampler of an artifact, validated; with ``model``, also checked to fit it (``force``
        accepts an artifact distilled for another model of the same graph)."""
        meta, ts, cs = artifacts.read(path)
        if model is not None:
            artifacts.check_model(meta, model, path, force)
        return cls(torch.tensor(ts, dtype=torch.float64), torch.tensor(cs, dtype=torch.float64), meta["base"],
                   meta["mode"], meta.get("denoise") == "true", meta=meta, path=Path(path),
                   options=json.loads(meta.get("options") or "{}"))

    def save(self, path: str | Path) -> Path:
        """Write the artifact atomically (tensors and metadata); returns the path."""
        self.path = artifacts.save(path, self)
        return self.path

    @property
    def fit(self) -> dict:
        """The fit report of a distilled sampler (losses, time, device), {} for others; kept once, as the
        artifact's JSON ``meta["fit"]``, and parsed on each access."""
        return json.loads(self.meta.get("fit") or "{}")

    def __repr__(self) -> str:
        """One line: kind, base rule, steps, NFE, model and path (the metadata stays in ``.meta``)."""
        kind = ("lsd+" if self.meta.get("plus") == "true" else "lsd") if self.meta.get("fit") else "plain"
        parts = [kind, self.base + ("" if self.mode == "score" else f":{self.mode}"), f"steps={self.steps}", f"nfe={self.nfe}"]
        parts += [f"model={self.meta['model']}"] if self.meta.get("model") else []
        parts += [f"path={str(self.path)!r}"] if self.path is not None else []
        return f"Sampler({', '.join(parts)})"

    @property
    def steps(self) -> int:
        return int(self.coeffs.shape[0])

    @property
    def nfe(self) -> int:
        """Model calls: every step's calls (two for two-stage rules) plus the optional denoise call (for
        entropy-bound the most a sample can make; it stops once its masks are filled)."""
        return self.steps * steprules.rule(self.base).calls + int(self.denoise)

    def check(self) -> None:
        """Raise ValueError unless the grid and coefficients describe a valid sampler."""
        ts, cs = self.timesteps, self.coeffs
        if ts.ndim != 1 or cs.ndim != 1:
            raise ValueError(f"timesteps {tuple(ts.shape)} and coeffs {tuple(cs.shape)} must be vectors")
        problem = grid_problem(ts.tolist(), cs.tolist(), self.base, self.mode)
        problem = problem or options_problem(self.base, self.options)
        if problem:
            raise ValueError(problem)


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


def _masked_rows(noise: Noise, log_score, t, s, base, coeff, mode, final):
    """Euler and Tweedie on masked rows of an absorbing model in closed form: p_y = c Phi s_y (y < M),
    p_M = 1 - c sum_y Phi s_y, with c = (t - s) sigma'(t) (Euler) or e^{dsigma} - 1 (Tweedie). The
    same numbers as the general rule without its one-hot and scatter passes over V."""
    ls = log_score[:, :-1].to(torch.float64)
    score = torch.exp(ls * coeff[:, None]) if mode == "temperature" else torch.exp(ls) * coeff[:, None]
    if final:
        return _normalise(score)
    c = (t - s) * noise.rate(t) if base == "euler" else torch.expm1(noise.total(t) - noise.total(s))
    jump = c[:, None] * score
    return _normalise(torch.cat([jump, 1 - jump.sum(-1, keepdim=True)], -1))


def step_rows(graph: Graph, noise: Noise, log_score, x, t, s, base="euler", coeff=1.0, mode="score", final=False):
    """Probabilities (R, V) float64 of one step t -> s for R rows: log_score (R, V), x/t/s/coeff (R,).

    ``final`` drops the mask column for absorb, so every remaining mask is filled.
    """
    n = x.shape[0]
    t, s, coeff = _as_rows(t, n, x), _as_rows(s, n, x), _as_rows(coeff, n, x)
    if graph.absorbing and base in ("euler", "tweedie") and bool((x == graph.vocab_size - 1).all()):
        return _masked_rows(noise, log_score, t, s, base, coeff, mode, final)
    score = scaled_score(log_score, x, coeff, mode)
    if base == "count":  # the model's distribution over real tokens (mask dropped): used on the chosen rows only
        if not graph.absorbing:
            raise ValueError("the count sampler needs an absorbing model")
        masked = (x == graph.vocab_size - 1)[:, None]
        stay = F.one_hot(x.clamp_max(graph.vocab_size - 2), graph.vocab_size - 1).to(torch.float64)
        return _normalise(torch.where(masked, score[:, :-1], stay))
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


_STEP_ROWS_SIGNATURE = inspect.signature(step_rows)


def denoise_rows(graph: Graph, noise: Noise, log_score, x, t):
    """SEDD's final denoise probabilities (R, V') float64: a Tweedie step of size sigma_bar(t), mask dropped."""
    n = x.shape[0]
    sigma = noise.total(_as_rows(t, n, x))
    score = scaled_score(log_score, x, torch.ones(n, dtype=torch.float64, device=x.device), "score")
    p = graph.staggered_score(score, sigma) * graph.transp_transition(x, sigma)
    return _normalise(p[:, :-1] if graph.absorbing else p)


def trapezoidal_alphas(theta: float = THETA) -> tuple[float, float]:
    """(alpha_1, alpha_2) of the theta-trapezoidal rule; alpha_1 - alpha_2 = 1 for every theta."""
    if not 0 < theta < 1:
        raise ValueError(f"theta must lie in (0, 1), got {theta}")
    d = 2 * theta * (1 - theta)
    return 1 / d, ((1 - theta) ** 2 + theta**2) / d


def _jump_rates(graph: Graph, noise: Noise, log_score, x, t, coeff, mode) -> torch.Tensor:
    """Off-diagonal reverse rates sigma'(t) Q^T(x, .) (Phi s) out of each row's token; 0 at the token itself."""
    rate = graph.transp_rate(x) * scaled_score(log_score, x, coeff, mode)
    return (noise.rate(t)[:, None] * rate).scatter(-1, x[:, None], 0.0)


def tau_leap_probs(graph: Graph, intensity: torch.Tensor, x: torch.Tensor, final: bool = False) -> torch.Tensor:
    """A Poisson (tau-leaping) step as (R, V) probabilities: ``intensity`` (R, V) holds the expected
    number of jumps to each token over the step (>= 0, 0 at the current token). The row keeps its
    token with probability e^{-sum}, else jumps to y in proportion to intensity_y (the first of the
    Poisson events). ``final`` drops the mask column for absorb, so every remaining mask is filled."""
    total = intensity.sum(-1, keepdim=True)
    jump = -torch.expm1(-total) / total.clamp_min(1e-300)
    p = (intensity * jump).scatter(-1, x[:, None], torch.exp(-total))
    if final and graph.absorbing:
        return _normalise(torch.where(total > 0, intensity, p)[:, :-1])
    return _normalise(p)


def tau_leap_rows(graph: Graph, noise: Noise, log_score, x, t, s, coeff=1.0, mode="score", final=False):
    """Stage 1 of the theta-trapezoidal rule: a tau-leaping step t -> s with the rates of (x, t)."""
    n = x.shape[0]
    t, s, coeff = _as_rows(t, n, x), _as_rows(s, n, x), _as_rows(coeff, n, x)
    rate = _jump_rates(graph, noise, log_score, x, t, coeff, mode)
    return tau_leap_probs(graph, (t - s)[:, None] * rate, x, final)


def trapezoidal_rows(graph: Graph, noise: Noise, log_score, x, log_score_start, x_start, t, rho, s,
                     coeff=1.0, mode="score", final=False, theta: float = THETA):
    """Stage 2 of the theta-trapezoidal rule, rho -> s, as (R, V) float64 probabilities.

    ``log_score``/``x`` are the model's output and the token at the stage-1 state (time rho);
    ``log_score_start``/``x_start`` those at the start of the step (time t). A jump to token y is
    taken at rate (alpha_1 R(x*, rho)_y - alpha_2 R(x, t)_y)_+ for (1 - theta)(t - s); jumps are indexed
    by (position, target token), and a target equal to the stage-1 token is no jump. Negative rates
    are clamped to 0 (the positive part of the rule); the step is a Poisson step (:func:`tau_leap_probs`).
    For absorbing models a masked row is masked at both stages, so both rates leave the same state;
    for uniform models a row that jumped in stage 1 subtracts the start token's rate to the same target.
    """
    n = x.shape[0]
    t, rho, s, coeff = _as_rows(t, n, x), _as_rows(rho, n, x), _as_rows(s, n, x), _as_rows(coeff, n, x)
    a1, a2 = trapezoidal_alphas(theta)
    rate = a1 * _jump_rates(graph, noise, log_score, x, rho, coeff, mode)
    rate = rate - a2 * _jump_rates(graph, noise, log_score_start, x_start, t, coeff, mode)
    rate = rate.clamp_min(0.0).scatter(-1, x[:, None], 0.0)
    if final and graph.absorbing:  # every mask must be filled: where the rule leaves no rate, use R(x*, rho)
        fallback = _jump_rates(graph, noise, log_score, x, rho, coeff, mode)
        rate = torch.where(rate.sum(-1, keepdim=True) > 0, rate, fallback)
    return tau_leap_probs(graph, ((1 - theta) * (t - s))[:, None] * rate, x, final)


def count_schedule(noise: Noise, timesteps: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Masked positions left after each step of the count sampler: (B, M+1) long, column 0 = ``masked``.

    The masked fraction alpha(t) = 1 - e^{-sigma_bar(t)} is rescaled to run from 1 at tau_0 to 0 at
    tau_M; left_k = round(masked * alpha_k) (cumulative rounding), so step k unmasks
    n_k = left_k - left_{k+1} positions and the n_k add up to ``masked``.
    """
    ts = timesteps.detach().to(torch.float64).cpu()
    alpha = -torch.expm1(-noise.total(ts))
    frac = ((alpha - alpha[-1]) / (alpha[0] - alpha[-1]).clamp_min(1e-300)).clamp(0.0, 1.0)
    frac[0], frac[-1] = 1.0, 0.0
    left = torch.round(masked.detach().cpu().to(torch.float64)[:, None] * frac[None, :]).long()
    return left.cummin(-1).values.to(masked.device)


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
    stage: int = 0  # 0, or 1 for the second model call of a two-stage rule (theta-trapezoidal)
    rows: torch.Tensor | None = None  # (R,) the batch rows the model was called for (log_score is (R, L, V)); None: all


_GUARD = 1e-4  # relative band around a row's move threshold inside which the float32 row sum is redone in float64
_BLOCK_ELEMS = 1 << 20  # elements per block of a CPU row pass (at least 16 rows): its exp stays in cache for its sum


def _chunk_elems(device: torch.device) -> int:
    """Row-chunk size in elements: small on CPU (memory), large on a GPU (few kernel launches per step)."""
    return _CHUNK_ELEMS if device.type == "cpu" else _CHUNK_ELEMS * 8


def _masked_rule(noise: Noise, rows_fn, args, kw, device):
    """(scale, coeff, mode, final) when ``rows_fn`` on the masked rows of an absorbing model is the closed
    form of :func:`_masked_rows`: p_y = scale w_y (y < M) and p_M = 1 - scale sum_y w_y, or w normalised
    when ``final``, with w = e^{ls} and scale = c Phi (score mode) or w = e^{Phi ls} and scale = c
    (temperature mode); None when it is not (then :func:`advance` builds full rows).

    The count rule draws w normalised on its chosen rows, and SEDD's denoise step on a masked row is
    s e^{sigma} (1 - e^{-sigma}), i.e. the score normalised (Phi = 1, score mode)."""
    one = torch.ones((), dtype=torch.float64, device=device)
    if rows_fn is denoise_rows:
        return None, one, "score", True
    if rows_fn is not step_rows:
        return None
    a = _STEP_ROWS_SIGNATURE.bind(None, None, None, None, *args, **kw)
    a.apply_defaults()
    a = a.arguments
    base, mode = a["base"], a["mode"]
    coeff, t, s = (torch.as_tensor(a[k], dtype=torch.float64, device=device) for k in ("coeff", "t", "s"))
    if base not in ("euler", "tweedie", "count") or mode not in ("score", "temperature") or max(coeff.numel(), t.numel(), s.numel()) != 1:
        return None
    coeff, t, s = coeff.reshape(()), t.reshape(()), s.reshape(())
    if mode == "score" and not bool(coeff > 0):  # the general rule clamps a non-positive Phi
        return None
    if a["final"] or base == "count":
        return None, coeff, mode, True
    c = (t - s) * noise.rate(t) if base == "euler" else torch.expm1(noise.total(t) - noise.total(s))
    return (c * coeff if mode == "score" else c), coeff, mode, False


def _weights(ls: torch.Tensor, coeff: torch.Tensor, mode: str, out: torch.Tensor) -> torch.Tensor:
    """w = e^{ls} (score) or e^{Phi ls} (temperature) into ``out`` (same shape as ls)."""
    if out.dtype != ls.dtype:  # the product and exp in out's precision
        out.copy_(ls)
        return (out.mul_(coeff) if mode == "temperature" else out).exp_()
    if mode == "temperature":
        return torch.mul(ls, coeff.to(out.dtype), out=out).exp_()
    return torch.exp(ls, out=out)


def _row_blocks(rows: torch.Tensor, width: int):
    """Slices of ``rows`` small enough for one cache-sized pass (the whole of them on a GPU)."""
    n = rows.numel()
    size = max(16, _BLOCK_ELEMS // width) if rows.device.type == "cpu" else max(1, _chunk_elems(rows.device) // width)
    return [slice(b, min(n, b + size)) for b in range(0, n, size)]


def _gather(real: torch.Tensor, rows: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """real[rows] without a copy when the rows are consecutive (checked on CPU only: on a GPU the check
    would wait for the device), else gathered into ``buf``."""
    n = rows.numel()
    if rows.device.type == "cpu":
        first = int(rows[0])
        if int(rows[-1]) - first + 1 == n:
            return real[first : first + n]
    return torch.index_select(real, 0, rows, out=buf[:n])


def _row_sums(real: torch.Tensor, rows: torch.Tensor, coeff, mode: str, dtype) -> torch.Tensor:
    """sum_y w_y (R,) float64 over the real tokens of ``rows``, the exp and sum computed in ``dtype``."""
    width = real.shape[1]
    out = torch.empty(rows.numel(), dtype=torch.float64, device=real.device)
    blocks = _row_blocks(rows, width)
    gather = torch.empty(blocks[0].stop, width, dtype=real.dtype, device=real.device)
    work = gather if dtype == real.dtype else torch.empty(blocks[0].stop, width, dtype=dtype, device=real.device)
    for b in blocks:
        ls = _gather(real, rows[b], gather)
        out[b] = _weights(ls, coeff, mode, work[: ls.shape[0]]).sum(-1)
    return out


def _draw_masked(real: torch.Tensor, rows: torch.Tensor, u: torch.Tensor, rule) -> torch.Tensor:
    """Tokens (R,) drawn at masked rows by the closed form (:func:`_masked_rule`); ``real`` (N, V-1) holds the
    log scores of the real tokens, ``rows`` (R,) the rows to draw, ``u`` (R,) their uniforms.

    The same draw as :func:`draw` on the full row [scale w, 1 - scale sum w] (stay last): with
    Z = max(scale sum w, 1), the row moves iff u Z < scale sum w, and then takes the first y whose
    cumulative w exceeds u Z / scale. So a row's move decision needs only its total, summed in float32
    and redone in float64 within a relative band of the threshold (and where float32 under- or
    overflows), and only the rows that move get a float64 CDF."""
    scale, coeff, mode, final = rule
    if final:
        move = torch.ones_like(u, dtype=torch.bool)
    else:
        total = _row_sums(real, rows, coeff, mode, torch.float32)
        jump = scale * total
        zed = jump.clamp_min(1.0)
        unsure = ((u * zed - jump).abs() <= _GUARD * zed) | ~torch.isfinite(total) | (total < 1e-30)
        if bool(unsure.any()):
            total[unsure] = _row_sums(real, rows[unsure], coeff, mode, torch.float64)
            jump = scale * total
            zed = jump.clamp_min(1.0)
        move = u * zed < jump
    tokens = torch.full_like(rows, real.shape[1])  # the mask id: rows that stay
    pick = move.nonzero().squeeze(-1)
    if pick.numel() == 0:
        return tokens
    width = real.shape[1]
    sel = rows[pick]
    blocks = _row_blocks(sel, width)
    gather = torch.empty(blocks[0].stop, width, dtype=real.dtype, device=real.device)
    cdf_buf = torch.empty(blocks[0].stop, width, dtype=torch.float64, device=real.device)
    found = torch.empty_like(sel)
    for b in blocks:
        ls = _gather(real, sel[b], gather)
        cdf = _weights(ls, coeff, mode, cdf_buf[: ls.shape[0]]).cumsum_(-1)
        total = cdf[:, -1] if final else torch.maximum(cdf[:, -1], 1 / scale)  # Z / scale, from the float64 sum
        goal = u[pick[b]] * total
        found[b] = torch.searchsorted(cdf, goal[:, None], right=True).squeeze(-1)
    tokens[pick] = found.clamp_max(width - 1)
    return tokens


def advance(model, rows_fn, log_score, x, draws, fixed=None, *args, row_inputs=(), **kw) -> torch.Tensor:
    """Draw new tokens at the rows that can move (and are not fixed); other rows keep their token.

    ``draws`` = (seed, index (B,), step[, stream]): the uniform of row (i, j) is a hash of
    (seed, stream, index[i], step, j) (stream defaults to ``rng.STREAM_STEP``), computed only for the
    rows that move. ``row_inputs`` are further (B, L, ...) tensors whose moving rows are passed to
    ``rows_fn`` right after the token rows (e.g. the start-of-step state of a two-stage rule).
    """
    graph = _graph(model)
    moving = graph.moving(x)
    if fixed is not None:
        moving = moving & ~fixed
    idx = moving.reshape(-1).nonzero().squeeze(-1)
    x_flat = x.reshape(-1).clone()
    if idx.numel() == 0:
        return x_flat.reshape(x.shape)
    seed, index, step = draws[:3]
    stream = draws[3] if len(draws) > 3 else rng.STREAM_STEP
    v, l = log_score.shape[-1], x.shape[1]
    ls_flat = log_score.reshape(-1, v)
    rule = _masked_rule(model.noise, rows_fn, args, kw, x.device) if graph.absorbing and not row_inputs else None
    if rule is not None:  # moving rows are masked rows: decide from row totals, build rows only where they move
        real = ls_flat.detach()[:, :-1]
        chunk = max(1, _chunk_elems(x.device) // v)
        for start in range(0, idx.numel(), chunk):
            rows = idx[start : start + chunk]
            u = rng.uniforms_at(seed, stream, index[rows // l], step, rows % l)
            x_flat[rows] = _draw_masked(real, rows, u, rule)
        return x_flat.reshape(x.shape)
    extra_flat = [r.reshape(x_flat.shape[0], *r.shape[2:]) for r in row_inputs]
    chunk = max(1, _CHUNK_ELEMS // v)
    for start in range(0, idx.numel(), chunk):
        rows = idx[start : start + chunk]
        extra = [r[rows].detach() for r in extra_flat]
        probs = rows_fn(graph, model.noise, ls_flat[rows].detach(), x_flat[rows], *extra, *args, **kw)
        u = rng.uniforms_at(seed, stream, index[rows // l], step, rows % l)
        x_flat[rows] = draw(probs, u)
    return x_flat.reshape(x.shape)


@dataclass
class Run:
    """One engine run as the step functions of :mod:`lsdtool.steprules` see it."""

    model: object
    sampler: Sampler
    index: torch.Tensor  # (B,) global sample ids
    seed: int
    fixed: torch.Tensor | None  # (B, L) bool positions that never change
    grad: bool
    timesteps: torch.Tensor  # (M+1,) the grid (differentiable when ``grad``)
    coeffs: torch.Tensor  # (M,) float64 on the run's device
    state: dict = field(default_factory=dict)  # what a rule keeps between its steps

    @property
    def device(self) -> torch.device:
        return self.index.device

    def call(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """The model's log score (B, L, V) at state x (B, L) and a scalar or (B,) time."""
        with torch.set_grad_enabled(self.grad):
            return self.model.log_score(x, time.to(device=self.device, dtype=torch.float32).expand(x.shape[0]))

    def times(self, k: int):
        """(t, s, t64, s64, final) of step k: the grid times and their float64 copies on the device."""
        t, s = self.timesteps[k], self.timesteps[k + 1]
        final = k == self.sampler.steps - 1 and not self.sampler.denoise
        return t, s, t.detach().double().to(self.device), s.detach().double().to(self.device), final

    def moving_masks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: masked positions that are not fixed."""
        masked = x == self.model.vocab_size - 1
        return masked if self.fixed is None else masked & ~self.fixed


def one_call_step(run: Run, k: int, x: torch.Tensor) -> Iterator[Step]:
    """Euler and Tweedie: one model call, every movable row drawn from :func:`step_rows`."""
    t, s, t64, s64, final = run.times(k)
    log_score = run.call(x, t)
    x_next = advance(run.model, step_rows, log_score, x, (run.seed, run.index, k), run.fixed, t64, s64,
                     run.sampler.base, run.coeffs[k], run.sampler.mode, final)
    yield Step(k, t, s, x, log_score, x_next, final)


def count_step(run: Run, k: int, x: torch.Tensor) -> Iterator[Step]:
    """Count: move exactly the n_k masked positions that come first in the sample's random order."""
    model = run.model
    if k == 0:
        run.state["left"] = count_schedule(model.noise, run.timesteps, run.moving_masks(x).sum(-1))  # (B, M+1)
        run.state["order"] = rng.uniforms(run.seed, rng.STREAM_ORDER, run.index, 0, x.shape[1])  # one order per sample
    t, s, t64, s64, final = run.times(k)
    log_score = run.call(x, t)
    still = run.moving_masks(x)
    n_k = (still.sum(-1) - run.state["left"][:, k + 1]).clamp_min(0)
    rank = torch.where(still, run.state["order"], 2.0).argsort(-1).argsort(-1)
    hold = ~(still & (rank < n_k[:, None]))
    x_next = advance(model, step_rows, log_score, x, (run.seed, run.index, k), hold if run.fixed is None else hold | run.fixed,
                     t64, s64, "count", run.coeffs[k], run.sampler.mode, True)
    yield Step(k, t, s, x, log_score, x_next, final)


def trapezoidal_step(run: Run, k: int, x: torch.Tensor) -> Iterator[Step]:
    """Theta-trapezoidal: a tau-leaping stage to rho, then the trapezoidal stage to s (two model calls)."""
    model, mode = run.model, run.sampler.mode
    t, s, t64, s64, final = run.times(k)
    log_score = run.call(x, t)
    rho = t - THETA * (t - s)
    rho64 = rho.detach().double().to(run.device)
    x_mid = advance(model, tau_leap_rows, log_score, x, (run.seed, run.index, k), run.fixed, t64, rho64,
                    run.coeffs[k], mode, False)
    yield Step(k, t, rho, x, log_score, x_mid, False, 0)
    log_score_mid = run.call(x_mid, rho)
    x_next = advance(model, trapezoidal_rows, log_score_mid, x_mid, (run.seed, run.index, k, rng.STREAM_STAGE), run.fixed,
                     t64, rho64, s64, run.coeffs[k], mode, final, row_inputs=(log_score, x))
    yield Step(k, rho, s, x_mid, log_score_mid, x_next, final, 1)


def iterate(model, sampler: Sampler, index: torch.Tensor, seed: int, x_init=None, fixed=None,
            grad: bool = False, timesteps=None) -> Iterator[Step]:
    """Run the sampler, yielding a :class:`Step` after each model call (the one engine loop).

    index (B,) global sample ids; x_init (B, L) start state (default :func:`start_state`); fixed (B, L)
    bool positions that never change; ``timesteps`` overrides the grid (a differentiable tensor when
    ``grad``, so the log scores keep their graph to the time input). Each step is taken by the base
    rule's step function from :mod:`lsdtool.steprules`.
    """
    device = index.device
    rule = steprules.rule(sampler.base)
    if rule.absorbing_only and model.graph != "absorb":
        raise ValueError(f"the {rule.name} sampler needs an absorbing model; {getattr(model, 'name', 'this model')} is {model.graph}")
    step_fn = rule.step_function()
    x = start_state(model, index, seed) if x_init is None else x_init.to(device)
    ts = sampler.timesteps if timesteps is None else timesteps
    coeffs = sampler.coeffs.detach().to(device=device, dtype=torch.float64)
    run = Run(model, sampler, index, seed, fixed, grad, ts, coeffs)
    m = sampler.steps
    for k in range(m):
        for step in step_fn(run, k, x):  # a rule may make no call at step k (entropy-bound, all filled)
            yield step
            x = step.x_next
            del step  # else its (B, L, V) scores stay alive through the next model call
    if sampler.denoise:
        t = ts[m]
        log_score = run.call(x, t)
        x_next = advance(model, denoise_rows, log_score, x, (seed, index, m), fixed, t.detach().double().to(device))
        yield Step(m, t, t, x, log_score, x_next, True)


def sample(model, sampler: Sampler, index: torch.Tensor, seed: int, x_init=None, fixed=None,
           callback: Callable[[Step], None] | None = None) -> torch.Tensor:
    """Final tokens (B, L) of the samples with global ids ``index`` (B,)."""
    x = None
    with torch.no_grad():
        for step in iterate(model, sampler, index, seed, x_init, fixed):
            if callback is not None:
                callback(step)
            x = step.x_next
            del step  # the next model call must not overlap this step's (B, L, V) scores
    return x
