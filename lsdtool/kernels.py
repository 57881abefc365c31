"""Transition kernels: what one step of a rule does to a row, typed so the engine dispatches on the type.

- :class:`Categorical`: per-row probabilities from a row function ``fn(graph, noise, log_score, x, *extra,
  *args)`` -> (R, V') float64 (V' = V, or the real tokens when the mask column is dropped), drawn by
  inverse CDF in float64 (:func:`draw`).
- :class:`MaskedCategorical`: the closed form of Euler, Tweedie, the count rule and SEDD's denoise step at
  masked rows of an absorbing model: p_y = scale w_y (y real) and p_M = 1 - scale sum_y w_y, or w
  normalised when ``final``, with w = e^{ls} and scale = c Phi (score mode) or w = e^{Phi ls} and
  scale = c (temperature mode). A row moves iff u Z < scale sum w (Z = max(scale sum w, 1)), so the
  decision needs one float32 exp-sum pass (redone in float64 near the threshold) and only rows that
  move get a float64 CDF: the same token as :func:`draw` on the full row for the same uniform.
- :class:`CommitByScore`: the confidence rules: a categorical candidate at every masked row, of which
  the rule commits the best-scored ones.

Every kernel has the log-probability of a transition x -> y (:meth:`log_prob`), which the teacher-path
objective maximises. Kernels see rows in the graph's canonical layout (real tokens, then the mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

CHUNK_ELEMS = 1 << 24  # float64 elements per row chunk: bounds memory for V = 50k vocabularies


def normalise(p: torch.Tensor) -> torch.Tensor:
    """Rows clamped to non-negative mass and renormalised: (R, V) -> (R, V)."""
    p = p.clamp_min(0.0)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-300)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF categorical draw in float64: probs (R, V), u (R,) uniforms -> (R,) long."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


class Kernel:
    """A one-step transition of rows; ``kind`` names its type in the step-rule table."""

    kind: str = ""

    def log_prob(self, graph, noise, log_score, x, y, *extra) -> torch.Tensor:
        """log p(y | x) (R,) float64 of rows log_score (R, V), x, y (R,) (canonical layout)."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Categorical(Kernel):
    """Rows drawn from ``fn(graph, noise, log_score, x, *extra, *args, **kw)``."""

    fn: Callable
    args: tuple = ()
    kw: dict = field(default_factory=dict)
    kind = "categorical"

    def probs(self, graph, noise, log_score, x, *extra) -> torch.Tensor:
        """(R, V') float64 step probabilities of the rows."""
        return self.fn(graph, noise, log_score, x, *extra, *self.args, **self.kw)

    def log_prob(self, graph, noise, log_score, x, y, *extra):
        p = self.probs(graph, noise, log_score, x, *extra)
        return torch.log(p.gather(-1, y[:, None]).clamp_min(1e-300)).squeeze(-1)


