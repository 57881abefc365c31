"""RADD (Ou et al. 2025, "Your Absorbing Discrete Diffusion Secretly Models the Conditional
Distributions of Clean Data")."""

from __future__ import annotations

import torch

from lsdtool.diffusion import make_noise
from lsdtool.models.ddit import DDiT, absorb_log_score
from lsdtool.models.pretrained import PretrainedModel


class RADD(PretrainedModel):
    """Time-free DDiT (no adaLN) giving p(x0 | unmasked); absorbing graph, V = tokens + 1.

    Config: tokens, noise.type (loglinear by default), model.{hidden_size, n_heads, n_blocks, length}.
    """

    family = "radd"

    def __init__(self, config: dict, *, name: str, fingerprint: str):
        m, n = config["model"], config.get("noise", {})
        vocab_size = int(config["tokens"]) + 1
        net = DDiT(vocab_size, int(m["hidden_size"]), int(m["n_heads"]), int(m["n_blocks"]))
        noise = make_noise(n.get("type", "loglinear"), float(n.get("sigma_min", 1e-4)),
                           float(n.get("sigma_max", 20.0)))
        super().__init__(net, name=name, fingerprint=fingerprint, graph="absorb", vocab_size=vocab_size,
                         seq_len=int(m["length"]), noise=noise)

    def log_condition(self, x: torch.Tensor) -> torch.Tensor:
        """The official output (B, L, V): log p(x0 | unmasked) over real tokens, raw logit in the mask column."""
        out = self.net(x)
        return torch.cat([out[..., :-1].log_softmax(-1), out[..., -1:]], dim=-1)

    def log_score(self, x: torch.Tensor, t) -> torch.Tensor:
        """x (B, L), t (B,) -> (B, L, V) float32: log p(y | unmasked) - log(e^sigma_bar - 1) at masked slots."""
        return absorb_log_score(self.net(x), x, self.sigma_bar(t, x.shape[0]))


def build(config: dict, found) -> RADD:
    """The RADD adapter of a located checkpoint (the family table's entry point)."""
    from lsdtool.models.loading import load_checkpoint

    return load_checkpoint(RADD, config, found)
