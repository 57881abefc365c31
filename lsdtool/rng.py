"""Counter-based randomness: every draw is a hash of (seed, stream, sample index, step, position).

Sample i's randomness therefore depends only on (seed, i), never on the batch it is drawn in or
the shard that draws it, and a batch is drawn with a few vectorised integer ops. Values stay
below 2**63 (32-bit words times 31-bit odd constants), so int64 tensors never overflow.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF

STREAM_STEP = 0  # categorical draw of step k
STREAM_START = 1  # uniform-graph start state
STREAM_ORDER = 2  # position orderings (fixed-count sampler)
STREAM_FIT = 3  # distillation perturbations
STREAM_STAGE = 4  # second-stage draws of two-call-per-step rules (theta-trapezoidal)
STREAM_DATA = 5  # forward-noising of clean data (Jump-Your-Steps KLUB)
STREAM_JUMPS = 6  # Poisson jump counts of tau-leaping (one per position and target level)
STREAM_CORRECTOR = 7  # corrector steps of tau-leaping-pc: corrector c of a step uses corrector_stream(c)


def corrector_stream(c: int) -> int:
    """The stream of corrector step c (distinct from every other stream: the others lie below 8)."""
    return STREAM_CORRECTOR + 8 * int(c)


def _mix(h):
    """A 32-bit xorshift-multiply finaliser (lowbias32 shape, 31-bit multipliers) of an int or an int64 tensor."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _M32
    return h ^ (h >> 16)


def _key(seed: int, stream: int, step: int, index: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per sample (B,) from (seed, stream, step, sample index)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k = 0
    for word in (seed & _M32, seed >> 32, int(stream) & _M32, int(step) & _M32):  # Python ints: no tensor ops per call
        k = _mix((k ^ word) + 0x9E3779B9 & _M32)
    return _mix(((index.to(torch.int64) & _M32) ^ k) & _M32)


def uniforms_at(seed: int, stream: int, index: torch.Tensor, step: int, pos: torch.Tensor) -> torch.Tensor:
    """Float64 uniforms in [0, 1) with 53 random bits for samples ``index`` at positions ``pos``
    (broadcastable integer tensors): the value for (seed, stream, step, i, j) never depends on
    which other (i, j) are drawn with it."""
    h = _key(seed, stream, step, index)
    a = _mix(h ^ ((pos.to(torch.int64) * 0x61C88647 + 0x3C6EF372) & _M32))
    b = _mix(a ^ 0x5BD1E995)
    return ((a >> 5) * 67108864 + (b >> 6)).to(torch.float64) / 9007199254740992.0


def uniforms(seed: int, stream: int, index: torch.Tensor, step: int, length: int) -> torch.Tensor:
    """(B, length) uniforms for samples ``index`` (B,) at positions 0..length-1."""
    pos = torch.arange(length, dtype=torch.int64, device=index.device)
    return uniforms_at(seed, stream, index[:, None], step, pos[None, :])
