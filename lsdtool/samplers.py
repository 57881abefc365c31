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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from lsdtool import allocator, artifacts, rng, steprules
from lsdtool.blocks import greedy_rows, guided, layout
from lsdtool.diffusion import Graph, Noise, graph_of
from lsdtool.kernels import (CHUNK_ELEMS, Categorical, Kernel, MaskedCategorical, PoissonJumps, StayOrJump, chunk_elems,
                             chunk_rows, decide_rows, decision_dtypes, denoise_kernel, draw, masked_kernel, normalise, take_rows)
from lsdtool.grids import grid_problem, options_problem

THETA = 0.5  # theta of the theta-trapezoidal rule
DEFAULT_EPS = 1e-5
MIN_T = 0.01  # tau-leaping: the grid's last model time and the final argmax's (tauLDR's CIFAR-10 min_t)
CORRECTOR_ENTRY, CORRECTOR_STEPS, CORRECTOR_SIZE = 0.1, 10, 1.5  # tau-leaping-pc: tauLDR's CIFAR-10 settings


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
        """The untrained sampler: the rule's plain grid (SEDD's uniform one unless the rule names another), Phi = 1."""
        options = dict(options or {})
        rule = steprules.rule(base)
        grid = steprules._resolve(rule.grid)(steps, options) if rule.grid else uniform_grid(steps)
        return cls(grid, torch.ones(steps, dtype=torch.float64), base, mode, denoise, options=options)

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

    def __eq__(self, other) -> bool:
        """Same values: grid, coefficients, rule, mode, denoise, options and metadata (``path`` is not compared)."""
        if not isinstance(other, Sampler):
            return NotImplemented
        same = (self.base, self.mode, self.denoise, self.options, self.meta) == \
            (other.base, other.mode, other.denoise, other.options, other.meta)
        return same and all(a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu())
                            for a, b in ((self.timesteps, other.timesteps), (self.coeffs, other.coeffs)))

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
        return steprules.rule(self.base).nfe(self)

    def check(self) -> None:
        """Raise ValueError unless the grid and coefficients describe a valid sampler."""
        ts, cs = self.timesteps, self.coeffs
        if ts.ndim != 1 or cs.ndim != 1:
            raise ValueError(f"timesteps {tuple(ts.shape)} and coeffs {tuple(cs.shape)} must be vectors")
        problem = grid_problem(ts.tolist(), cs.tolist(), self.base, self.mode)
        problem = problem or options_problem(self.base, self.options, self.steps)
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


def _masked_rows(noise: Noise, log_score, t, s, base, coeff, mode, final):
    """Euler and Tweedie on masked rows of an absorbing model in closed form: p_y = c Phi s_y (y < M),
    p_M = 1 - c sum_y Phi s_y, with c = (t - s) sigma'(t) (Euler) or e^{dsigma} - 1 (Tweedie). The
    same numbers as the general rule without its one-hot and scatter passes over V."""
    ls = log_score[:, :-1].to(torch.float64)
    score = torch.exp(ls * coeff[:, None]) if mode == "temperature" else torch.exp(ls) * coeff[:, None]
    if final:
        return normalise(score)
    c = (t - s) * noise.rate(t) if base == "euler" else torch.expm1(noise.total(t) - noise.total(s))
    jump = c[:, None] * score
    return normalise(torch.cat([jump, 1 - jump.sum(-1, keepdim=True)], -1))


