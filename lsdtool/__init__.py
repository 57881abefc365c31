"""lsd: learnable sampler distillation for discrete diffusion models."""

__version__ = "0.1.0"
