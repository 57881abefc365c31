"""SEDD (Lou et al. 2024, "Discrete Diffusion Modeling by Estimating the Ratios of the Data Distribution")."""

from __future__ import annotations

import math

import torch

from lsdtool.diffusion import make_noise
from lsdtool.models.ddit import DDiT, log_expm1
from lsdtool.models.pretrained import PretrainedModel


class SEDD(PretrainedModel):
    """DDiT conditioned on sigma_bar(t) that outputs the log concrete score directly.

    With ``scale_by_sigma`` (absorb only) the output is shifted by -log(e^sigma - 1) - log(V - 1).
    Config (Hydra, as JSON): tokens, graph.type, noise.{type, sigma_min, sigma_max},
    model.{hidden_size, n_heads, n_blocks, cond_dim, scale_by_sigma, length}.
    """

    family = "sedd"

    def __init__(self, config: dict, *, name: str, fingerprint: str):
        graph, m, n = config["graph"]["type"], config["model"], config["noise"]
        if graph not in ("absorb", "uniform"):
            raise ValueError(f"unknown graph {graph!r}")
        vocab_size = int(config["tokens"]) + (graph == "absorb")
        self.scale_by_sigma = bool(m["scale_by_sigma"])
        if self.scale_by_sigma and graph != "absorb":
            raise ValueError("scale_by_sigma is only defined for the absorbing graph")
        net = DDiT(vocab_size, int(m["hidden_size"]), int(m["n_heads"]), int(m["n_blocks"]), int(m["cond_dim"]))
        noise = make_noise(n["type"], float(n.get("sigma_min", 1e-4)), float(n.get("sigma_max", 20.0)))
        super().__init__(net, name=name, fingerprint=fingerprint, graph=graph, vocab_size=vocab_size,
                         seq_len=int(m["length"]), noise=noise)

    def log_score(self, x: torch.Tensor, t) -> torch.Tensor:
        """x (B, L), t (B,) -> (B, L, V) float32, 0 at the current token."""
        sigma = self.sigma_bar(t, x.shape[0])
        out = self.net(x, sigma)
        if self.scale_by_sigma:
            shift = log_expm1(sigma) + math.log(self.vocab_size - 1)
            out = out.sub_(shift.to(out.dtype)[:, None, None])
        return out.scatter_(-1, x[..., None], 0.0)


def build(config: dict, found) -> SEDD:
    """The SEDD adapter of a located checkpoint (the family table's entry point)."""
    from lsdtool.models.loading import load_checkpoint

    return load_checkpoint(SEDD, config, found)
