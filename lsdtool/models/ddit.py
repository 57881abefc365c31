"""The DDiT transformer shared by SEDD, RADD and MDLM (Lou et al. 2024), and their score heads.

Module and parameter names mirror the official checkpoints, so their state dicts load as they are.
Shapes: B batch, L length, D hidden size, H heads, C conditioning size, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lsdtool.diffusion.noise import NEVER, log_expm1  # noqa: F401  (log_expm1: re-exported for the adapters)
from lsdtool.errors import LsdError

# Rotary frequencies are recomputed from the head size, so checkpoints may carry this buffer or not.
OPTIONAL_KEYS = ("rotary_emb.inv_freq",)
# Log score of moves an absorbing reverse process never makes (from unmasked tokens): exp() is 0.


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x (1 + scale) + shift; x (B, L, D), shift/scale (B, 1, D)."""
    return x * (1 + scale) + shift


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotation: (x1, x2) -> (-x2, x1) over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) on head dim d, base 10000; applied to q and k only."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (L, 1, d) for broadcasting over (B, L, H, d); frequencies base^{-2i/d}."""
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin; x (B, L, H, d)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm in float32 without affine parameters, then x weight (+ bias)."""

    def __init__(self, dim: int, bias: bool = False):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = F.layer_norm(x.float(), [self.dim])
        x = x * self.weight
        return x + self.bias if self.bias is not None else x


class EmbeddingLayer(nn.Module):
    """Token embedding as one (V, D) matrix (checkpoint key ``embedding``)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding[x]


class TimestepEmbedder(nn.Module):
    """sigma (B,) -> (B, C): MLP of the 256-dim [cos, sin] embedding of sigma f_k, f_k = 10000^{-k/128}."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class DDiTBlock(nn.Module):
    """Pre-norm transformer block; adaLN-modulated with gated residuals when ``cond_dim`` is given,
    else plain residuals around LayerNorms with bias (RADD)."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int | None = None, mlp_ratio: int = 4):
        super().__init__()
        adaptive = cond_dim is not None
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim, bias=not adaptive)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim, bias=not adaptive)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim)
        )
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim) if adaptive else None

    def attention(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Non-causal multi-head self-attention with rotary q, k: (B, L, D) -> (B, L, D)."""
        b, l, d = x.shape
        qkv = self.attn_qkv(x).view(b, l, 3, self.n_heads, d // self.n_heads)
        cos, sin = rotary
        q, k, v = apply_rotary(qkv[:, :, 0], cos, sin), apply_rotary(qkv[:, :, 1], cos, sin), qkv[:, :, 2]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.attn_out(out.transpose(1, 2).reshape(b, l, d))

    def forward(self, x: torch.Tensor, rotary, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.adaLN_modulation is None:
            x = x + self.attention(self.norm1(x), rotary)
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        x = x + gate1 * self.attention(modulate(self.norm1(x), shift1, scale1), rotary)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Final norm (adaLN-modulated with shift, scale when ``cond_dim`` is given) and the vocabulary projection."""

    def __init__(self, dim: int, vocab_size: int, cond_dim: int | None = None):
        super().__init__()
        adaptive = cond_dim is not None
        self.norm_final = LayerNorm(dim, bias=not adaptive)
        self.linear = nn.Linear(dim, vocab_size)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim) if adaptive else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm_final(x)
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
            x = modulate(x, shift, scale)
        return self.linear(x)


class DDiT(nn.Module):
    """x (B, L) long [, sigma (B,)] -> raw outputs (B, L, V) float32; conditioned on sigma iff ``cond_dim``.

    On CUDA the blocks run under bfloat16 autocast, as in the official code.
    """

    def __init__(self, vocab_size: int, hidden_size: int, n_heads: int, n_blocks: int, cond_dim: int | None = None):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {n_heads} heads")
        self.vocab_embed = EmbeddingLayer(hidden_size, vocab_size)
        self.sigma_map = TimestepEmbedder(cond_dim) if cond_dim is not None else None
        self.rotary_emb = Rotary(hidden_size // n_heads)
        self.blocks = nn.ModuleList(DDiTBlock(hidden_size, n_heads, cond_dim) for _ in range(n_blocks))
        self.output_layer = FinalLayer(hidden_size, vocab_size, cond_dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        h = self.vocab_embed(x)
        c = F.silu(self.sigma_map(sigma)) if self.sigma_map is not None else None
        rotary = self.rotary_emb(x.shape[1], x.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            for block in self.blocks:
                h = block(h, rotary, c)
            out = self.output_layer(h, c)
        return out.float()


def load_weights(net: nn.Module, state: dict, source: str) -> None:
    """Assign ``state`` to ``net``'s parameters as float32, strictly (only :data:`OPTIONAL_KEYS` may be
    missing or extra); ``net`` may live on the meta device. Raises LsdError naming ``source`` and the problem.
    """
    state = {k: v for k, v in state.items() if k not in OPTIONAL_KEYS}
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    for keys, what in ((missing, "lacks"), (extra, "has unexpected")):
        if keys:
            more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
            raise LsdError(f"{source} {what} weights {', '.join(keys[:3])}{more}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise LsdError(f"{source}: weight {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if not v.is_floating_point():
            raise LsdError(f"{source}: weight {k} has dtype {v.dtype}, expected a floating-point tensor")
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    net.load_state_dict(state, strict=True, assign=True)


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode, no gradients into the weights."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def absorb_log_score(logits: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Log concrete score of an absorbing model from its x0-logits (Ou et al. 2025; MDLM's "subs").

    logits (B, L, V) with the mask last (its column ignored), x (B, L), sigma = sigma_bar(t) (B,).
    At masked slots log s_y = log p(y | unmasked) - log(e^sigma - 1); unmasked slots keep their token
    (0 there, :data:`NEVER` elsewhere). Returns (B, L, V) float32, 0 at the current token.
    """
    lse = torch.logsumexp(logits[..., :-1], dim=-1, keepdim=True)
    out = logits - (lse + log_expm1(sigma).to(logits.dtype)[:, None, None])
    out = out.masked_fill_((x != logits.shape[-1] - 1)[..., None], NEVER)
    out[..., -1] = NEVER
    return out.scatter_(-1, x[..., None], 0.0)
