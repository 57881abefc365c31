"""tauLDR's DDPM-style image UNet with the discretised-logistic x0 head (DESIGN §12).

Module and parameter names follow tauLDR's ``lib/networks/networks.py`` so its state dicts load
as they are, and parameters are registered in its order (its EMA shadow list is in that order).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(C // 4, 32) groups and eps 1e-6, as tauLDR."""
    return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int, max_positions: float = 10000.0) -> torch.Tensor:
    """[sin, cos] features of t (B,) float32 at frequencies exp(-k ln(max_positions) / (dim/2 - 1)) -> (B, dim)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(max_positions) / (half - 1)))
    emb = t.float()[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb


class NiN(nn.Module):
    """A 1x1 linear map over channels: (B, in, H, W) -> (B, out, H, W)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        bound = math.sqrt(3 * 0.1 / ((in_ch + out_ch) / 2))  # tauLDR's default_init(0.1): fan_avg uniform
        self.W = nn.Parameter(torch.empty(in_ch, out_ch).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x):
        return (torch.einsum("bhwi,ik->bhwk", x.permute(0, 2, 3, 1), self.W) + self.b).permute(0, 3, 1, 2)


class AttnBlock(nn.Module):
    """Self-attention over the H·W positions with channel-wise q, k, v: (B, C, H, W) -> same."""

    def __init__(self, channels: int, skip_rescale: bool):
        super().__init__()
        self.skip_rescale = skip_rescale
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0, self.NIN_1 = NiN(channels, channels), NiN(channels, channels)
        self.NIN_2, self.NIN_3 = NiN(channels, channels), NiN(channels, channels)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = self.NIN_0(h), self.NIN_1(h), self.NIN_2(h)
        w = torch.einsum("bchw,bcij->bhwij", q, k) * (int(C) ** (-0.5))
        w = F.softmax(w.reshape(B, H, W, H * W), dim=-1).reshape(B, H, W, H, W)
        h = self.NIN_3(torch.einsum("bhwij,bcij->bchw", w, v))
        return (x + h) / SQRT2 if self.skip_rescale else x + h


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + dense(SiLU(temb)), GroupNorm-SiLU-dropout-conv, residual (NiN when C changes)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, skip_rescale: bool):
        super().__init__()
        self.in_ch, self.out_ch, self.skip_rescale = in_ch, out_ch, skip_rescale
        self.groupnorm0 = group_norm(in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.dense0 = nn.Linear(temb_dim, out_ch)
        self.groupnorm1 = group_norm(out_ch)
        self.dropout0 = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        if out_ch != in_ch:
            self.nin = NiN(in_ch, out_ch)

    def forward(self, x, temb):
        h = self.conv0(F.silu(self.groupnorm0(x)))
        h = h + self.dense0(F.silu(temb))[:, :, None, None]
        h = self.conv1(self.dropout0(F.silu(self.groupnorm1(h))))
        if self.out_ch != self.in_ch:
            x = self.nin(x)
        return (x + h) / SQRT2 if self.skip_rescale else x + h


class Downsample(nn.Module):
    """Pad right/bottom by one, 3x3 conv with stride 2: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """tauLDR's UNet: (B, C, H, W) levels, t (B,) -> (B, 2C, H, W) = [mu after the tanh residual, log_scale].

    ``attn_scale`` is tauLDR's ``scale_count_to_put_attn`` (the one resolution with attention blocks).
    """

    def __init__(self, *, ch: int, ch_mult, num_res_blocks: int, input_channels: int, attn_scale: int,
                 data_min_max, dropout: float, skip_rescale: bool, time_scale_factor: float, time_embed_dim: int):
        super().__init__()
        self.ch, self.ch_mult, self.num_res_blocks = int(ch), [int(m) for m in ch_mult], int(num_res_blocks)
        self.attn_scale, self.data_min_max = int(attn_scale), (data_min_max[0], data_min_max[1])
        self.time_scale_factor, self.time_embed_dim = time_scale_factor, int(time_embed_dim)
        self.input_channels = int(input_channels)
        temb_dim = 4 * self.time_embed_dim
        self.temb_modules = nn.ModuleList([nn.Linear(self.time_embed_dim, temb_dim), nn.Linear(temb_dim, temb_dim)])
        self.input_conv = nn.Conv2d(self.input_channels, self.ch, kernel_size=3, padding=1)
        n_scales = len(self.ch_mult)

        def res(cin, cout):
            return ResBlock(cin, cout, temb_dim, dropout, skip_rescale)

        # down path: a skip is kept after each resolution block (with its attention) and each downsampling
        h_cs, in_ch, down, self._keep = [self.ch], self.ch, [], []
        for scale in range(n_scales):
            for _ in range(self.num_res_blocks):
                out_ch = self.ch * self.ch_mult[scale]
                down.append(res(in_ch, out_ch))
                in_ch = out_ch
                if scale == self.attn_scale:
                    down.append(AttnBlock(in_ch, skip_rescale))
                    self._keep.append(False)
                self._keep.append(True)
                h_cs.append(in_ch)
            if scale != n_scales - 1:
                down.append(Downsample(in_ch))
                self._keep.append(True)
                h_cs.append(in_ch)
        self.downsampling_modules = nn.ModuleList(down)
        self.middle_modules = nn.ModuleList([res(in_ch, in_ch), AttnBlock(in_ch, skip_rescale), res(in_ch, in_ch)])
        up = []
        for scale in reversed(range(n_scales)):
            for _ in range(self.num_res_blocks + 1):
                out_ch = self.ch * self.ch_mult[scale]
                up.append(res(in_ch + h_cs.pop(), out_ch))
                in_ch = out_ch
                if scale == self.attn_scale:
                    up.append(AttnBlock(in_ch, skip_rescale))
            if scale != 0:
                up.append(Upsample(in_ch))
        self.upsampling_modules = nn.ModuleList(up)
        self.output_modules = nn.ModuleList([group_norm(in_ch),
                                             nn.Conv2d(in_ch, 2 * self.input_channels, kernel_size=3, padding=1)])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lo, hi = self.data_min_max
        centred = 2 * ((x - lo) / (hi - lo)) - 1  # levels -> [-1, 1] (float32 for integer x)
        temb = timestep_embedding(t.float() * self.time_scale_factor, self.time_embed_dim)
        temb = self.temb_modules[1](F.silu(self.temb_modules[0](temb)))
        h = self.input_conv(centred)
        hs = [h]
        for m, keep in zip(self.downsampling_modules, self._keep):
            h = m(h, temb) if isinstance(m, ResBlock) else m(h)
            if keep:
                hs.append(h)
        for m in self.middle_modules:
            h = m(h, temb) if isinstance(m, ResBlock) else m(h)
        for m in self.upsampling_modules:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = m(h)
        h = self.output_modules[1](F.silu(self.output_modules[0](h)))
        C = self.input_channels
        return torch.cat([torch.tanh(centred + h[:, :C]), h[:, C:]], dim=1)
