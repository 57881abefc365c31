"""Noise schedules: total noise sigma_bar(t) and rate sigma'(t) for t in [0, 1] (DESIGN §4)."""

from __future__ import annotations

import math

import torch


class Noise:
    """A schedule; ``noise(t)`` returns ``(total, rate)`` with the shape of ``t``."""

    name: str

    def total(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.total(t), self.rate(t)

    def describe(self) -> str:
        return self.name


class LogLinear(Noise):
    """sigma_bar(t) = -log1p(-(1-eps) t), sigma'(t) = (1-eps)/(1-(1-eps) t); e^{-sigma_bar} = 1-(1-eps)t."""

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        self.eps = float(eps)

    def total(self, t):
        return -torch.log1p(-(1 - self.eps) * t)

    def rate(self, t):
        return (1 - self.eps) / (1 - (1 - self.eps) * t)


class Geometric(Noise):
    """sigma_bar(t) = sigma_min^{1-t} sigma_max^t, sigma'(t) = sigma_bar(t) ln(sigma_max/sigma_min)."""

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def total(self, t):
        return self.sigma_min ** (1 - t) * self.sigma_max**t

    def rate(self, t):
        return self.total(t) * math.log(self.sigma_max / self.sigma_min)

    def describe(self) -> str:
        return f"geometric({self.sigma_min:g},{self.sigma_max:g})"


def make_noise(kind: str, sigma_min: float = 1e-4, sigma_max: float = 20.0, eps: float = 1e-3) -> Noise:
    """Build a schedule from its config name (``loglinear`` or ``geometric``)."""
    if kind == "loglinear":
        return LogLinear(eps)
    if kind == "geometric":
        return Geometric(sigma_min, sigma_max)
    raise ValueError(f"unknown noise schedule {kind!r} (expected loglinear or geometric)")


NEVER = -1e4


def log_expm1(sigma: torch.Tensor) -> torch.Tensor:
    """log(e^sigma - 1), with expm1 below 0.5 and exp - 1 above (as SEDD computes it)."""
    return torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1).log()
