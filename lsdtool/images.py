"""Images (DESIGN §12): a minimal PNG codec (stdlib zlib), levels <-> 8-bit pixels, grids, inpainting masks.

A sample of an image model is D = C·H·W levels 0..S-1 flattened as (channel, row, column), like τLDR;
``model.shape`` is (C, H, W) with C = 1 (greyscale) or 3 (RGB). Pixel value of level k:
round(k·255/(S−1)), halves rounded up, which is k itself for S = 256; the inverse is
round(p·(S−1)/255), so level -> pixel -> level is exact for every S <= 256.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field

import torch

from lsdtool.errors import LsdError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPES = {1: 0, 3: 2}  # channels -> PNG colour type (0 greyscale, 2 RGB)
TEXT_KEY = "lsd"  # the tEXt chunk that carries a sample's index and provenance
SUPPORTED = "8-bit greyscale or RGB PNGs without alpha or palette, not interlaced"
_TYPE_NAMES = {3: "a palette image", 4: "greyscale with alpha", 6: "RGBA (alpha)"}


@dataclass
class Image:
    """Decoded PNG: pixels (H, W, C) uint8 and its tEXt entries."""

    pixels: torch.Tensor
    text: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.pixels.shape[2]


# ---- the codec ---------------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode(pixels: torch.Tensor, text: dict | None = None) -> bytes:
    """PNG bytes of pixels (H, W, C) uint8, C = 1 or 3 (filter 0 on every row); ``text`` as tEXt chunks."""
    h, w, c = pixels.shape
    if c not in COLOR_TYPES or pixels.dtype != torch.uint8:
        raise ValueError(f"PNG pixels must be (H, W, 1 or 3) uint8, got {tuple(pixels.shape)} {pixels.dtype}")
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), pixels.reshape(h, w * c)], 1)  # filter byte 0 per row
    out = [SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, COLOR_TYPES[c], 0, 0, 0))]
    for key, value in (text or {}).items():
        out.append(_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")))
    out += [_chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 6)), _chunk(b"IEND", b"")]
    return b"".join(out)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _unfilter(raw: bytes, h: int, stride: int, bpp: int, where: str) -> bytearray:
    """Undo the per-row filters 0-4 of a non-interlaced 8-bit image (PNG spec §9)."""
    out = bytearray(h * stride)
    prev = bytearray(stride)
    pos = 0
    for y in range(h):
        kind, line = raw[pos], bytearray(raw[pos + 1 : pos + 1 + stride])
        pos += 1 + stride
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif kind == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif kind == 4:
            for i in range(stride):
                left, up_left = (line[i - bpp], prev[i - bpp]) if i >= bpp else (0, 0)
                line[i] = (line[i] + _paeth(left, prev[i], up_left)) & 255
        elif kind != 0:
            raise LsdError(f"{where}: row {y} has unknown PNG filter type {kind} (a damaged file?)")
        out[y * stride : (y + 1) * stride] = line
        prev = line
    return out


def decode(data: bytes, where: str = "image") -> Image:
    """Pixels and tEXt of a PNG's bytes; an LsdError naming ``where`` for anything but :data:`SUPPORTED`."""
    if not data.startswith(SIGNATURE):
        raise LsdError(f"{where} is not a PNG file (lsd reads {SUPPORTED})")
    pos, header, idat, text, ended = len(SIGNATURE), None, [], {}, False
    while pos + 12 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        crc = data[pos + 8 + length : pos + 12 + length]
        if len(body) < length or len(crc) < 4 or struct.unpack(">I", crc)[0] != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise LsdError(f"{where} is a damaged or truncated PNG (chunk {kind.decode('latin-1')!r} is incomplete)")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"tEXt" and b"\0" in body:
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"IEND":
            ended = True
            break
    if header is None or not ended:
        raise LsdError(f"{where} is a damaged or truncated PNG (no {'IHDR' if header is None else 'IEND'} chunk)")
    w, h, depth, color, _, _, interlace = header
    problem = (_TYPE_NAMES.get(color) or (f"colour type {color}" if color not in (0, 2) else None)
               or (f"{depth}-bit samples" if depth != 8 else None) or ("interlaced" if interlace else None))
    if problem:
        raise LsdError(f"{where} is {problem}: lsd reads {SUPPORTED}")
    c = 1 if color == 0 else 3
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error:
        raise LsdError(f"{where} is a damaged PNG (its image data does not decompress)") from None
    if len(raw) != h * (1 + w * c):
        raise LsdError(f"{where} is a damaged PNG ({len(raw)} bytes of image data for {w}x{h})")
    pixels = _unfilter(raw, h, w * c, c, where)
    return Image(torch.frombuffer(pixels, dtype=torch.uint8).reshape(h, w, c).clone(), text)


def read(path) -> Image:
    """:func:`decode` of the file at ``path``."""
    with open(path, "rb") as f:
        return decode(f.read(), str(path))


# ---- levels, pixels and layout -------------------------------------------------------------------------

def shape_of(model) -> tuple[int, int, int]:
    """(C, H, W) of an image model; an LsdError for a model without ``shape`` (a text model)."""
    shape = getattr(model, "shape", None)
    if shape is None:
        raise LsdError(f"model {model.name} makes token sequences, not images (it has no shape); "
                       "use --format text, jsonl or tokens")
    c, h, w = (int(v) for v in shape)
    if c not in COLOR_TYPES or c * h * w != model.seq_len:
        raise LsdError(f"model {model.name} has shape {tuple(shape)}: images need 1 or 3 channels and "
                       f"C·H·W = its sequence length {model.seq_len}")
    return c, h, w


def levels_of(model) -> int:
    """S, the number of levels: the graph's real tokens (the mask of an absorbing graph is no level)."""
    from lsdtool.diffusion import graph_of

    return graph_of(model).n_real


