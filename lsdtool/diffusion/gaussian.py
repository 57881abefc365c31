"""The ordinal ``gaussian`` graph of tauLDR (Campbell et al. 2022, ``GaussianTargetRate``; DESIGN §12).

S ordinal levels; the base rate R jumps k levels at rate exp(-k²/rate_sigma²) towards the centre, the
opposite jumps weighted by detailed balance towards a discretised Gaussian pi (std Q_sigma), so
exp(c R) is computed exactly from the symmetric matrix pi^{1/2} R pi^{-1/2} with ``eigh``. The time
change is beta(t) = time_base ln(time_exponential) time_exponential^t. Convention: q[..., a, b] is
q_{t|0}(x_t = b | x_0 = a) and R[a, b] the rate from a to b, as in tauLDR.
"""

from __future__ import annotations

import math

import torch

from lsdtool import rng
from lsdtool.diffusion.graphs import GRAPHS, Graph
from lsdtool.diffusion.noise import Noise

_SPECTRA: dict = {}  # params -> (R, eig): an eigh of a 256 x 256 matrix is not free, and loads repeat
ZERO_BELOW = 1e-8  # tauLDR zeroes every q_{t|0} entry below this (float32 noise in its eig-based product)
EPS_RATIO = 1e-9  # tauLDR's eps in q(y|x0) / (q(x|x0) + eps)


def _spectrum(graph: "Gaussian") -> tuple:
    """(R, its symmetrised eigendecomposition) of a graph, computed once per parameter set (on CPU)."""
    key = (graph.S, graph.rate_sigma, graph.Q_sigma)
    if key not in _SPECTRA:
        with torch.device("cpu"):
            R = graph._base_rate()
            _SPECTRA[key] = (R, graph._symmetric_eig(R))
    return _SPECTRA[key]


