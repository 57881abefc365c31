"""Image samples as PNG files: a grid of samples and a dependency-free PNG encoder (stdlib zlib + struct).

Tokens are ordinal levels 0..S-1 flattened (channel, row, column) as tauLDR does (DESIGN §12);
level k is drawn as pixel value round(255 k / (S - 1)), so for S = 256 the pixel is the token.
"""

from __future__ import annotations

import struct
import zlib

from lsdtool import fileio

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 3: 2}  # channels -> PNG colour type (grey, RGB)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(image) -> bytes:
    """An 8-bit PNG of ``image``: (H, W) grey or (H, W, C) with C = 1 (grey) or 3 (RGB), uint8 values
    (a torch tensor or anything with ``shape`` and ``tobytes``, e.g. a numpy array)."""
    shape = tuple(int(s) for s in image.shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3 or shape[2] not in _COLOUR_TYPE or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"an image is (H, W) or (H, W, 1 or 3) with H, W >= 1, not {tuple(image.shape)}")
    dtype = str(getattr(image, "dtype", ""))
    if dtype not in ("uint8", "torch.uint8"):
        raise ValueError(f"image values must be uint8, not {dtype or type(image).__name__}")
    h, w, c = shape
    if hasattr(image, "detach"):  # torch: no numpy needed
        raw = bytes(image.detach().cpu().contiguous().flatten().tolist())
    else:
        raw = image.tobytes(order="C") if hasattr(image, "flags") else image.tobytes()
    stride = w * c
    rows = b"".join(b"\x00" + raw[r * stride:(r + 1) * stride] for r in range(h))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOUR_TYPE[c], 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b"")


def pixels(tokens, levels: int):
    """Pixel values (uint8, same shape) of ordinal tokens 0..levels-1: round(255 k / (levels - 1))."""
    import torch

    tokens = torch.as_tensor(tokens)
    if levels < 2 or levels > 256:
        raise ValueError(f"levels must be in 2..256, not {levels}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= levels):
        raise ValueError(f"tokens must lie in 0..{levels - 1}")
    if levels == 256:
        return tokens.to(torch.uint8)
    return torch.div(tokens.long() * 510 + (levels - 1), 2 * (levels - 1), rounding_mode="floor").to(torch.uint8)


def grid(tokens, shape: tuple[int, int, int], levels: int, nrow: int | None = None, pad: int = 2):
    """A (rows (H + pad) + pad, cols (W + pad) + pad, C) uint8 grid of N samples: tokens (N, C·H·W) flattened
    (channel, row, column); ``nrow`` images per row (default ceil(sqrt(N))), ``pad`` black pixels between."""
    import math

    import torch

    C, H, W = (int(s) for s in shape)
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != C * H * W or tokens.shape[0] < 1:
        raise ValueError(f"tokens must be (N >= 1, {C * H * W}) for images of shape {(C, H, W)}")
    n = tokens.shape[0]
    ncol = int(nrow) if nrow else math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    img = pixels(tokens, levels).reshape(n, C, H, W).permute(0, 2, 3, 1)  # (N, H, W, C)
    out = torch.zeros(nrows * (H + pad) + pad, ncol * (W + pad) + pad, C, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        out[top:top + H, left:left + W] = img[i]
    return out


def write_png(path, image) -> None:
    """Write ``image`` (see :func:`png_bytes`) to ``path`` atomically."""
    fileio.write_bytes(path, png_bytes(image))
