"""Adaptive unmasking rules for absorbing models: confidence-ordered and entropy-bounded (DESIGN §5).

Both rules look at the model's distribution p over real tokens at every masked position (mask column
dropped; raised to Phi_k in temperature mode) and decide *which* positions to commit; a committed
position gets a token drawn from p_T ∝ p^{1/T} (an optional temperature T, default 1) with the engine's
counter-based uniforms (seed, step stream, sample index, step k, position), so a sample never depends
on its batch or shard. The scores that rank positions are measured on p itself, as in LLaDA's
low-confidence remasking: T only sharpens the draws, and T -> 0 is greedy decoding.

- ``confidence`` (MaskGIT; LLaDA's low-confidence remasking; diffusers' ``BlockRefinementScheduler``):
  step k draws a candidate c_j ~ p_T at every masked position j and commits the n_k candidates with
  the highest confidence p(c_j) (or, with ``score = "margin"``, the top-1 minus top-2 probability
  of p); n_k follows the grid's masked fraction exactly as the count rule does
  (:func:`lsdtool.samplers.count_schedule`), so a distilled grid can drive it. Equal scores are
  ordered by the sample's random position order (the count rule's), so ties never favour one end.
- ``entropy-bound`` (EB-Sampler, Ben-Hamu et al. 2025; diffusers' ``EntropyBoundScheduler``): sort
  the masked positions by the entropy H_j of p, ascending, and commit the longest prefix with
  sum_{i <= j} H_i - max_{i <= j} H_i <= gamma (at least one position; ties as for confidence). The number of model calls
  adapts per sample: a sample whose masks are all filled makes no further call, and step M (the
  grid's length, ``--steps``) commits everything left. The model is called at the time whose masked
  fraction (rescaled over the grid as in :func:`count_schedule`) matches the sample's.

Neither rule samples the model's joint distribution: both prefer likely tokens and so trade
diversity for per-token quality.

A rule's options live in :attr:`Sampler.options <lsdtool.samplers.Sampler>` (checked by
:func:`lsdtool.grids.options_problem`): ``temperature`` (> 0, default 1) for both, ``score``
(``probability`` | ``margin``) for confidence, ``gamma`` (>= 0) for entropy-bound; confidence (and count)
also take LLaDA's block decoding, ``greedy`` candidates and ``cfg`` (:mod:`lsdtool.blocks`).
"""

from __future__ import annotations

from typing import Iterator

import torch

from lsdtool import rng
from lsdtool.kernels import Categorical, CommitByScore, chunk_rows, draw, take_rows
from lsdtool.blocks import greedy_rows
from lsdtool.samplers import Step, advance, commit_counts, row_uniforms

DEFAULT_GAMMA = 0.1  # diffusers' EntropyBoundScheduler default
_BISECT = 60  # bisection steps of the masked-fraction -> time map (float64 resolution)


