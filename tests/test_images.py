"""Image input/output: the PNG codec against Pillow, levels <-> pixels, grids, per-sample PNG directories
(no-clobber, lock, resume after a kill, shards and merge), inpainting, and the one-line refusals."""

import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from lsdtool import api, fileio, imagefiles, images
from lsdtool.errors import LsdError
from lsdtool.samplers import Sampler
from conftest import LAUNCHER_VARS, run_cli

from image_model import TinyImage

Image = pytest.importorskip("PIL.Image")

HERE = Path(__file__).resolve().parent
MODEL = str(HERE / "image_model.py")
SAMPLE = ["sample", "--steps", "3", "--seed", "5", "--batch-size", "2"]


def lsd(*args):
    return run_cli(*args)


def one_error_line(r) -> str:
    assert r.exit_code in (1, 2), (r.exit_code, r.output)
    assert r.stdout == "" and "Traceback" not in r.stderr, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def pil(path_or_bytes):
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    im = Image.open(src)
    im.load()
    return im


def pil_pixels(im) -> torch.Tensor:
    c = {"L": 1, "RGB": 3}[im.mode]
    return torch.tensor(list(im.tobytes()), dtype=torch.uint8).reshape(im.size[1], im.size[0], c)


def pngs(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.endswith(".png")}


# ---- levels and pixels ---------------------------------------------------------------------------

def test_levels_map_to_pixels_by_the_documented_rule_and_back_exactly():
    k = torch.arange(256)
    assert torch.equal(images.to_pixels(k, 256), k.to(torch.uint8))  # S = 256: the token itself
    assert images.to_pixels(torch.arange(16), 16).tolist() == [17 * j for j in range(16)]
    assert images.to_pixels(torch.arange(4), 4).tolist() == [0, 85, 170, 255]
    assert images.to_pixels(torch.arange(3), 3).tolist() == [0, 128, 255]  # 127.5: halves round up
    for s in range(2, 257):
        levels = torch.arange(s)
        expect = torch.tensor([int(j * 255 / (s - 1) + 0.5) for j in range(s)])  # floor(x + 1/2), written plainly
        assert torch.equal(images.to_pixels(levels, s).long(), expect), s
        assert torch.equal(images.to_levels(images.to_pixels(levels, s), s), levels), s


# ---- the codec -----------------------------------------------------------------------------------

@pytest.mark.parametrize("c", [1, 3])
def test_encoded_png_opens_in_pillow_with_its_pixels_and_decodes_back(c):
    px = torch.randint(0, 256, (5, 7, c), generator=torch.Generator().manual_seed(c), dtype=torch.uint8)
    data = images.encode(px, {"lsd": '{"index":3}'})
    im = pil(data)
    assert im.size == (7, 5) and im.mode == ("L" if c == 1 else "RGB")
    assert torch.equal(pil_pixels(im), px) and im.text == {"lsd": '{"index":3}'}
    back = images.decode(data)
    assert torch.equal(back.pixels, px) and back.text == {"lsd": '{"index":3}'}


def _filtered_png(px: torch.Tensor, kinds) -> bytes:
    """A PNG of px (H, W, C) whose row y uses filter kinds[y], written by the spec's forward filters."""
    h, w, c = px.shape
    rows, prev = [], [0] * (w * c)
    for y in range(h):
        line = px[y].reshape(-1).tolist()
        kind = kinds[y % len(kinds)]
        out = []
        for i, v in enumerate(line):
            a = line[i - c] if i >= c else 0
            b, cc = prev[i], (prev[i - c] if i >= c else 0)
            pred = [0, a, b, (a + b) // 2, images._paeth(a, b, cc)][kind]
            out.append((v - pred) & 255)
        rows.append(bytes([kind] + out))
        prev = line

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return images.SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


@pytest.mark.parametrize("c", [1, 3])
def test_every_filter_type_decodes_like_pillow(c):
    px = torch.randint(0, 256, (10, 9, c), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    data = _filtered_png(px, [0, 1, 2, 3, 4])
    assert torch.equal(pil_pixels(pil(data)), px)  # the test's own filters are right
    assert torch.equal(images.decode(data).pixels, px)
    buf = io.BytesIO()  # and a file Pillow writes with its own (adaptive) filters
    Image.fromarray(px.squeeze(-1).numpy() if c == 1 else px.numpy()).save(buf, format="PNG", optimize=True)
    assert torch.equal(images.decode(buf.getvalue()).pixels, px)


@pytest.mark.parametrize("mode, what", [("P", "palette"), ("LA", "alpha"), ("RGBA", "alpha"), ("I;16", "16-bit"),
                                        ("interlaced", "interlaced")])
def test_unsupported_pngs_are_refused_with_what_is_supported(tmp_path, mode, what):
    path = tmp_path / "x.png"
    if mode == "interlaced":
        data = bytearray(images.encode(torch.zeros(2, 2, 1, dtype=torch.uint8)))
        ihdr = data[8:33]
        body = bytearray(ihdr[8:21])
        body[12] = 1  # interlace method Adam7
        data[16:29] = body
        data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)))
        path.write_bytes(bytes(data))
    else:
        Image.new(mode, (4, 4)).save(path)
    with pytest.raises(LsdError) as info:
        images.read(path)
    msg = str(info.value)
    assert str(path) in msg and what in msg and images.SUPPORTED in msg and "\n" not in msg