def stay_or_jump_kernel(graph: Graph, noise: Noise, t, s, base, coeff, mode, final,
                        positive: bool | None = None) -> StayOrJump | None:
    """The fast-decision kernel of an euler step on a graph whose reverse rates out of x are one constant
    times the score (``graph.constant_rate``, uniform: 1/N), or of a tweedie step on the uniform graph, or
    None where it does not apply. ``positive``:
    whether Phi > 0, when the caller knows it without asking the device."""
    rate = graph.constant_rate
    coeff, t, s = (torch.as_tensor(v, dtype=torch.float64) for v in (coeff, t, s))
    tweedie = base == "tweedie" and graph.name == "uniform"
    if rate is None or not (base == "euler" or tweedie) or mode not in ("score", "temperature") or \
            max(coeff.numel(), t.numel(), s.numel()) != 1:
        return None
    coeff, t, s = coeff.reshape(()), t.reshape(()), s.reshape(())
    if mode == "score" and not (bool(coeff > 0) if positive is None else positive):
        return None
    exact = Categorical(step_rows, (t, s, base, coeff, mode, final))
    if tweedie:
        dsigma = noise.total(t) - noise.total(s)
        return StayOrJump(None, coeff, mode, exact, rate, None, (torch.exp(dsigma), *graph.transition_parts(dsigma)))
    dt_rate = (t - s) * noise.rate(t)
    c = dt_rate * rate
    return StayOrJump(c * coeff if mode == "score" else c, coeff, mode, exact, rate, dt_rate)


def step_rows(graph: Graph, noise: Noise, log_score, x, t, s, base="euler", coeff=1.0, mode="score", final=False):
    """Probabilities (R, V) float64 of one step t -> s for R rows: log_score (R, V), x/t/s/coeff (R,).

    ``final`` drops the mask column for absorb, so every remaining mask is filled.
    """
    n = x.shape[0]
    t, s, coeff = _as_rows(t, n, x), _as_rows(s, n, x), _as_rows(coeff, n, x)
    if graph.absorbing and base in ("euler", "tweedie") and bool((x == graph.mask_id).all()):
        return _masked_rows(noise, log_score, t, s, base, coeff, mode, final)
    score = scaled_score(log_score, x, coeff, mode)
    if base == "count":  # the model's distribution over real tokens (mask dropped): used on the chosen rows only
        if not graph.absorbing:
            raise ValueError("the count sampler needs an absorbing model")
        masked = (x == graph.mask_id)[:, None]
        stay = F.one_hot(x.clamp_max(graph.vocab_size - 2), graph.vocab_size - 1).to(torch.float64)
        return normalise(torch.where(masked, score[:, :-1], stay))
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
    return normalise(p)


def denoise_rows(graph: Graph, noise: Noise, log_score, x, t):
    """SEDD's final denoise probabilities (R, V') float64: a Tweedie step of size sigma_bar(t), mask dropped."""
    n = x.shape[0]
    sigma = noise.total(_as_rows(t, n, x))
    score = scaled_score(log_score, x, torch.ones(n, dtype=torch.float64, device=x.device), "score")
    p = graph.staggered_score(score, sigma) * graph.transp_transition(x, sigma)
    return normalise(p[:, :-1] if graph.absorbing else p)


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
        return normalise(torch.where(total > 0, intensity, p)[:, :-1])
    return normalise(p)


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