def sharpness(run, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors a on the log score, p ∝ exp(a log s), of the scores (Phi_k in temperature mode, else 1)
    and of the candidate draws (that over T)."""
    a = run.coeffs[k] if run.sampler.mode == "temperature" else run.coeffs.new_tensor(1.0)
    temperature = float(run.sampler.options.get("temperature", 1.0))
    return a, (a if temperature == 1.0 else a / temperature)  # a itself at T = 1 (a / 1 is a): one softmax input


def candidate_rows(graph, noise, log_score: torch.Tensor, x: torch.Tensor, a) -> torch.Tensor:
    """Candidate probabilities over real tokens (R, V-1) float64 for masked rows: softmax(a * log_score[:, :-1]).

    A row function of a :class:`lsdtool.kernels.Categorical` (canonical layout: the mask last); x is unused
    (every row is masked)."""
    return torch.softmax(a * log_score[:, :-1].to(torch.float64), -1)


def candidates(a, greedy: bool = False) -> CommitByScore:
    """The kernel of the confidence rules: a candidate ~ softmax(a * log s) over the real tokens at every masked row
    (its argmax when ``greedy``)."""
    return CommitByScore(Categorical(greedy_rows if greedy else candidate_rows, (a,)))


def row_scores(graph, log_score: torch.Tensor, where: torch.Tensor, a, kind: str, cand: torch.Tensor | None = None) -> torch.Tensor:
    """A figure of p = softmax(a * log_score) over the real tokens of ``graph`` per position, (B, L) float64 at the ``where``
    positions (NaN elsewhere), computed in row chunks (:func:`_figure`; ``probability`` of the candidates cand (B, L))."""
    v = log_score.shape[-1]
    flat = log_score.reshape(-1, v)
    idx = where.reshape(-1).nonzero().squeeze(-1)
    out = torch.full((where.numel(),), float("nan"), dtype=torch.float64, device=log_score.device)
    chunk = chunk_rows(v, log_score.device)
    for start in range(0, idx.numel(), chunk):
        rows = idx[start : start + chunk]
        lp = torch.log_softmax(a * graph.real_columns(flat[rows]).detach().to(torch.float64), -1)
        out[rows] = _figure(lp, kind, graph.real_index(cand.reshape(-1)[rows]) if kind == "probability" else None)
    return out.reshape(where.shape)


def _figure(lp: torch.Tensor, kind: str, col: torch.Tensor | None) -> torch.Tensor:
    """(R,) float64 figure of rows of log p (R, n_real): ``entropy`` -sum p log p, ``probability`` p(col) of
    columns col (R,), ``margin`` top-1 minus top-2 probability."""
    if kind == "entropy":
        p = lp.exp()
        return -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1)
    if kind == "probability":
        return lp.gather(-1, col[:, None]).squeeze(-1).exp()
    if kind == "margin":
        top = lp.topk(2, -1).values.exp()
        return top[:, 0] - top[:, 1]
    raise ValueError(f"unknown score {kind!r}")


def scored_candidates(run, k: int, log_score: torch.Tensor, x: torch.Tensor, open_: torch.Tensor, kind: str,
                      greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The confidence step's candidates (B, L) (x off ``open_``) and their scores (B, L) float64 (NaN off ``open_``)
    from one float64 copy of each row chunk: the tokens :func:`advance` draws with :func:`candidates` at the open
    rows and the figures of :func:`row_scores`, the same to the bit."""
    graph, v, l = run.graph, log_score.shape[-1], x.shape[1]
    a, a_draw = sharpness(run, k)
    shared = a_draw is a
    flat = log_score.reshape(-1, v)
    idx = open_.reshape(-1).nonzero().squeeze(-1)
    cand = x.reshape(-1).clone()
    score = torch.full((x.numel(),), float("nan"), dtype=torch.float64, device=x.device)
    u_all = None if greedy else row_uniforms(run.seed, rng.STREAM_STEP, run.index, k, l, idx)
    chunk = chunk_rows(v, x.device)
    for start in range(0, idx.numel(), chunk):
        rows = idx[start : start + chunk]
        real = graph.real_columns(take_rows(flat, rows).detach())
        z = real.to(torch.float64, copy=True)  # worked on in place: never the scores themselves
        if greedy:  # greedy_rows' one-hot draw: the first maximum
            col, lp = real.argmax(-1), torch.log_softmax(z.mul_(a), -1)
        elif shared:
            lp = torch.log_softmax(z.mul_(a), -1)
            col = draw(torch.softmax(z, -1), u_all[start : start + chunk])
        else:
            lp = torch.log_softmax(a * z, -1)
            col = draw(torch.softmax(z.mul_(a_draw), -1), u_all[start : start + chunk])
        cand[rows] = graph.real_token(col)
        score[rows] = _figure(lp, kind, col)
    return cand.reshape(x.shape), score.reshape(x.shape)


def _sorted(key: torch.Tensor, tiebreak: torch.Tensor | None, descending: bool):
    """Sort rows of ``key`` (values, indices), equal keys ordered by ascending ``tiebreak`` (else by position)."""
    if tiebreak is None:
        return torch.sort(key, stable=True, dim=-1, descending=descending)
    first = tiebreak.argsort(-1)
    values, order = torch.sort(key.gather(-1, first), stable=True, dim=-1, descending=descending)
    return values, first.gather(-1, order)


def top_n(score: torch.Tensor, open_: torch.Tensor, n: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: the n_b open positions with the highest score in row b; equal scores go to the
    lower ``tiebreak`` (B, L) value (default: the lower position)."""
    key = torch.where(open_, score, torch.full_like(score, -float("inf")))
    order = _sorted(key, tiebreak, True)[1]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
    return open_ & (rank < n[:, None])


def entropy_prefix(entropy: torch.Tensor, open_: torch.Tensor, gamma: float, everything: bool = False,
                   tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: the longest prefix of the open positions sorted by entropy (ascending, ties as in
    :func:`top_n`) with sum_{i<=j} H_i - max_{i<=j} H_i = sum_{i<j} H_i <= gamma; at least one
    position of every row that has one; all of them when ``everything``."""
    key = torch.where(open_, entropy, torch.full_like(entropy, float("inf")))
    sorted_h, order = _sorted(key, tiebreak, False)
    before = torch.cat([torch.zeros_like(sorted_h[:, :1]), sorted_h[:, :-1].cumsum(-1)], -1)  # sum of the ones before
    slot = torch.arange(key.shape[-1], device=key.device).expand_as(order)
    keep = slot < open_.sum(-1, keepdim=True)
    if not everything:
        keep = keep & ((before <= gamma) | (slot == 0))
    return torch.zeros_like(open_).scatter_(-1, order, keep)


def time_of_masked_fraction(noise, timesteps: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """The time t in [tau_M, tau_0] whose rescaled masked fraction (as in :func:`count_schedule`)
    equals ``frac`` (R,): solves alpha(t) = alpha_M + frac (alpha_0 - alpha_M), alpha = 1 - e^{-sigma_bar},
    by bisection (alpha is increasing in t). Returns (R,) float64."""
    ts = timesteps.detach().to(torch.float64).cpu()
    alpha = lambda t: -torch.expm1(-noise.total(t))  # noqa: E731
    lo_t, hi_t = float(ts[-1]), float(ts[0])
    lo_a, hi_a = alpha(ts[-1:]), alpha(ts[:1])
    target = lo_a + frac.detach().cpu().to(torch.float64).clamp(0, 1) * (hi_a - lo_a)
    lo = torch.full_like(target, lo_t)
    hi = torch.full_like(target, hi_t)
    for _ in range(_BISECT):
        mid = (lo + hi) / 2
        below = alpha(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return ((lo + hi) / 2).to(frac.device)


def tiebreak(run, x: torch.Tensor) -> torch.Tensor:
    """(B, L) uniforms: the sample's random position order (the count rule's), used to order equal scores."""
    return rng.uniforms(run.seed, rng.STREAM_ORDER, run.index, 0, x.shape[1])


def confidence_step(run, k: int, x: torch.Tensor) -> Iterator[Step]:
    """Confidence: draw a candidate at every masked position, commit the n_k most confident ones."""
    sampler = run.sampler
    if k == 0:
        run.state["order"] = tiebreak(run, x)
    t, s, t64, s64, final = run.times(k)
    log_score = run.call(x, t)
    n_k, open_ = commit_counts(run, k, run.moving_masks(x))  # open: the masked positions of the step's block
    greedy = bool(sampler.options.get("greedy", False))
    cand, score = scored_candidates(run, k, log_score, x, open_, sampler.options.get("score", "probability"), greedy)
    commit = top_n(score, open_, n_k, run.state["order"])
    yield Step(k, t, s, x, log_score, torch.where(commit, cand, x), final)


def entropy_bound_step(run, k: int, x: torch.Tensor) -> Iterator[Step]:
    """Entropy-bound: the samples that still have masks call the model at the time of their masked
    fraction and commit their lowest-entropy positions within the budget gamma (all at the last step)."""
    model, sampler = run.model, run.sampler
    still = run.moving_masks(x)
    if k == 0:
        run.state["open"] = still.sum(-1).clamp_min(1)
        run.state["order"] = tiebreak(run, x)
    rows = still.any(-1).nonzero().squeeze(-1)
    if rows.numel() == 0:
        return
    last = k == sampler.steps - 1
    frac = still[rows].sum(-1).double() / run.state["open"][rows]
    t = time_of_masked_fraction(model.noise, run.timesteps, frac)
    log_score = run.call(x[rows], t)
    a, a_draw = sharpness(run, k)
    open_ = still[rows]
    gamma = float(sampler.options.get("gamma", DEFAULT_GAMMA))
    commit = entropy_prefix(row_scores(run.graph, log_score, open_, a, "entropy"), open_, gamma, last, run.state["order"][rows])
    x_rows = advance(model, candidates(a_draw).candidates, log_score, x[rows], (run.seed, run.index[rows], k), ~commit)
    x_next = x.clone()
    x_next[rows] = x_rows
    yield Step(k, t, t, x, log_score, x_next, last, rows=rows)


STEPS = {"confidence": confidence_step, "entropy-bound": entropy_bound_step}