def test_damaged_and_foreign_files_are_refused(tmp_path):
    good = images.encode(torch.zeros(3, 3, 3, dtype=torch.uint8))
    for data, what in [(b"GIF89a....", "not a PNG"), (good[:-10], "truncated"),
                       (good[:40] + bytes([good[40] ^ 1]) + good[41:], "damaged")]:
        path = tmp_path / "x.png"
        path.write_bytes(data)
        with pytest.raises(LsdError, match=what):
            images.read(path)


def test_grid_places_images_row_by_row_with_padding():
    tiles = torch.arange(5, dtype=torch.uint8)[:, None, None, None].expand(5, 2, 3, 1) * 10
    g = images.grid(tiles, pad=1, fill=255)
    assert g.shape == (1 + 2 * 3, 1 + 3 * 4, 1)  # 3 columns (ceil sqrt 5), 2 rows
    assert g[1, 1, 0] == 0 and g[1, 5, 0] == 10 and g[1, 9, 0] == 20 and g[4, 1, 0] == 30 and g[4, 5, 0] == 40
    assert g[0].eq(255).all() and g[4, 9, 0] == 255  # padding and the empty sixth cell


# ---- lsd sample --format png ----------------------------------------------------------------------

@pytest.mark.parametrize("factory, levels, c", [("full", 256, 3), ("make", 16, 3), ("grey", 4, 1)])
def test_per_sample_pngs_hold_the_sampled_tokens(tmp_path, factory, levels, c):
    out = tmp_path / "d"
    r = lsd(*SAMPLE, "--model", f"{MODEL}:{factory}", "-n", 5, "--format", "png", "-o", f"{out}/")
    assert r.exit_code == 0 and r.stdout == "", r.output
    tokens = torch.stack([torch.tensor(s["tokens"]) for s in map(__import__("json").loads,
                          lsd(*SAMPLE, "--model", f"{MODEL}:{factory}", "-n", 5, "--format", "jsonl").stdout.splitlines())])
    assert sorted(pngs(out)) == [f"{i:06d}.png" for i in range(5)]
    for i in range(5):
        im = pil(out / f"{i:06d}.png")
        assert im.size == (4, 4) and im.mode == ("L" if c == 1 else "RGB")
        want = tokens[i].reshape(c, 4, 4).permute(1, 2, 0)  # (channel, row, column) flattening
        want = want if levels == 256 else torch.round(want.double() * 255 / (levels - 1)).long()
        assert torch.equal(pil_pixels(im).long(), want), i
    if levels == 256:
        assert torch.equal(pil_pixels(pil(out / "000002.png")).permute(2, 0, 1).reshape(-1).long(), tokens[2])


def test_the_grid_png_tiles_the_same_samples(tmp_path):
    grid, d = tmp_path / "g.png", tmp_path / "d"
    assert lsd(*SAMPLE, "--model", f"{MODEL}:full", "-n", 5, "--format", "png", "-o", grid).exit_code == 0
    assert lsd(*SAMPLE, "--model", f"{MODEL}:full", "-n", 5, "--format", "png", "-o", f"{d}/").exit_code == 0
    tiles = torch.stack([pil_pixels(pil(d / f"{i:06d}.png")) for i in range(5)])
    assert torch.equal(pil_pixels(pil(grid)), images.grid(tiles))
    line = one_error_line(lsd(*SAMPLE, "--model", f"{MODEL}:full", "-n", 5, "--format", "png", "-o", grid))
    assert "--force" in line  # no clobbering a grid either
    assert not [p for p in tmp_path.iterdir() if fileio.is_temp(p)]


def test_png_refusals_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "o"
    cases = [
        (["--model", "countdown", "--format", "png", "-o", f"{out}/"], "not images"),
        (["--model", "countdown", "--format", "png", "-o", tmp_path / "g.png"], "not images"),
        (["--model", f"{MODEL}:make", "--format", "png"], "needs -o"),
        (["--model", f"{MODEL}:make", "--format", "jsonl", "-o", f"{out}/"], "--format png"),
        (["--model", f"{MODEL}:make", "--format", "png", "-o", tmp_path / "g.png", "--resume"], "--resume needs"),
    ]
    for args, what in cases:
        line = one_error_line(lsd(*SAMPLE, "-n", 2, *args))
        assert what in line, line
        assert list(tmp_path.iterdir()) == [], line


