"""A tiny stand-in image model for the image I/O tests: S levels on a uniform graph, shape (C, H, W).

p(x0 | x_t) at each position is a fixed random table of that position's level: enough structure that
samples differ per index and seed, and cheap enough for every test.
"""

import torch

from lsdtool import DiffusionModel
from lsdtool.diffusion import Geometric, Uniform


class TinyImage(DiffusionModel):
    """An x0-predicting model of (C, H, W) images with S levels (uniform graph, geometric noise)."""

    def __init__(self, levels: int = 16, shape=(3, 4, 4), seed: int = 0):
        self.shape, self.vocab_size = tuple(shape), levels
        self.seq_len = shape[0] * shape[1] * shape[2]
        self.graph, self.noise = Uniform(levels), Geometric(1e-3, 5.0)
        self.name, self.fingerprint = f"tiny-image-{levels}-{'x'.join(map(str, shape))}", f"tiny-image:{levels}:{shape}:{seed}"
        g = torch.Generator().manual_seed(seed)
        self.table = 3.0 * torch.randn(self.seq_len, levels, levels, generator=g, dtype=torch.float64)

    def x0_log_probs(self, x, t):
        pos = torch.arange(x.shape[1], device=x.device)
        return self.table.to(x.device)[pos, x].log_softmax(-1).float()

    def log_score(self, x, t):
        return self.graph.log_score_from_x0(self.x0_log_probs(x, t), x, self.noise.total(t))


def make():
    return TinyImage(16, (3, 4, 4))


def grey():
    return TinyImage(4, (1, 4, 4))


def full():
    return TinyImage(256, (3, 4, 4))


def mean_level(x):
    """A per-sample metric for compare runs on the stand-in: the mean level of each image."""
    return x.double().mean(-1)