@dataclass(frozen=True, eq=False)
class MaskedCategorical(Kernel):
    """The closed form at masked rows (module docstring): ``scale`` (0-d float64, None when ``final``),
    ``coeff`` Phi (0-d float64) and ``mode`` (score | temperature)."""

    scale: torch.Tensor | None
    coeff: torch.Tensor
    mode: str
    final: bool
    kind = "masked-categorical"

    def log_prob(self, graph, noise, log_score, x, y, *extra):
        real = log_score[:, :-1].to(torch.float64)
        w = torch.exp(real * self.coeff) if self.mode == "temperature" else torch.exp(real)
        total = w.sum(-1)
        mask = real.shape[1]
        picked = w.gather(-1, y.clamp_max(mask - 1)[:, None]).squeeze(-1)
        if self.final:
            return torch.where(y == mask, -torch.inf, torch.log(picked) - torch.log(total))
        jump = self.scale * total
        zed = jump.clamp_min(1.0)
        stay = (1 - jump).clamp_min(0.0)
        return torch.where(y == mask, torch.log(stay / zed), torch.log(self.scale * picked / zed))

    def draw(self, real: torch.Tensor, rows: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Tokens (R,) at ``rows`` of ``real`` (N, V-1) log scores of the real tokens; see :func:`_draw_masked`."""
        return _draw_masked(real, rows, u, self)


@dataclass(frozen=True, eq=False)
class CommitByScore(Kernel):
    """A candidate drawn at every masked row by ``candidates``; the rule commits the best ``score``d ones."""

    candidates: Categorical
    score: str = "probability"
    kind = "commit-by-score"

    def log_prob(self, graph, noise, log_score, x, y, *extra):
        """log p(y) of a committed row's candidate draw (the commit set taken as given)."""
        return self.candidates.log_prob(graph, noise, log_score, x, y, *extra)


@dataclass(frozen=True, eq=False)
class StayOrJump(Kernel):
    """Euler or Tweedie on a graph whose rows are one affine function of the scores off the diagonal.

    - euler (uniform: scale = c Phi / N): p_y = scale w_y (y != x), p_x = 1 - scale sum w;
    - tweedie (uniform, ``tweedie`` = (e^{dsigma}, off, diag), the graph's ``transition_parts(dsigma)``): p_y =
      max(e w_y + (1 - e) S / N, 0) off (y != x), S = sum_y w_y with w_x = 1, p_x the same times diag;

    clamped and renormalised (total Z). A row stays iff its uniform falls in x's segment of the CDF,
    [A, A + p_x) / Z with A the mass before x, and otherwise takes the token whose segment it falls in:
    :meth:`decide` finds both from the masses (float32, then float64) for all but the rows within a relative
    band of a boundary, which are drawn from the ``exact`` full rows, so every token is the full-row draw."""

    scale: torch.Tensor | None  # euler's c Phi / N (score) or c / N (temperature); None in the Tweedie form
    coeff: torch.Tensor
    mode: str
    exact: Categorical
    rate: float = 0.0  # the graph's constant reverse rate (uniform: 1/N)
    dt_rate: torch.Tensor | None = None  # (t - s) sigma'(t), 0-d float64
    tweedie: tuple | None = None  # (e^{dsigma}, off, diag), 0-d float64 each: the Tweedie form
    kind = "categorical"

    def log_prob(self, graph, noise, log_score, x, y, *extra):
        return self.exact.log_prob(graph, noise, log_score, x, y, *extra)

    def _unit_coeff(self) -> bool:
        """Whether Phi is known to be 1 without asking a device (s * 1 is s: the multiply's pass can be skipped)."""
        return self.coeff.device.type == "cpu" and float(self.coeff) == 1.0

    def probs_into(self, log_score: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``exact``'s rows (R, V) float64 (Euler's one_hot(x) + dt R_hat(x, Phi s), or Tweedie's staggered score
        times the transition, clamped and renormalised) computed op for op as :func:`lsdtool.samplers.step_rows`
        does, in ``out`` without other (R, V) temporaries."""
        at = x[:, None]
        out.copy_(log_score)
        if self.mode == "temperature":
            out.mul_(self.coeff).exp_()
        elif not self._unit_coeff():
            out.exp_().mul_(self.coeff)
        else:
            out.exp_()
        out.scatter_(-1, at, 1.0)
        if self.tweedie is not None:  # the staggered score e s + (1 - e) / N sum(s), times the transition's columns
            e, off, diag = self.tweedie
            shift = (1 - e) / out.shape[1] * out.sum(-1, keepdim=True)
            out.mul_(e).add_(shift)
            at_x = out.gather(-1, at) * diag
            out.mul_(off).scatter_(-1, at, at_x).clamp_min_(0.0)
            return out.div_(out.sum(-1, keepdim=True).clamp_min(1e-300))
        out.mul_(self.rate).scatter_(-1, at, 0.0)  # the off-diagonal rates rate * s_y
        out.scatter_(-1, at, -out.sum(-1, keepdim=True)).mul_(self.dt_rate)
        out.scatter_(-1, at, out.gather(-1, at) + 1.0).clamp_min_(0.0)
        return out.div_(out.sum(-1, keepdim=True).clamp_min(1e-300))

    def draw(self, log_score: torch.Tensor, x: torch.Tensor, u: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """Tokens (R,) of rows log_score (R, V) by inverse CDF in float64 (the full-row :func:`draw`), ``buf``
        (at least R, V) float64 holding the rows and their CDF."""
        cdf = self.probs_into(log_score, x, buf[: x.shape[0]]).cumsum_(-1)
        found = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
        return found.clamp_max(cdf.shape[-1] - 1)

    def _masses(self, ls: torch.Tensor, x: torch.Tensor, work: torch.Tensor):
        """Masses m (R, V) (0 at x) in ``work`` (float32 or float64), their :func:`_block_totals`, their factor f
        (0-d), the row total Z and p_x (R,) float64 and the relative band of the error in work's precision: the
        rows are f m_y off x and p_x at x."""
        w = _weights(ls.detach(), self.coeff, self.mode, work)
        if self.tweedie is None:
            w.scatter_(-1, x[:, None], 0.0)
            cum = _block_totals(w)
            jump = self.scale * cum[:, -1]
            return w, cum, self.scale, jump.clamp_min(1.0), (1 - jump).clamp_min(0.0), _band(w.dtype)
        e, off, diag = self.tweedie
        n = w.shape[1]
        if self.mode == "score" and not self._unit_coeff():  # Phi s_y (Euler folds Phi into its scale)
            w.mul_(self.coeff.to(w.dtype))
        w.scatter_(-1, x[:, None], 1.0)
        shift = (1 - e) / n * _block_totals(w)[:, -1]  # (R,)
        p_x = ((e + shift) * diag).clamp_min(0.0)
        if w.device.type == "cpu":  # e as a Python number: e w + shift in one vectorised pass, not two
            torch.add(shift.to(w.dtype)[:, None], w, alpha=float(e), out=w)
        else:
            w.mul_(e.to(w.dtype)).add_(shift.to(w.dtype)[:, None])
        w.clamp_min_(0.0).scatter_(-1, x[:, None], 0.0)
        cum = _block_totals(w)
        total = off * cum[:, -1] + p_x  # sum of the clamped rows >= S, so float32's error
        return w, cum, off, total, p_x, _band(w.dtype, float(2 * e - 1))  # is this relative to Z

    def decide(self, log_score: torch.Tensor, x: torch.Tensor, u: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (R,) for uniforms u (R,) and rows log_score (R, V), and (R,) bool: where the masses in ``dtype``
        settle the draw, the token the full-row draw gives; elsewhere x, and the row needs :meth:`draw`.

        The row's CDF in units of the masses is f sum_{z <= y, z != x} m_z, plus p_x from x on, and the goal is
        u Z. A row stays when its goal lies inside x's segment [A, A + p_x), A = f sum_{z < x} m_z
        (:func:`_mass_before`), and moves to the first y whose cumulative mass exceeds its goal (less p_x past
        the segment), found in the block totals then inside one block of :data:`_SUM_BLOCK` masses. Either is
        settled when the goal lies farther than the band of ``dtype``'s error (:func:`_band`) from every
        boundary it is compared with. Float32 settles most rows that stay; a row that moves lies in one token's
        segment, about Z / V wide, which float64's band (1e-9 Z) resolves and float32's (1e-4 Z) does not at
        V = 50k. Fixed shapes: no device sync."""
        width, k = log_score.shape[1], _SUM_BLOCK
        tokens, settled = x.clone(), torch.zeros_like(u, dtype=torch.bool)
        blocks = _slices(x.shape[0], decide_rows(width, x.device))
        work = torch.empty(blocks[0].stop, width, dtype=dtype, device=x.device)
        for b in blocks:
            w, cum, factor, zed, p_x, rel = self._masses(log_score[b], x[b], work[: b.stop - b.start])
            goal, band = u[b] * zed, rel * zed
            a = factor * _mass_before(w, cum, x[b])
            ok = torch.isfinite(zed) & (factor > 0)
            stay = ok & (p_x > 1e-6 * zed) & (goal >= a + band) & (goal < a + p_x - band)
            target = torch.where(goal < a, goal, goal - p_x) / factor  # in units of the masses
            block = torch.searchsorted(cum, target[:, None], right=True).clamp_max(cum.shape[1] - 1).squeeze(-1)
            cols, inside, lo = _block_at(w, cum, block)
            lo = lo[:, None]  # (n, 1) the mass before the block
            m = inside.cumsum(-1, dtype=torch.float64) + lo
            j = torch.searchsorted(m, target[:, None], right=True)
            below = torch.where(j > 0, m.gather(-1, (j - 1).clamp_min(0)), lo).squeeze(-1)
            above = m.gather(-1, j.clamp_max(k - 1)).squeeze(-1)
            margin = band / factor
            move = ok & (j.squeeze(-1) < k) & ((goal < a - band) | (goal >= a + p_x + band)) \
                & (target - below > margin) & (above - target > margin)
            tokens[b] = torch.where(move, (cols.gather(-1, j.clamp_max(k - 1))).squeeze(-1), x[b])
            settled[b] = stay | move
        return tokens, settled


_SUM_BLOCK = 64  # masses per float32 partial sum: its relative error is below 63 * 2^-24 < 4e-6, inside the band


def _block_totals(w: torch.Tensor) -> torch.Tensor:
    """Running totals (R, nb + 1) float64 of the float32 sums of consecutive blocks of :data:`_SUM_BLOCK`
    masses of w (R, V) (the last block takes the remainder): the row total is the last column. One float32 pass
    instead of a float64 one (a float64 accumulation of float32 runs at a fifth of its speed on a CPU)."""
    r, v = w.shape
    nb = v // _SUM_BLOCK
    part = torch.empty(r, nb + 1, dtype=torch.float64, device=w.device)
    part[:, :nb] = w[:, : nb * _SUM_BLOCK].view(r, nb, _SUM_BLOCK).sum(-1)
    part[:, nb] = w[:, nb * _SUM_BLOCK :].sum(-1)
    return part.cumsum_(-1)


def _block_at(w: torch.Tensor, cum: torch.Tensor, block: torch.Tensor):
    """One block (R,) of :data:`_SUM_BLOCK` masses per row of w (R, V): its columns (R, k), its masses (R, k)
    (0 past V) and the mass before it (R,) float64, from the :func:`_block_totals` ``cum``."""
    k, width = _SUM_BLOCK, w.shape[1]
    cols = block[:, None] * k + torch.arange(k, device=w.device)
    inside = torch.where(cols < width, w.gather(-1, cols.clamp_max(width - 1)), 0.0)
    return cols, inside, cum.gather(-1, (block - 1).clamp_min(0)[:, None]).squeeze(-1) * (block > 0)


def _mass_before(w: torch.Tensor, cum: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_{y < x} w_y (R,) float64 for rows w (R, V) and their :func:`_block_totals` ``cum``: the blocks before
    x's from the running totals, the rest of x's block from at most :data:`_SUM_BLOCK` gathered masses."""
    cols, inside, before = _block_at(w, cum, x // _SUM_BLOCK)
    return before + torch.where(cols < x[:, None], inside, 0.0).sum(-1, dtype=torch.float64)


def masked_kernel(noise, t, s, base: str, coeff, mode: str, final: bool,
                  positive: bool | None = None) -> MaskedCategorical | None:
    """The closed form of an euler, tweedie or count step at masked rows, or None where it does not apply
    (a per-row Phi or times, a non-positive Phi in score mode, whose rows the general rule clamps).
    ``positive``: whether Phi > 0, when the caller knows it without asking the device."""
    coeff, t, s = (torch.as_tensor(v, dtype=torch.float64) for v in (coeff, t, s))
    if base not in ("euler", "tweedie", "count") or mode not in ("score", "temperature") \
            or max(coeff.numel(), t.numel(), s.numel()) != 1:
        return None
    coeff, t, s = coeff.reshape(()), t.reshape(()), s.reshape(())
    if mode == "score" and not (bool(coeff > 0) if positive is None else positive):
        return None
    if final or base == "count":
        return MaskedCategorical(None, coeff, mode, True)
    c = (t - s) * noise.rate(t) if base == "euler" else torch.expm1(noise.total(t) - noise.total(s))
    return MaskedCategorical(c * coeff if mode == "score" else c, coeff, mode, False)


def denoise_kernel(device) -> MaskedCategorical:
    """SEDD's denoise step at a masked row, s e^{sigma} (1 - e^{-sigma}): the score normalised (Phi = 1, score mode)."""
    return MaskedCategorical(None, torch.ones((), dtype=torch.float64, device=device), "score", True)


_GUARD = 1e-4  # relative band around a row's move threshold inside which the float32 row sum is redone in float64
_GUARD64 = 1e-9  # the same for float64 masses: their block sums err by < 64 * 2^-53, the full row's cumsum by < V * 2^-53


def _band(dtype: torch.dtype, spread: float = 1.0) -> float:
    """The relative band of masses computed in ``dtype``; ``spread`` = 2 e^{dsigma} - 1 for Tweedie's affine rows,
    whose rounding is relative to e S rather than to their clamped total."""
    if dtype == torch.float64:
        return max(_GUARD64, 256 * 2.0**-53 * spread)
    return max(_GUARD, 256 * 2.0**-24 * spread)


_BLOCK_ELEMS = 1 << 20  # elements per block of a CPU row pass (at least 16 rows): its exp stays in cache for its sum


def chunk_elems(device: torch.device) -> int:
    """Row-chunk size in elements: small on CPU (memory), large on a GPU (few kernel launches per step)."""
    return CHUNK_ELEMS if device.type == "cpu" else CHUNK_ELEMS * 8


_STEP_CHUNK_ELEMS = 1 << 20  # elements per row chunk of a step's float64 work on a CPU (x 32 on a GPU)


def chunk_rows(width: int, device: torch.device) -> int:
    """Rows per chunk of an engine pass over rows of ``width`` columns: a fixed number of elements (2^20 on a
    CPU: 8 rows at V = 126k, 8 MiB per float64 temporary), whatever the batch, so a step's peak is the model's
    scores plus O(B L) (a chunk of every row would add several float64 copies of the scores)."""
    return max(1, (_STEP_CHUNK_ELEMS if device.type == "cpu" else _STEP_CHUNK_ELEMS * 32) // width)


_DECIDE_ELEMS = 1 << 22  # elements per row block of StayOrJump.decide on a CPU (timed best of 2^20 to 2^24 at V = 50k)


def decide_rows(width: int, device: torch.device) -> int:
    """Rows per block of :meth:`StayOrJump.decide`: 2^22 elements on a CPU, where its passes are few enough that
    the per-block dispatch of some forty small ops matters (83 rows at V = 50k, a 32 MiB float64 work buffer), and
    :func:`chunk_rows`' on a GPU."""
    return max(16, _DECIDE_ELEMS // width) if device.type == "cpu" else chunk_rows(width, device)


def _exact_sums(device: torch.device) -> bool:
    """Whether masked rows decide from float64 totals at once: on a GPU, where the float32 pass's check for rows
    near their threshold (``unsure.any()``) would wait for the device, and float64 costs about the same."""
    return device.type == "cuda"


def decision_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The precisions a stay-or-jump decision is tried in, in order (:meth:`StayOrJump.decide`): float32 then
    float64 on a CPU; float64 alone on a GPU (see :func:`_exact_sums`)."""
    return (torch.float64,) if _exact_sums(device) else (torch.float32, torch.float64)


def _weights(ls: torch.Tensor, coeff: torch.Tensor, mode: str, out: torch.Tensor) -> torch.Tensor:
    """w = e^{ls} (score) or e^{Phi ls} (temperature) into ``out`` (same shape as ls)."""
    if out.dtype != ls.dtype:  # the product and exp in out's precision
        out.copy_(ls)
        return (out.mul_(coeff) if mode == "temperature" else out).exp_()
    if mode == "temperature":
        return torch.mul(ls, coeff.to(out.dtype), out=out).exp_()
    return torch.exp(ls, out=out)


def _slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` covering range(n)."""
    return [slice(b, min(n, b + size)) for b in range(0, n, size)]


def _row_blocks(rows: torch.Tensor, width: int):
    """Slices of ``rows`` small enough for one cache-sized pass (the whole of them on a GPU)."""
    size = max(16, _BLOCK_ELEMS // width) if rows.device.type == "cpu" else max(1, chunk_elems(rows.device) // width)
    return _slices(rows.numel(), size)


def _run_start(rows: torch.Tensor) -> int | None:
    """The first of ``rows`` when they are consecutive ascending, else None; checked on CPU only (on a GPU the
    check would wait for the device)."""
    if rows.device.type != "cpu" or not rows.numel():
        return None
    first = int(rows[0])
    return first if int(rows[-1]) - first + 1 == rows.numel() else None


def _gather(real: torch.Tensor, rows: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """real[rows] without a copy when the rows are consecutive, else gathered into ``buf``."""
    first = _run_start(rows)
    if first is not None:
        return real[first : first + rows.numel()]
    return torch.index_select(real, 0, rows, out=buf[: rows.numel()])


def take_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t[rows], a view when the rows are consecutive."""
    first = _run_start(rows)
    return t[rows] if first is None else t[first : first + rows.numel()]


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


def _draw_masked(real: torch.Tensor, rows: torch.Tensor, u: torch.Tensor, rule: MaskedCategorical) -> torch.Tensor:
    """Tokens (R,) drawn at masked rows by the closed form of ``rule``; ``real`` (N, V-1) holds the
    log scores of the real tokens, ``rows`` (R,) the rows to draw, ``u`` (R,) their uniforms.

    The same draw as :func:`draw` on the full row [scale w, 1 - scale sum w] (stay last): with
    Z = max(scale sum w, 1), the row moves iff u Z < scale sum w, and then takes the first y whose
    cumulative w exceeds u Z / scale. So a row's move decision needs only its total, summed in float32
    and redone in float64 within a relative band of the threshold (and where float32 under- or
    overflows), and only the rows that move get a float64 CDF."""
    scale, coeff, mode, final = rule.scale, rule.coeff, rule.mode, rule.final
    if final:
        move = torch.ones_like(u, dtype=torch.bool)
    elif _exact_sums(real.device):  # every total in float64: the decision the float32 pass reaches, without a sync
        jump = scale * _row_sums(real, rows, coeff, mode, torch.float64)
        move = u * jump.clamp_min(1.0) < jump
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


_POISSON_NORMAL = 50.0  # above this mean a Poisson count is drawn by its normal approximation
_SCREEN = 1e-15  # below 1 - lam by this, u < fl(e^{-lam}) for sure (exp within 1 ulp, 1 - lam within half of one)
_FFT_ELEMS = 1 << 22  # complex elements per row block of the compound-Poisson likelihood


def poisson_counts(lam: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Poisson(lam) counts by inverse CDF from uniforms u (same shape, float64): the smallest n with
    F(n) > u; means above 50 use round(lam + sqrt(lam) Phi^{-1}(u)) (their inverse CDF underflows)."""
    lam = lam.to(torch.float64)
    big = lam > _POISSON_NORMAL
    n = torch.zeros_like(lam, dtype=torch.long)
    # e^{-lam} >= 1 - lam, so u below 1 - lam (less a few ulps for the roundings of both sides) draws no jump:
    # P(0) = e^{-lam} is computed only at the few entries above that, whose u is then compared with it exactly
    near = ((u >= (1 - lam) - _SCREEN) & ~big & (lam > 0)).reshape(-1).nonzero().squeeze(-1)
    rate, goal = lam.reshape(-1)[near], u.reshape(-1)[near]
    p = torch.exp(-rate)
    jumps = goal >= p  # the entries with at least one jump
    todo, rate, goal, p = near[jumps], rate[jumps], goal[jumps], p[jumps]
    flat_n = n.reshape(-1)
    cdf, k = p.clone(), 0
    while todo.numel():  # only the entries still below their uniform are carried to the next count
        k += 1
        flat_n[todo] += 1
        p = p * rate / k
        cdf = cdf + p
        more = (goal >= cdf) & ((p > cdf * 1e-17) | (k < rate))  # past the mode, terms below float64's resolution end it
        todo, rate, goal, p, cdf = todo[more], rate[more], goal[more], p[more], cdf[more]
    if lam.device.type != "cpu":  # every entry: finding the large means would wait for the device
        return torch.where(big, _normal_counts(lam, u), n)
    at = big.nonzero(as_tuple=True)  # on a CPU the (slow) inverse normal only where it is used
    if at[0].numel():
        n[at] = _normal_counts(lam[at], u[at])
    return n


def _normal_counts(lam: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """round(lam + sqrt(lam) Phi^{-1}(u)), at least 0: :func:`poisson_counts` above a mean of 50 (float64 -> long)."""
    return torch.round(lam + lam.sqrt() * torch.special.ndtri(u.clamp(1e-300, 1 - 1e-16))).clamp_min(0).long()


def _displacement_law(lam: torch.Tensor, x: torch.Tensor, span: int, size: int) -> torch.Tensor:
    """P(D = d) (n, size) for d = 0..span then -(size - span - 1)..-1 (FFT order): D = sum_z n_z (z - x)."""
    total = lam.sum(-1, keepdim=True)
    offsets = torch.arange(lam.shape[1], device=x.device)
    grid = lam.new_zeros(lam.shape[0], size).scatter_add(-1, (offsets[None, :] - x[:, None]) % size, lam)
    return torch.fft.ifft(torch.exp(torch.fft.fft(grid) - total)).real.clamp_min(0.0)


def compound_poisson_log_prob(intensity: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log P(clamp(x + sum_z n_z (z - x), 0, S-1) = y) for independent n_z ~ Poisson(intensity_z):
    intensity (R, S) (0 at x), x, y (R,) -> (R,) float64, differentiable in ``intensity``.

    Rows whose total rate is at most 50 (the tau-leaping regime) are exact: the displacement's law is
    exp(FFT(lambda) - sum lambda) transformed back on a grid wide enough for all but a negligible tail of the
    jump count (8 sd), the clamped ends taking the mass beyond them; the gradient is exact too,
    d P(y) / d lambda_z = P(y after one more jump to z) - P(y), computed with the law so no FFT graph is kept.
    Rows with more jumps use the normal law of the displacement (mean sum lambda_z (z - x), variance
    sum lambda_z (z - x)^2) over the clamped bins, as :func:`poisson_counts` draws them."""
    r, s = intensity.shape
    total = intensity.detach().sum(-1)
    small = total <= _POISSON_NORMAL
    large = torch.isfinite(total) & ~small
    # a rate that overflowed (a line search trying a huge Phi) is an impossible move: a finite, very low log-probability
    out = torch.where(torch.isfinite(total), 0.0, -1e30).to(torch.float64)
    if bool(large.any()):
        rows = large.nonzero().squeeze(-1)
        lam = intensity[rows].to(torch.float64)
        step = (torch.arange(s, device=x.device)[None, :] - x[rows, None]).to(torch.float64)
        mean, sd = (lam * step).sum(-1), (lam * step**2).sum(-1).sqrt()
        to = y[rows].to(torch.float64) - x[rows].to(torch.float64)
        upper = torch.where(y[rows] == s - 1, torch.full_like(to, math.inf), to + 0.5)
        lower = torch.where(y[rows] == 0, torch.full_like(to, -math.inf), to - 0.5)
        z = torch.distributions.Normal(mean, sd)
        out = out.index_put((rows,), torch.log((z.cdf(upper) - z.cdf(lower)).clamp_min(1e-300)))
    if bool(small.any()):
        rows = small.nonzero().squeeze(-1)
        out = out.index_put((rows,), _PoissonEnd.apply(intensity[rows].to(torch.float64), x[rows], y[rows]))
    return out


class _PoissonEnd(torch.autograd.Function):
    """log P(end = y) of :func:`compound_poisson_log_prob`'s exact rows, with the gradient computed alongside."""

    @staticmethod
    def forward(ctx, lam, x, y):
        r, s = lam.shape
        jumps = float(lam.sum(-1).max()) if r else 0.0
        span = (s - 1) * int(jumps + 8 * jumps**0.5 + 8)
        size = 1 << max(1, (2 * span).bit_length())
        block = max(1, _FFT_ELEMS // (size * 4))
        logp, grad = lam.new_zeros(r), lam.new_zeros(r, s)
        levels = torch.arange(s, device=x.device)
        lowest = -(size - span - 1)  # the most negative displacement of the grid (FFT order: 0..span, then negatives)
        for i in range(0, r, block):
            j = slice(i, i + block)
            law = _displacement_law(lam[j], x[j], span, size)
            cum = law.roll(-(span + 1), -1).cumsum(-1)  # ascending displacement: P(D <= lowest + i)

            def p_end(shift):  # P(clamp(x + D + shift) = y) for shifts (n, k): the displacement d = y - x - shift
                need = (y[j, None] - x[j, None] - shift)  # interior: D = need
                at = lambda v: cum.gather(-1, (v - lowest).clamp(0, size - 1)) * (v >= lowest)  # noqa: E731  P(D <= v)
                interior = at(need) - at(need - 1)
                low_end = at(need)  # y = 0: P(D <= need)
                high_end = 1 - at(need - 1)  # y = S - 1: P(D >= need)
                yy = y[j, None].expand_as(need)
                return torch.where(yy == 0, low_end, torch.where(yy == s - 1, high_end, interior)).clamp_min(0.0)

            p = p_end(torch.zeros_like(x[j, None])).squeeze(-1).clamp_min(1e-300)
            shifted = p_end(levels[None, :] - x[j, None])  # one more jump to each level z
            logp[j] = torch.log(p)
            grad[j] = (shifted - p[:, None]) / p[:, None]
        ctx.save_for_backward(grad)
        return logp

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad_out[:, None] * grad, None, None


@dataclass(frozen=True, eq=False)
class PoissonJumps(Kernel):
    """tau-leaping for ordinal data: independent Poisson(intensity_z) jumps to every level z, the
    displacements sum_z n_z (z - x) added to x and clamped to [0, S-1]. ``fn(graph, noise, log_score, x,
    *args)`` gives the intensities (R, S) (expected jumps over the step, 0 at x)."""

    fn: Callable
    args: tuple = ()
    kind = "poisson-jumps"

    def intensity(self, graph, noise, log_score, x) -> torch.Tensor:
        return self.fn(graph, noise, log_score, x, *self.args)

    def draw(self, intensity: torch.Tensor, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """New levels (R,) from intensities (R, S), levels x (R,) and uniforms u (R, S)."""
        s = intensity.shape[1]
        counts = poisson_counts(intensity, u)
        shift = (counts * (torch.arange(s, device=x.device)[None, :] - x[:, None])).sum(-1)
        return (x + shift).clamp(0, s - 1)

    def log_prob(self, graph, noise, log_score, x, y, *extra):
        return compound_poisson_log_prob(self.intensity(graph, noise, log_score, x), x, y)