def test_a_directory_is_not_clobbered_and_force_replaces_its_samples(tmp_path):
    out = tmp_path / "d"
    args = [*SAMPLE, "--model", f"{MODEL}:make", "--format", "png", "-o", f"{out}/"]
    assert lsd(*args, "-n", 3).exit_code == 0
    before = pngs(out)
    line = one_error_line(lsd(*args, "-n", 3, "--seed", 9))
    assert "--resume" in line and "--force" in line and pngs(out) == before
    (out / "notes.txt").write_text("mine")
    assert lsd(*args, "-n", 2, "--seed", 9, "--force").exit_code == 0
    assert sorted(pngs(out)) == ["000000.png", "000001.png"] and pngs(out)["000000.png"] != before["000000.png"]
    assert (out / "notes.txt").read_text() == "mine"  # only its samples are replaced


def test_resume_redraws_missing_torn_and_temp_files_and_refuses_another_run(tmp_path):
    out, ref = tmp_path / "d", tmp_path / "ref"
    args = [*SAMPLE, "--model", f"{MODEL}:make", "--format", "png"]
    assert lsd(*args, "-n", 6, "-o", f"{ref}/").exit_code == 0
    assert lsd(*args, "-n", 6, "-o", f"{out}/").exit_code == 0
    (out / "000001.png").unlink()
    (out / "000003.png").write_bytes((ref / "000003.png").read_bytes()[:50])  # torn
    (out / ".000004.png.abc.lsdtmp").write_bytes(b"\x89PNG")  # a leftover of a killed atomic write
    r = lsd(*args, "-n", 6, "-o", f"{out}/", "--resume")
    assert r.exit_code == 0, r.output
    assert pngs(out) == pngs(ref) and not [p for p in out.iterdir() if fileio.is_temp(p)]
    assert "4 of 6" in r.stderr
    assert "was sampled with seed 5, this run uses seed 6" in one_error_line(
        lsd(*args, "-n", 6, "--seed", 6, "-o", f"{out}/", "--resume"))
    assert "does not make" in one_error_line(lsd(*args, "-n", 4, "-o", f"{out}/", "--resume"))
    assert pngs(out) == pngs(ref)
    with fileio.locked_append(out / imagefiles.LOCK):  # another lsd is writing it
        assert "another lsd is writing" in one_error_line(lsd(*args, "-n", 7, "-o", f"{out}/", "--resume"))


def test_a_killed_directory_run_resumes_byte_identically(tmp_path):
    out, ref = tmp_path / "d", tmp_path / "ref"
    args = [*SAMPLE, "--model", f"{MODEL}:make", "--format", "png"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "HF_HUB_OFFLINE": "1"}
    for k in LAUNCHER_VARS:
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "lsdtool.cli", *map(str, args), "-n", "1000000", "-o", f"{out}/"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(6000):
            if out.is_dir() and len(pngs(out)) >= 4:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.communicate()
    n = max(int(name[:6]) for name in pngs(out)) + 3
    assert lsd(*args, "-n", n, "-o", f"{out}/", "--resume").exit_code == 0
    assert lsd(*args, "-n", n, "-o", f"{ref}/").exit_code == 0
    assert pngs(out) == pngs(ref) and len(pngs(ref)) == n


def test_shards_write_their_own_directories_and_merge_into_the_unsharded_one(tmp_path):
    args = [*SAMPLE, "--model", f"{MODEL}:make", "--format", "png", "-n", 7]
    for k in range(3):
        assert lsd(*args, "--shard", f"{k}/3", "-o", f"{tmp_path / 'out'}/").exit_code == 0
    shards = sorted(tmp_path.glob("out.shard-*-of-00003"))
    assert [len(pngs(s)) for s in shards] == [3, 2, 2]
    assert lsd(*args, "-o", f"{tmp_path / 'ref'}/").exit_code == 0
    r = lsd("merge", *shards, "-o", f"{tmp_path / 'merged'}/")
    assert r.exit_code == 0, r.output
    assert pngs(tmp_path / "merged") == pngs(tmp_path / "ref")
    assert "shard 1 of 3 is missing" in one_error_line(lsd("merge", shards[0], shards[2], "-o", f"{tmp_path / 'm2'}/"))
    assert "index 3 appears in" in one_error_line(lsd("merge", tmp_path / "ref", shards[1], "-o", f"{tmp_path / 'm3'}/"))
    assert "--resume" in one_error_line(lsd("merge", *shards, "-o", f"{tmp_path / 'merged'}/"))
    other = tmp_path / "other.shard-00001-of-00003"
    assert lsd(*args, "--seed", 6, "--shard", "1/3", "-o", f"{tmp_path / 'other'}/").exit_code == 0
    line = one_error_line(lsd("merge", shards[0], other, shards[2], "-o", f"{tmp_path / 'm4'}/"))
    assert "seed 6" in line and "seed 5" in line
    assert "not both" in one_error_line(lsd("merge", shards[0], tmp_path / "x.jsonl"))
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m4").exists()


