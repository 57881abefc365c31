"""Regenerate docs/img/inpainting.png: the stand-in image model of the tests, inpainted through the CLI.

Run from the repository root: python docs/img/make_inpainting.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lsdtool import images

ROOT = Path(__file__).resolve().parents[2]
MODEL = f"{ROOT / 'tests' / 'image_model.py'}:make"


def lsd(*args):
    subprocess.run([sys.executable, "-m", "lsdtool.cli", *map(str, args)], check=True, cwd=ROOT)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lsd("sample", "--model", MODEL, "--steps", "8", "-n", "1", "--seed", "1", "--format", "png", "-o", f"{tmp}/src/")
        src = images.read(tmp / "src" / "000000.png").pixels
        keep = torch.zeros(4, 4, 1, dtype=torch.uint8)
        keep[:, :2] = 255  # keep the left half
        (tmp / "keep.png").write_bytes(images.encode(keep))
        lsd("sample", "--model", MODEL, "--steps", "8", "-n", "4", "--format", "png", "-o", f"{tmp}/out/",
            "--image", tmp / "src" / "000000.png", "--keep", tmp / "keep.png")
        tiles = [src, keep.expand(4, 4, 3)] + [images.read(tmp / "out" / f"{i:06d}.png").pixels for i in range(4)]
        big = torch.stack(tiles).repeat_interleave(16, 1).repeat_interleave(16, 2)  # 4x4 pixels -> 64x64
        (ROOT / "docs" / "img" / "inpainting.png").write_bytes(images.encode(images.grid(big, cols=6, pad=4)))


if __name__ == "__main__":
    main()
