"""MDLM (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models"), "subs" parameterization."""

from __future__ import annotations

import torch

from lsdtool.diffusion import LogLinear
from lsdtool.models.ddit import DDiT, absorb_log_score
from lsdtool.models.pretrained import PretrainedModel


class MDLM(PretrainedModel):
    """DDiT returning x0-logits, fed sigma_bar(t), or 0 without ``time_conditioning``; mask = V - 1.

    HF-style config: vocab_size (mask included), model_length, hidden_dim, cond_dim, n_blocks,
    n_heads, time_conditioning. Checkpoint keys carry a ``backbone.`` prefix.
    """

    family = "mdlm"
    weight_prefix = "backbone."

    def __init__(self, config: dict, *, name: str, fingerprint: str):
        vocab_size = int(config["vocab_size"])
        net = DDiT(vocab_size, int(config["hidden_dim"]), int(config["n_heads"]), int(config["n_blocks"]),
                   int(config["cond_dim"]))
        self.time_conditioning = bool(config.get("time_conditioning", False))
        super().__init__(net, name=name, fingerprint=fingerprint, graph="absorb", vocab_size=vocab_size,
                         seq_len=int(config["model_length"]), noise=LogLinear(1e-3))

    def logits(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Raw backbone output (B, L, V) at total noise sigma (B,) (taken as 0 when absent or unconditioned)."""
        if sigma is None or not self.time_conditioning:
            sigma = torch.zeros(x.shape[0], device=x.device)
        return self.net(x, sigma)

    def log_score(self, x: torch.Tensor, t) -> torch.Tensor:
        """x (B, L), t (B,) -> (B, L, V) float32: log p(y | unmasked) - log(e^sigma_bar - 1) at masked slots."""
        sigma = self.sigma_bar(t, x.shape[0])
        return absorb_log_score(self.logits(x, sigma), x, sigma)


def build(config: dict, found) -> MDLM:
    """The MDLM adapter of a located checkpoint (the family table's entry point)."""
    from lsdtool.models.loading import load_checkpoint

    return load_checkpoint(MDLM, config, found)