# ---- inpainting ----------------------------------------------------------------------------------

def _write(path, px):
    path.write_bytes(images.encode(px))
    return path


def test_inpainting_keeps_the_masked_pixels_exactly_and_samples_the_rest(tmp_path):
    model = TinyImage(16, (3, 4, 4))
    g = torch.Generator().manual_seed(3)
    src = images.to_pixels(torch.randint(0, 16, (4, 4, 3), generator=g), 16)
    keep = torch.zeros(4, 4, 1, dtype=torch.uint8)
    keep[:2] = 255  # the top half
    keep[3, 3] = 1  # any non-zero value keeps
    img, mask = _write(tmp_path / "img.png", src), _write(tmp_path / "keep.png", keep)
    out = tmp_path / "d"
    r = lsd(*SAMPLE, "--model", f"{MODEL}:make", "-n", 6, "--format", "png", "-o", f"{out}/", "--image", img, "--keep", mask)
    assert r.exit_code == 0, r.output
    kept = (keep != 0).expand(4, 4, 3)
    drawn = torch.stack([pil_pixels(pil(out / f"{i:06d}.png")) for i in range(6)])
    assert torch.equal(drawn[:, kept], src[kept].expand(6, -1))
    assert (drawn[:, ~kept] != src[~kept]).any()  # the rest is sampled, not copied
    assert len({bytes(d[~kept].tolist()) for d in drawn}) == 6
    x = api.sample(model, Sampler.plain(3), 6, seed=5, batch_size=2)  # free positions draw their own streams
    conds = images.inpaint_conditions(model, img, mask)
    fixed = conds.rows[0] != -1
    assert int(fixed.sum()) == 3 * 9 and torch.equal(images.to_levels(src, 16).permute(2, 0, 1).reshape(-1)[fixed],
                                                      conds.rows[0][fixed].long())
    assert not torch.equal(x, torch.stack([images.to_levels(d, 16).permute(2, 0, 1).reshape(-1) for d in drawn]))


def test_an_rgb_mask_keeps_each_channel_on_its_own(tmp_path):
    model = TinyImage(256, (3, 4, 4))
    src = torch.randint(0, 256, (4, 4, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    keep = torch.zeros(4, 4, 3, dtype=torch.uint8)
    keep[..., 1] = 255  # green only
    conds = images.inpaint_conditions(model, _write(tmp_path / "i.png", src), _write(tmp_path / "k.png", keep))
    row = conds.rows[0].reshape(3, 4, 4)
    assert (row[[0, 2]] == -1).all() and torch.equal(row[1].long(), src[..., 1].long())  # exact for S = 256


def test_bad_inpainting_inputs_are_one_line_and_write_nothing(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rgb = _write(inputs / "rgb.png", torch.zeros(4, 4, 3, dtype=torch.uint8))
    grey = _write(inputs / "grey.png", torch.full((4, 4, 1), 255, dtype=torch.uint8))
    big = _write(inputs / "big.png", torch.zeros(5, 4, 3, dtype=torch.uint8))
    small_mask = _write(inputs / "m3.png", torch.zeros(3, 3, 1, dtype=torch.uint8))
    text = inputs / "t.png"
    text.write_text("hello")
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        ([f"{MODEL}:make", "--image", big, "--keep", grey], "is 4x5 but the model makes 4x4"),
        ([f"{MODEL}:make", "--image", grey, "--keep", grey], "greyscale but the model makes RGB"),
        ([f"{MODEL}:grey", "--image", rgb, "--keep", grey], "RGB but the model makes greyscale"),
        ([f"{MODEL}:make", "--image", rgb, "--keep", small_mask], "is 3x3"),
        ([f"{MODEL}:make", "--image", text, "--keep", grey], "not a PNG"),
        ([f"{MODEL}:make", "--image", rgb], "both --image"),
        ([f"{MODEL}:make", "--image", rgb, "--keep", grey, "--prefix", "a"], "not several"),
        (["countdown", "--image", rgb, "--keep", grey], "not images"),
    ]
    for args, what in cases:
        for target in ([f"{out}/", "--format", "png"], [out / "s.jsonl", "--format", "jsonl"]):
            line = one_error_line(lsd(*SAMPLE, "-n", 2, "--model", *args, "-o", *target))
            assert what in line, line
            assert not any(out.iterdir()), line  # nothing written (the directory itself exists: -o FILE needs it)