def to_pixels(levels: torch.Tensor, s: int) -> torch.Tensor:
    """Pixel values uint8 of levels 0..s-1 (any shape): round(k·255/(s−1)), halves up; k itself for s = 256."""
    k = levels.long()
    if s == 256:
        return k.to(torch.uint8)
    return ((2 * 255 * k + (s - 1)) // (2 * (s - 1))).to(torch.uint8)


def to_levels(pixels: torch.Tensor, s: int) -> torch.Tensor:
    """Levels (long) of pixel values: round(p·(s−1)/255), halves up; the inverse of :func:`to_pixels`."""
    p = pixels.long()
    if s == 256:
        return p
    return (2 * (s - 1) * p + 255) // (2 * 255)


def levels_tensor(model, x: torch.Tensor) -> torch.Tensor:
    """Samples x (B, D) of an image model -> their levels (B, D) long in 0..S-1 on CPU; an LsdError if masked."""
    from lsdtool.diffusion import graph_of

    shape_of(model)
    graph = graph_of(model)
    x = x.long().cpu()
    if graph.mask_id is not None and bool((x == graph.mask_id).any()):
        raise LsdError("a sample still holds masked positions; it is no image (sample with more steps)")
    return graph.real_index(x)


def samples_to_images(model, x: torch.Tensor) -> torch.Tensor:
    """Samples x (B, D) of an image model -> pixels (B, H, W, C) uint8."""
    c, h, w = shape_of(model)
    return to_pixels(levels_tensor(model, x), levels_of(model)).reshape(-1, c, h, w).permute(0, 2, 3, 1).contiguous()


def grid(images: torch.Tensor, cols: int | None = None, pad: int = 2, fill: int = 255) -> torch.Tensor:
    """Tile images (N, H, W, C) row by row into one (H', W', C), ``pad`` pixels of ``fill`` between and around;
    ``cols`` defaults to ceil(sqrt(N))."""
    n, h, w, c = images.shape
    cols = max(1, min(n, cols or math.ceil(math.sqrt(n)))) if n else 1
    rows = max(1, -(-n // cols))
    out = torch.full((pad + rows * (h + pad), pad + cols * (w + pad), c), fill, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y : y + h, x : x + w] = images[k]
    return out


def enlarge(images: torch.Tensor, least: int) -> torch.Tensor:
    """Images (N, H, W, C) repeated pixel by pixel the smallest whole number of times that makes H and W at
    least ``least`` (an 8×8 digit becomes 32×32; a 32×32 image stays as it is)."""
    k = max(1, -(-least // min(images.shape[1], images.shape[2])))
    return images.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2) if k > 1 else images


def table(cells: list[list[torch.Tensor | None]], cols: int = 4, pad: int = 6, least: int = 1) -> torch.Tensor:
    """One image of rows × columns of cells, each cell pixels (k, H, W, C) :func:`enlarge`-d to ``least``
    pixels and tiled :func:`grid`-wise ``cols`` wide (a missing cell stays blank); ``pad`` white pixels between cells."""
    cells = [[None if c is None else enlarge(c, least) for c in row] for row in cells]
    shown = [c for row in cells for c in row if c is not None]
    if not shown:
        raise LsdError("no samples to show")
    k, h, w, c = max(shown, key=len).shape
    white = torch.full((k, h, w, c), 255, dtype=torch.uint8)
    tiles = [grid(white if cell is None else torch.cat([cell, white[len(cell):]]), cols, pad=1)
             for row in cells for cell in row]
    return grid(torch.stack(tiles), cols=len(cells[0]), pad=pad)


def provenance_text(index: int, provenance: dict) -> dict:
    """The tEXt entry of a per-sample PNG: its index and provenance as one JSON object."""
    return {TEXT_KEY: json.dumps({"index": index, **provenance}, separators=(",", ":"), sort_keys=True)}


def provenance_of(image: Image) -> dict | None:
    """The JSON object of a PNG's :data:`TEXT_KEY` entry, or None when it has none."""
    try:
        obj = json.loads(image.text[TEXT_KEY])
    except (KeyError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


# ---- inpainting: the image and mask of ``lsd sample --image --keep`` ----------------------------------

def _fit(image: Image, model, where: str, channels: tuple[int, ...]) -> torch.Tensor:
    c, h, w = shape_of(model)
    ih, iw, ic = image.pixels.shape
    if (ih, iw) != (h, w):
        raise LsdError(f"{where} is {iw}x{ih} but the model makes {w}x{h} images")
    if ic not in channels:
        names = {1: "greyscale", 3: "RGB"}
        raise LsdError(f"{where} is {names[ic]} but the model makes {names[c]} images"
                       + (" (a mask may also be greyscale)" if len(channels) > 1 else ""))
    return image.pixels


def inpaint_conditions(model, image_path, keep_path):
    """Conditions fixing each position where the mask PNG is non-zero to the image's level there.

    The image must have the model's size and mode; the mask its size and either one channel (a pixel
    keeps all its channels) or the model's channels (each channel kept on its own).
    """
    from lsdtool.conditioning import FREE, Conditions
    from lsdtool.diffusion import graph_of

    c, h, w = shape_of(model)
    pixels = _fit(read(image_path), model, f"--image {image_path}", (c,))
    mask = _fit(read(keep_path), model, f"--keep {keep_path}", tuple(sorted({1, c})))
    keep = (mask != 0).expand(h, w, c)
    levels = graph_of(model).real_token(to_levels(pixels, levels_of(model)))
    row = torch.where(keep, levels, torch.full_like(levels, FREE)).permute(2, 0, 1).reshape(1, -1)
    return Conditions(row.to(torch.int32))
