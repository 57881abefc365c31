"""SEDD's training objective on the absorbing graph: denoising score entropy (Lou et al. 2024, eq. 7).

For a masked slot of x_t whose clean token is y0, the true concrete score is
s*_y = [y = y0] / (e^sigma - 1) (given x0), and the per-slot denoising score entropy is

    sum_{y != M} s_y - r log s_{y0} + r (log r - 1),    r = 1 / (e^sigma - 1),

which is >= 0 and 0 iff s = s*; in expectation over y0 ~ p(y0 | x_t) it is minimised by
s_y = r p(y | x_t), the score the sampler needs. Unmasked slots contribute nothing.
"""

from __future__ import annotations

import torch

from lsdtool.diffusion.graphs import Absorb
from lsdtool.diffusion.noise import log_expm1


def absorb_score_entropy(log_score: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
                         sigma: torch.Tensor, mask_id: int | None = None) -> torch.Tensor:
    """Per-position score entropy (B, L): log_score (B, L, V), x_t, x0 (B, L), sigma (B,); the mask is
    ``mask_id`` (default the last id)."""
    graph = Absorb(log_score.shape[-1], mask_id)
    masked = graph.moving(x_t)
    log_r = -log_expm1(sigma)[:, None].expand_as(x_t)  # log of 1 / (e^sigma - 1)
    r = log_r.exp()
    positive = graph.real_columns(log_score).exp().sum(-1)
    negative = r * log_score.gather(-1, x0[..., None]).squeeze(-1)
    constant = r * (log_r - 1)
    return torch.where(masked, positive - negative + constant, torch.zeros_like(positive))


def absorb_loss(log_score: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                dsigma: torch.Tensor, mask_id: int | None = None) -> torch.Tensor:
    """Per-sample loss (B,): sigma'(t) times the score entropy summed over positions (SEDD's DWDSE)."""
    return dsigma * absorb_score_entropy(log_score, x_t, x0, sigma, mask_id).sum(-1)


def absorb_corrupt(x0: torch.Tensor, sigma: torch.Tensor, mask_id: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t (B, L) of the absorbing forward process: each token of x0 becomes ``mask_id`` w.p. 1 - e^{-sigma}."""
    move = 1 - torch.exp(-sigma)
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    return torch.where(u < move[:, None], torch.full_like(x0, mask_id), x0)
