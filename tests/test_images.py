"""PNG output of image samples: the encoder read back by Pillow, and the sample grid's pixel values."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lsdtool.images import grid, png_bytes, pixels, write_png


def read(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize("shape, mode", [((5, 7), "L"), ((5, 7, 1), "L"), ((4, 9, 3), "RGB")])
def test_png_round_trip(shape, mode):
    a = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for image in (a, a.numpy()):
        img = read(png_bytes(image))
        assert img.mode == mode and img.size == (shape[1], shape[0])  # Pillow: (width, height)
        assert np.array_equal(np.asarray(img), a.numpy().reshape(np.asarray(img).shape))


def test_png_refuses_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="H, W"):
        png_bytes(torch.zeros(2, 2, 4, dtype=torch.uint8))


def test_pixels_of_levels():
    assert pixels(torch.arange(256), 256).tolist() == list(range(256))  # S = 256: the pixel is the token
    assert pixels(torch.tensor([0, 1, 2, 3]), 4).tolist() == [0, 85, 170, 255]
    assert pixels(torch.tensor([0, 1, 2]), 3).tolist() == [0, 128, 255]  # 127.5 rounds up
    with pytest.raises(ValueError):
        pixels(torch.tensor([4]), 4)


def test_grid_places_each_sample(tmp_path):
    C, H, W, n = 3, 4, 5, 5
    tokens = torch.randint(0, 256, (n, C * H * W), generator=torch.Generator().manual_seed(1))
    g = grid(tokens, (C, H, W), 256, nrow=3, pad=2)
    assert g.shape == (2 * (H + 2) + 2, 3 * (W + 2) + 2, 3) and g.dtype == torch.uint8
    write_png(tmp_path / "grid.png", g)
    img = np.asarray(Image.open(tmp_path / "grid.png"))
    assert img.shape == tuple(g.shape)
    for i in range(n):
        r, c = divmod(i, 3)
        top, left = 2 + r * (H + 2), 2 + c * (W + 2)
        want = tokens[i].reshape(C, H, W).permute(1, 2, 0).numpy()  # (channel, row, column) flattening
        assert np.array_equal(img[top:top + H, left:left + W], want)
    assert img[:2].max() == 0 and img[top:top + H, left + W + 2:].max() == 0  # padding and the empty slot
    grey = grid(torch.tensor([[0, 1, 2, 3]]), (1, 2, 2), 4, pad=0)
    assert grey[..., 0].tolist() == [[0, 85], [170, 255]]