class Gaussian(Graph):
    """tauLDR's GaussianTargetRate graph on S levels (vocab_size = S, no mask)."""

    name = "gaussian"
    mask_id = None

    def __init__(self, S: int, rate_sigma: float, Q_sigma: float, time_base: float, time_exponential: float):
        if int(S) < 2 or not rate_sigma > 0 or not Q_sigma > 0 or not time_base > 0 or not time_exponential > 1:
            raise ValueError("gaussian graph needs S >= 2, rate_sigma > 0, Q_sigma > 0, time_base > 0, "
                             "time_exponential > 1")
        super().__init__(int(S))
        self._params = {"S": int(S), "rate_sigma": float(rate_sigma), "Q_sigma": float(Q_sigma),
                        "time_base": float(time_base), "time_exponential": float(time_exponential)}
        self.S, self.rate_sigma, self.Q_sigma = int(S), float(rate_sigma), float(Q_sigma)
        self.time_base, self.time_exponential = float(time_base), float(time_exponential)
        self._dev: dict = {}
        self._R, self._eig = _spectrum(self)

    # --- the base rate and its spectrum (float64) ---------------------------------------------------

    def _base_rate(self) -> torch.Tensor:
        """R (S, S) float64: tauLDR's forward entries, their reverses by detailed balance, diagonal -row sum."""
        S = self.S
        i = torch.arange(S, dtype=torch.float64)[:, None]
        j = torch.arange(S, dtype=torch.float64)[None, :]
        vals = torch.exp(-torch.arange(S, dtype=torch.float64) ** 2 / self.rate_sigma**2)
        lower = (i < S // 2) & (j > i) & (j < S - i)  # rows below the centre jump up, towards it
        upper = (i > S // 2) & (j < i) & (j > S - 1 - i)  # rows above it jump down
        k = torch.where(lower, j - i - 1, i - j - 1).long().clamp(0, S - 1)
        fwd = torch.where(lower | upper, vals[k], 0.0)
        # rate[i, j] = rate[j, i] exp(-((j+1)^2 - (i+1)^2 + S(i+1) - S(j+1)) / (2 Q^2)) where rate[j, i] > 0
        balance = torch.exp(-((j + 1) ** 2 - (i + 1) ** 2 + S * (i + 1) - S * (j + 1)) / (2 * self.Q_sigma**2))
        rate = torch.where(fwd.T > 0, fwd.T * balance, fwd)
        rate.fill_diagonal_(0.0)
        return rate - torch.diag(rate.sum(1))

    def _log_pi(self) -> torch.Tensor:
        """log of the (unnormalised) reversible law of R: -((k+1)^2 - S(k+1)) / (2 Q^2), (S,) float64."""
        k1 = torch.arange(1, self.S + 1, dtype=torch.float64)
        lp = -(k1**2 - self.S * k1) / (2 * self.Q_sigma**2)
        return lp - lp.max()

    def _symmetric_eig(self, R: torch.Tensor):
        """(lambda (S,), U (S, S), pi^{-1/2}, pi^{1/2}) with pi^{1/2} R pi^{-1/2} = U diag(lambda) U^T."""
        half = 0.5 * self._log_pi()
        a = torch.exp(half)[:, None] * R * torch.exp(-half)[None, :]
        lam, u = torch.linalg.eigh(0.5 * (a + a.T))
        return lam, u, torch.exp(-half), torch.exp(half)

    def _on(self, device) -> tuple:
        device = torch.device(device)
        if device not in self._dev:
            self._dev[device] = (self._R.to(device), *(v.to(device) for v in self._eig))
        return self._dev[device]

    # --- the public operations ----------------------------------------------------------------------

    def rate_matrix(self, device="cpu") -> torch.Tensor:
        """The base rate R (S, S) float64: rows sum to 0; R_t = beta(t) R."""
        return self._on(device)[0]

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = time_base ln(time_exponential) time_exponential^t, t's shape; differentiable in t."""
        return self.time_base * math.log(self.time_exponential) * self.time_exponential**t

    def integral(self, t: torch.Tensor) -> torch.Tensor:
        """int_0^t beta = time_base (time_exponential^t - 1), t's shape; differentiable in t."""
        return self.time_base * (self.time_exponential**t - 1)

    def expm(self, c: torch.Tensor) -> torch.Tensor:
        """exp(c R) (..., S, S) float64 for c (...) >= 0, entries < 1e-8 zeroed as in tauLDR; differentiable in c."""
        c = torch.as_tensor(c).to(torch.float64)
        _, lam, u, inv_sqrt_pi, sqrt_pi = self._on(c.device)
        core = (u * torch.exp(c[..., None] * lam)[..., None, :]) @ u.T  # U e^{c Lambda} U^T
        q = inv_sqrt_pi[:, None] * core * sqrt_pi[None, :]
        return torch.where(q < ZERO_BELOW, torch.zeros((), dtype=q.dtype, device=q.device), q)

    def transition(self, t) -> torch.Tensor:
        """q_{t|0}[..., x0, y] = exp(int_0^t beta R) (..., S, S) float64 for t (...)."""
        t = torch.as_tensor(t)
        return self.expm(self.integral(t.to(torch.float64) if t.is_floating_point() else t.double()))

    def start_distribution(self) -> torch.Tensor:
        """tauLDR's initial law (S,) float64: exp(-(k+1 - S//2)^2 / (2 Q_sigma^2)) normalised (centre S//2 - 1)."""
        k1 = torch.arange(1, self.S + 1, dtype=torch.float64)
        p = torch.exp(-((k1 - self.S // 2) ** 2) / (2 * self.Q_sigma**2))
        return p / p.sum()

    @property
    def params(self) -> dict:
        return dict(self._params)

    def start_state(self, index: torch.Tensor, seed: int, length: int) -> torch.Tensor:
        """x at t = 1 (B, length): tauLDR's start law drawn from each sample's own stream."""
        return self.start_levels((index.shape[0], length), uniforms=rng.uniforms(seed, rng.STREAM_START, index, 0, length))

    def forward_rate(self, x: torch.Tensor) -> torch.Tensor:
        """R[x, y] for y != x (R, S) float64: the base rate out of each row's level."""
        return self.rate_matrix(x.device)[x].scatter(-1, x[:, None], 0.0)

    def log_score_from_x0(self, log_p0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The log concrete score from log p(x0 | x) at integrated rate sigma = int_0^t beta (B,)."""
        p0 = log_p0.double().exp()
        q = self.expm(sigma.to(torch.float64).reshape(-1))  # (B, S, S): [x0, y]
        denom = q.transpose(1, 2)[torch.arange(x.shape[0], device=x.device)[:, None], x]
        s = (p0 / (denom + EPS_RATIO)) @ q
        pos = s > 0
        out = torch.where(pos, torch.log(torch.where(pos, s, torch.ones_like(s))), torch.full_like(s, -1e4))
        return out.scatter(-1, x[..., None], 0.0).to(log_p0.dtype)

    def start_levels(self, shape, generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None,
                     device="cpu") -> torch.Tensor:
        """x at t = 1 (``shape``) long, by inverse CDF of :meth:`start_distribution` from float64 ``uniforms``
        (of that shape) or from ``torch.rand`` with ``generator``."""
        if uniforms is None:
            uniforms = torch.rand(tuple(shape), generator=generator, dtype=torch.float64, device=device)
        elif tuple(uniforms.shape) != tuple(shape):
            raise ValueError(f"uniforms have shape {tuple(uniforms.shape)}, expected {tuple(shape)}")
        cdf = self.start_distribution().to(uniforms.device).cumsum(0)
        u = uniforms.to(torch.float64) * cdf[-1]
        return torch.searchsorted(cdf, u.reshape(-1), right=True).clamp_max(self.S - 1).reshape(u.shape)

    def moving(self, x: torch.Tensor) -> torch.Tensor:
        """Every position can move in reverse (no absorbing state)."""
        return torch.ones_like(x, dtype=torch.bool)

    def transp_rate(self, x: torch.Tensor) -> torch.Tensor:
        """R[y, x] for every y: the base rate into each row's token x (R,) -> (R, S) float64."""
        return self.rate_matrix(x.device).T[x]

    def transp_transition(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """q(x | x0 = y) for every y at integrated rate sigma: x (R,), sigma (R,) -> (R, S) float64."""
        return self.expm(sigma.to(x.device))[torch.arange(x.shape[0], device=x.device), :, x]

    def score(self, p0: torch.Tensor, x: torch.Tensor, t: torch.Tensor, eps: float = EPS_RATIO) -> torch.Tensor:
        """Concrete score s_y = sum_x0 p(x0|x) q(y|x0) / (q(x|x0) + eps): p0 (B, D, S), x (B, D), t (B,) -> (B, D, S)
        in p0's dtype; differentiable in t and p0."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        if x.device.type == "cpu" and bool((t == t[:1]).all()):  # one time for the batch (a sampler step): one q
            q = self.transition(t[:1]).to(p0.dtype).expand(x.shape[0], -1, -1)
        else:
            q = self.transition(t).to(p0.dtype)  # (B, S, S): [x0, y]
        denom = q.transpose(1, 2)[torch.arange(x.shape[0], device=x.device)[:, None], x]  # (B, D, S): q(x | x0)
        return (p0 / (denom + eps)) @ q

    def log_score(self, p0: torch.Tensor, x: torch.Tensor, t: torch.Tensor, eps: float = EPS_RATIO,
                  zero: float = -math.inf) -> torch.Tensor:
        """log s_y (B, D, S) in p0's dtype, 0 at the current token and ``zero`` where s_y = 0. The sum runs in
        float64: float32 tails reach subnormal s_y, whose 1/s_y overflows the gradient (pass p0 in float64
        too when gradients flow into it)."""
        s = self.score(p0.to(torch.float64), x, t, eps)
        pos = s > 0
        out = torch.log(torch.where(pos, s, torch.ones((), dtype=s.dtype, device=s.device)))
        out = torch.where(pos, out, torch.full((), zero, dtype=s.dtype, device=s.device))
        return out.scatter(-1, x[..., None], 0.0).to(p0.dtype)

    def reverse_rates(self, p0: torch.Tensor, x: torch.Tensor, t: torch.Tensor, eps: float = EPS_RATIO
                      ) -> torch.Tensor:
        """tauLDR's reverse rates R_hat(x -> y) = beta(t) R[y, x] s_y (B, D, S), 0 at y = x."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        fwd = self.rate_matrix(x.device).T[x].to(p0.dtype)  # (B, D, S): R[y, x]
        beta = self.beta(t.to(torch.float64)).to(p0.dtype).reshape(-1, 1, 1)
        rate = beta * fwd * self.score(p0, x, t, eps)
        return rate.scatter(-1, x[..., None], 0.0)


class TimeChange(Noise):
    """The gaussian graph's time change as the engine's schedule: total(t) = int_0^t beta, rate(t) = beta(t)."""

    name = "tauldr-exponential"

    def __init__(self, graph: Gaussian):
        self.graph = graph

    def total(self, t):
        return self.graph.integral(torch.as_tensor(t))

    def rate(self, t):
        return self.graph.beta(torch.as_tensor(t))

    def describe(self) -> str:
        return f"{self.name}(time_base={self.graph.time_base:g},time_exponential={self.graph.time_exponential:g})"


GRAPHS["gaussian"] = lambda vocab_size, **params: Gaussian(S=vocab_size, **{k: v for k, v in params.items() if k != "S"})