def even_schedule(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Masked positions left after each of ``steps`` even steps: (B, M+1) long, column 0 = ``masked`` (B,).

    Step k unmasks masked // M positions, one more for the first masked % M steps (LLaDA's
    get_num_transfer_tokens, diffusers' even split): L = 10 in 4 steps unmasks [3, 3, 2, 2]."""
    k = torch.arange(steps, device=masked.device)
    n = masked[:, None] // steps + (k[None, :] < (masked % steps)[:, None]).long()
    return torch.cat([masked[:, None], masked[:, None] - n.cumsum(-1)], -1)


def unmask_schedule(run: "Run", masked: torch.Tensor) -> torch.Tensor:
    """Masked positions left after each step (B, M+1) under the sampler's ``counts`` option: the grid's
    masked fraction (:func:`count_schedule`, default) or an even split (:func:`even_schedule`)."""
    if run.sampler.options.get("counts", "noise") == "even":
        return even_schedule(masked, run.sampler.steps)
    return count_schedule(run.model.noise, run.timesteps, masked)


def commit_counts(run, k: int, still: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_k (B,), open (B, L) bool): how many positions step k of the count or confidence rule commits and which
    masked positions compete: all of them, or those of the step's block (:mod:`lsdtool.blocks`)."""
    where = layout(run.sampler.options, still.shape[1])
    if where is None:
        if k == 0:
            run.state["left"] = unmask_schedule(run, still.sum(-1))  # (B, M+1)
        return (still.sum(-1) - run.state["left"][:, k + 1]).clamp_min(0), still
    start, block, n_blocks = where
    per = run.sampler.steps // n_blocks
    b, i = divmod(k, per)
    window = torch.zeros(still.shape[1], dtype=torch.bool, device=still.device)
    window[start + b * block : start + (b + 1) * block] = True
    open_ = still & window
    if i == 0:
        masked = open_.sum(-1)
        if run.sampler.options.get("counts", "even") == "even":
            run.state["left"] = even_schedule(masked, per)
        else:
            run.state["left"] = count_schedule(run.model.noise, run.timesteps[b * per : (b + 1) * per + 1], masked)
    return (open_.sum(-1) - run.state["left"][:, i + 1]).clamp_min(0), open_


def _rows_call(fn, model, log_score, x, *args, **kw):
    """``fn`` on every position's row, in the canonical layout; (B, L, V') back in the model's layout."""
    graph = graph_of(model)
    b, l, v = log_score.shape
    out = fn(graph.canonical_graph(), model.noise, graph.canonical_scores(log_score.reshape(b * l, v)),
             graph.to_canonical(x.reshape(-1)), *args, **kw)
    return graph.from_canonical_scores(out).reshape(b, l, -1)


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


def start_state(model, index: torch.Tensor, seed: int) -> torch.Tensor:
    """x at t = 1 (B, L): the graph's start (all mask for absorb, uniform tokens from each sample's own stream)."""
    return graph_of(model).start_state(index, seed, model.seq_len)


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


def row_uniforms(seed: int, stream: int, index: torch.Tensor, step: int, length: int, rows: torch.Tensor,
                 within: torch.Tensor | None = None) -> torch.Tensor:
    """The uniforms of flat rows (R,) of a (B, length) state: row (i, j)'s (R,), a hash of (seed, stream,
    index[i], step, j); or one per (i, j, level) (R, S) for ``within`` levels (1, S)."""
    if within is None:
        return rng.uniforms_at(seed, stream, index[rows // length], step, rows % length)
    pos = (rows % length)[:, None] * within.numel() + within
    return rng.uniforms_at(seed, stream, index[rows // length][:, None], step, pos)


def advance(model, kernel: Kernel, log_score, x, draws, fixed=None, row_inputs=()) -> torch.Tensor:
    """Draw new tokens by ``kernel`` at the rows that can move (and are not fixed); other rows keep their token.

    ``draws`` = (seed, index (B,), step[, stream]): the uniform of row (i, j) is a hash of
    (seed, stream, index[i], step, j) (stream defaults to ``rng.STREAM_STEP``), computed only for the
    rows that move. ``row_inputs`` are further (B, L, ...) tensors (log scores or tokens) whose moving rows
    are passed to a categorical kernel right after the token rows (e.g. the start-of-step state of a
    two-stage rule). Kernels see rows in the graph's canonical layout; drawn tokens come back in the model's.
    """
    graph = graph_of(model)
    moving = graph.moving(x)
    if fixed is not None:
        moving = moving & ~fixed
    idx = moving.reshape(-1).nonzero().squeeze(-1)
    x_flat = x.reshape(-1).clone()
    if idx.numel() == 0:
        return x_flat.reshape(x.shape)
    seed, index, step = draws[:3]
    stream = draws[3] if len(draws) > 3 else rng.STREAM_JUMPS if isinstance(kernel, PoissonJumps) else rng.STREAM_STEP
    v, l = log_score.shape[-1], x.shape[1]
    ls_flat = log_score.reshape(-1, v)

    def uniforms(rows, within=None):
        return row_uniforms(seed, stream, index, step, l, rows, within)

    if isinstance(kernel, MaskedCategorical):  # moving rows are masked rows: decide from row totals, build rows only where they move
        real = ls_flat.detach()[:, :-1] if graph.canonical else None
        chunk = max(1, chunk_elems(x.device) // v)  # the draw's own row blocks bound its temporaries on a CPU
        u_all = uniforms(idx)
        for start in range(0, idx.numel(), chunk):
            rows = idx[start : start + chunk]
            u = u_all[start : start + chunk]
            if real is not None:
                x_flat[rows] = kernel.draw(real, rows, u)
            else:  # the real columns of these rows only, gathered in order
                local = torch.arange(rows.numel(), device=rows.device)
                x_flat[rows] = graph.from_canonical(kernel.draw(graph.real_columns(ls_flat[rows].detach()), local, u))
        return x_flat.reshape(x.shape)
    if isinstance(kernel, PoissonJumps):  # ordinal levels: one uniform per (position, target level)
        s_levels = graph.vocab_size
        chunk = max(1, CHUNK_ELEMS // (4 * s_levels))
        levels = torch.arange(s_levels, device=x.device)
        for start in range(0, idx.numel(), chunk):
            rows = idx[start : start + chunk]
            lam = kernel.intensity(graph, model.noise, ls_flat[rows].detach(), x_flat[rows])
            x_flat[rows] = kernel.draw(lam, x_flat[rows], uniforms(rows, levels[None, :]))
        return x_flat.reshape(x.shape)
    if isinstance(kernel, StayOrJump):  # draw from float32 masses; rows too close to a boundary get the exact rows
        chunk = decide_rows(v, x.device)
        buf, u_all = None, uniforms(idx)  # one hash pass per step, not one per chunk
        for start in range(0, idx.numel(), chunk):
            rows = idx[start : start + chunk]
            u = u_all[start : start + chunk]
            for dtype in decision_dtypes(x.device):
                tokens, settled = kernel.decide(take_rows(ls_flat, rows), x_flat[rows], u, dtype)
                x_flat[rows] = tokens
                if bool(settled.all()):
                    break
                rows, u = rows[~settled], u[~settled]
            else:  # within float64's band of a boundary: the full rows
                buf = torch.empty(chunk, v, dtype=torch.float64, device=x.device) if buf is None else buf
                x_flat[rows] = kernel.draw(take_rows(ls_flat, rows).detach(), x_flat[rows], u, buf)
        return x_flat.reshape(x.shape)
    if not isinstance(kernel, Categorical):
        raise TypeError(f"advance has no draw for {type(kernel).__name__}")
    canon = graph.canonical_graph()
    extra_flat = [r.reshape(x_flat.shape[0], *r.shape[2:]) for r in row_inputs]
    chunk = chunk_rows(v, x.device)
    for start in range(0, idx.numel(), chunk):
        rows = idx[start : start + chunk]
        extra = [_canonical(graph, r[rows].detach()) for r in extra_flat]
        probs = kernel.probs(canon, model.noise, graph.canonical_scores(ls_flat[rows].detach()),
                             graph.to_canonical(x_flat[rows]), *extra)
        x_flat[rows] = graph.from_canonical(draw(probs, uniforms(rows)))
    return x_flat.reshape(x.shape)


def _canonical(graph: Graph, rows: torch.Tensor) -> torch.Tensor:
    """Score rows (floating) or token rows (integer) in the graph's canonical layout."""
    return graph.canonical_scores(rows) if rows.is_floating_point() else graph.to_canonical(rows)


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
    graph: Graph  # the model's graph (:func:`lsdtool.diffusion.graph_of`)
    state: dict = field(default_factory=dict)  # what a rule keeps between its steps
    # the grid in float64 on the device, and which Phi_k are positive, made once: a step that copied a time to a
    # GPU or asked it whether Phi_k > 0 would wait for the device's queue to drain
    grid64: torch.Tensor = field(init=False, repr=False)
    positive: list = field(init=False, repr=False)

    def __post_init__(self):
        self.grid64 = self.timesteps.detach().double().to(self.device)
        self.positive = (self.sampler.coeffs.detach() > 0).tolist()

    @property
    def device(self) -> torch.device:
        return self.index.device

    def call(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """The model's log score (B, L, V) at state x (B, L) and a scalar or (B,) time."""
        with torch.set_grad_enabled(self.grad):
            t = time.to(device=self.device, dtype=torch.float32).expand(x.shape[0])
            cfg = float(self.sampler.options.get("cfg", 0.0))
            if cfg > 0:  # classifier-free guidance (lsdtool.blocks): the prompt masked in a second copy
                return guided(self.model, x, t, self.fixed, cfg)
            return self.model.log_score(x, t)

    def times(self, k: int):
        """(t, s, t64, s64, final) of step k: the grid times and their float64 copies on the device."""
        t, s = self.timesteps[k], self.timesteps[k + 1]
        final = k == self.sampler.steps - 1 and not self.sampler.denoise
        return t, s, self.grid64[k], self.grid64[k + 1], final

    def moving_masks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: masked positions that are not fixed."""
        masked = x == self.graph.mask_id
        return masked if self.fixed is None else masked & ~self.fixed

    def step_kernel(self, k: int, t64, s64, base: str, final: bool) -> Kernel:
        """The kernel of an euler, tweedie or count step k: the closed form at masked rows where the graph
        has a mask and the form applies, else the categorical rows of :func:`step_rows`."""
        args = (t64, s64, base, self.coeffs[k], self.sampler.mode, final)
        if self.graph.absorbing:
            fast = masked_kernel(self.model.noise, *args, positive=self.positive[k])
        else:
            fast = stay_or_jump_kernel(self.graph, self.model.noise, *args, positive=self.positive[k])
        return fast if fast is not None else Categorical(step_rows, args)


def one_call_step(run: Run, k: int, x: torch.Tensor) -> Iterator[Step]:
    """Euler and Tweedie: one model call, every movable row drawn from :func:`step_rows`."""
    t, s, t64, s64, final = run.times(k)
    log_score = run.call(x, t)
    kernel = run.step_kernel(k, t64, s64, run.sampler.base, final)
    x_next = advance(run.model, kernel, log_score, x, (run.seed, run.index, k), run.fixed)
    yield Step(k, t, s, x, log_score, x_next, final)


def count_step(run: Run, k: int, x: torch.Tensor) -> Iterator[Step]:
    """Count: move exactly the n_k masked positions that come first in the sample's random order."""
    model = run.model
    if k == 0:
        run.state["order"] = rng.uniforms(run.seed, rng.STREAM_ORDER, run.index, 0, x.shape[1])  # one order per sample
    t, s, t64, s64, final = run.times(k)
    log_score = run.call(x, t)
    n_k, still = commit_counts(run, k, run.moving_masks(x))  # still: the masked positions of the step's block
    rank = torch.where(still, run.state["order"], 2.0).argsort(-1).argsort(-1)
    hold = ~(still & (rank < n_k[:, None]))
    greedy = run.sampler.options.get("greedy", False)
    kernel = Categorical(greedy_rows) if greedy else run.step_kernel(k, t64, s64, "count", True)
    x_next = advance(model, kernel, log_score, x, (run.seed, run.index, k), hold if run.fixed is None else hold | run.fixed)
    yield Step(k, t, s, x, log_score, x_next, final)


def trapezoidal_step(run: Run, k: int, x: torch.Tensor) -> Iterator[Step]:
    """Theta-trapezoidal: a tau-leaping stage to rho, then the trapezoidal stage to s (two model calls)."""
    model, mode = run.model, run.sampler.mode
    t, s, t64, s64, final = run.times(k)
    log_score = run.call(x, t)
    rho = t - THETA * (t - s)
    rho64 = rho.detach().double().to(run.device)
    stage1 = Categorical(tau_leap_rows, (t64, rho64, run.coeffs[k], mode, False))
    x_mid = advance(model, stage1, log_score, x, (run.seed, run.index, k), run.fixed)
    yield Step(k, t, rho, x, log_score, x_mid, False, 0)
    log_score_mid = run.call(x_mid, rho)
    stage2 = Categorical(trapezoidal_rows, (t64, rho64, s64, run.coeffs[k], mode, final))
    x_next = advance(model, stage2, log_score_mid, x_mid, (run.seed, run.index, k, rng.STREAM_STAGE), run.fixed,
                     row_inputs=(log_score, x))
    yield Step(k, rho, s, x_mid, log_score_mid, x_next, final, 1)


def tau_leaping_grid(steps: int, options: dict) -> torch.Tensor:
    """tauLDR's grid: linspace(1, min_t, M), then a last step down to the engine's eps (tauLDR: to 0)."""
    min_t = float(options.get("min_t", MIN_T))
    head = torch.linspace(1.0, min_t, steps, dtype=torch.float64) if steps > 1 else torch.ones(1, dtype=torch.float64)
    return torch.cat([head, torch.full((1,), DEFAULT_EPS, dtype=torch.float64)])


def jump_intensity(graph: Graph, noise: Noise, log_score, x, t, s, coeff=1.0, mode="score"):
    """Expected jumps (R, S) to each level over t -> s with the reverse rates of (x, t): (t - s) R_hat."""
    n = x.shape[0]
    t, s, coeff = _as_rows(t, n, x), _as_rows(s, n, x), _as_rows(coeff, n, x)
    return (t - s)[:, None] * _jump_rates(graph, noise, log_score, x, t, coeff, mode)


def categorical_step_kernel(t, s, base, coeff, mode, final) -> Categorical:
    """One euler or tweedie step t -> s as full categorical rows (:func:`step_rows`), for its likelihood."""
    return Categorical(step_rows, (t, s, base, coeff, mode, final))


def commit_step_kernel(t, s, base, coeff, mode, final) -> Categorical:
    """A committed token of the count and confidence rules: drawn from softmax(Phi log s) over the real tokens
    (the commit set taken as given), whichever rule chose where to commit."""
    return Categorical(step_rows, (t, s, "count", coeff, mode, final))


def jump_step_kernel(t, s, base, coeff, mode, final) -> PoissonJumps:
    """One tau-leaping step t -> s (its final argmax is not part of the step)."""
    return PoissonJumps(jump_intensity, (t, s, coeff, mode))


def corrector_intensity(graph: Graph, noise: Noise, log_score, x, t, h, coeff=1.0, mode="score"):
    """tauLDR's corrector: expected jumps (R, S) over h with the forward plus the reverse rates out of x at t."""
    n = x.shape[0]
    t, h, coeff = _as_rows(t, n, x), _as_rows(h, n, x), _as_rows(coeff, n, x)
    rate = _jump_rates(graph, noise, log_score, x, t, coeff, mode) + noise.rate(t)[:, None] * graph.forward_rate(x)
    return h[:, None] * rate.scatter(-1, x[:, None], 0.0)


def _final_argmax(run: Run, k: int, x: torch.Tensor) -> Step:
    """tauLDR's last call: every position takes the argmax of p(x0 | x) at min_t (fixed positions kept)."""
    t = torch.as_tensor(float(run.sampler.options.get("min_t", MIN_T)), dtype=run.timesteps.dtype)
    with torch.set_grad_enabled(run.grad):
        lp = run.model.x0_log_probs(x, t.to(device=run.device, dtype=torch.float32).expand(x.shape[0]))
    best = run.graph.real_token(lp.argmax(-1))
    x_next = best if run.fixed is None else torch.where(run.fixed, x, best)
    return Step(k, t, t, x, lp, x_next, True, 1)


def _tau_leap(run: Run, k: int, x: torch.Tensor):
    """One tau-leaping step k (Poisson jumps with the rates of (x, t), Phi_k scaling them); returns x after it."""
    t, s, t64, s64, _ = run.times(k)
    log_score = run.call(x, t)
    kernel = PoissonJumps(jump_intensity, (t64, s64, run.coeffs[k], run.sampler.mode))
    x_next = advance(run.model, kernel, log_score, x, (run.seed, run.index, k), run.fixed)
    yield Step(k, t, s, x, log_score, x_next, False)
    return x_next


def tau_leaping_step(run: Run, k: int, x: torch.Tensor) -> Iterator[Step]:
    """tau-leaping for ordinal data; after the last step, the argmax of p(x0 | x) (one more call)."""
    x = yield from _tau_leap(run, k, x)
    if k == run.sampler.steps - 1:
        yield _final_argmax(run, k, x)


def corrector_steps(sampler) -> int:
    """Corrector calls of a tau-leaping-pc sampler: ``corrector_steps`` after each step that starts at or
    below ``corrector_entry`` (tauLDR: 10 calls below t = 0.1)."""
    entry = float(sampler.options.get("corrector_entry", CORRECTOR_ENTRY))
    n = int(sampler.options.get("corrector_steps", CORRECTOR_STEPS))
    return n * int((sampler.timesteps[:-1] <= entry).sum())


def tau_leaping_pc_step(run: Run, k: int, x: torch.Tensor) -> Iterator[Step]:
    """tauLDR's predictor-corrector: a tau-leaping step, then (below ``corrector_entry``) corrector steps of
    size ``corrector_size`` x h with the forward plus reverse rates at s (not below min_t)."""
    opts = run.sampler.options
    x = yield from _tau_leap(run, k, x)
    t, s, t64, s64, _ = run.times(k)
    if float(t64) <= float(opts.get("corrector_entry", CORRECTOR_ENTRY)):
        at = s.clamp_min(float(opts.get("min_t", MIN_T)))
        at64 = at.detach().double().to(run.device)
        h = (t64 - s64) * float(opts.get("corrector_size", CORRECTOR_SIZE))
        for c in range(int(opts.get("corrector_steps", CORRECTOR_STEPS))):
            log_score = run.call(x, at)
            kernel = PoissonJumps(corrector_intensity, (at64, h, run.coeffs[k], run.sampler.mode))
            x_next = advance(run.model, kernel, log_score, x, (run.seed, run.index, k, rng.corrector_stream(c)), run.fixed)
            yield Step(k, at, at, x, log_score, x_next, False, 2 + c)
            x = x_next
            del log_score
    if k == run.sampler.steps - 1:
        yield _final_argmax(run, k, x)


def iterate(model, sampler: Sampler, index: torch.Tensor, seed: int, x_init=None, fixed=None,
            grad: bool = False, timesteps=None) -> Iterator[Step]:
    """Run the sampler, yielding a :class:`Step` after each model call (the one engine loop).

    index (B,) global sample ids; x_init (B, L) start state (default :func:`start_state`); fixed (B, L)
    bool positions that never change; ``timesteps`` overrides the grid (a differentiable tensor when
    ``grad``, so the log scores keep their graph to the time input). Each step is taken by the base
    rule's step function from :mod:`lsdtool.steprules`.
    """
    device = index.device
    if device.type == "cpu":
        allocator.keep_temporaries()
    rule = steprules.rule(sampler.base)
    problem = rule.problem(model)
    if problem:
        raise ValueError(problem)
    step_fn = rule.step_function()
    graph = graph_of(model)
    if hasattr(model, "configure"):  # a model whose forward depends on the rule's options (block-causal attention)
        model.configure(sampler.options)
    x = start_state(model, index, seed) if x_init is None else x_init.to(device)
    ts = sampler.timesteps if timesteps is None else timesteps
    coeffs = sampler.coeffs.detach().to(device=device, dtype=torch.float64)
    run = Run(model, sampler, index, seed, fixed, grad, ts, coeffs, graph)
    m = sampler.steps
    for k in range(m):
        for step in step_fn(run, k, x):  # a rule may make no call at step k (entropy-bound, all filled)
            yield step
            x = step.x_next
            del step  # else its (B, L, V) scores stay alive through the next model call
    if sampler.denoise:
        t = ts[m]
        log_score = run.call(x, t)
        kernel = denoise_kernel(device) if graph.absorbing else Categorical(denoise_rows, (t.detach().double().to(device),))
        x_next = advance(model, kernel, log_score, x, (seed, index, m), fixed)
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
