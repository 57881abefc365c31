"""Image outputs of ``lsd sample --format png``: one grid PNG (``-o grid.png``), or a directory of one
PNG per sample (``-o DIR/``), which is written, resumed, sharded and merged like a jsonl file.

A directory run holds an exclusive lock on ``DIR/.lsd-lock`` while it writes. A directory that already
holds files is refused unless ``--resume`` (keep this run's complete samples, draw the rest) or
``--force`` (remove its samples first). Each PNG is written atomically and named by its global index
(``000017.png``); its tEXt entry records the index and provenance, which resume and merge check. Shard
I of N writes ``DIR.shard-0000I-of-0000N/`` (or a ``{shard}`` template), and ``lsd merge`` joins the
directories into one equal to the unsharded run's, file for file.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Callable, Iterable, Iterator, Sequence

import torch

from lsdtool import fileio, images, merge, sharding
from lsdtool.errors import LsdError

LOCK = ".lsd-lock"
NAME = re.compile(r"(\d{6,})\.png")


def is_directory(output: str) -> bool:
    """Whether ``-o`` names a directory of per-sample PNGs: it ends with a slash or is an existing directory."""
    return output.endswith(("/", os.sep)) or os.path.isdir(output)


def file_name(index: int) -> str:
    """The PNG of sample ``index``: six digits at least (``000017.png``)."""
    return f"{index:06d}.png"


def shard_dir(output: str, shard: int, num_shards: int) -> str:
    """The directory of one shard: ``DIR.shard-0000I-of-0000N/`` when N > 1 (``{shard}`` templates expanded)."""
    root = output.rstrip("/" + os.sep) or output
    return sharding.shard_path(root, shard, num_shards) + os.sep


def _samples(path: str) -> dict[int, str]:
    """{index: file name} of the per-sample PNGs in directory ``path``."""
    found = {}
    for name in os.listdir(path):
        m = NAME.fullmatch(name)
        if m:
            found[int(m.group(1))] = name
    return found


def _refusal(path: str) -> str:
    return f"{path} already holds files; pass --resume to continue it or --force to replace its samples"


def _holds_files(path: str) -> bool:
    return os.path.isdir(path) and any(name != LOCK for name in os.listdir(path))


def check_output(path: str, resume: bool = False, force: bool = False) -> None:
    """Before any work: ``path`` is (or can become) a writable directory that --resume/--force allows touching."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise LsdError(f"-o {path} names a directory of PNGs, but {path.rstrip('/' + os.sep)} is a file")
    fileio.check_dir(path)
    if not (resume or force) and _holds_files(path):
        raise LsdError(_refusal(path))


def record(path: str, name: str) -> merge.Record:
    """The index and provenance a per-sample PNG records; an LsdError for a damaged or foreign file."""
    where = os.path.join(path, name)
    obj = images.provenance_of(images.read(where))
    index = int(NAME.fullmatch(name).group(1))
    if obj is None or obj.get("index") != index:
        raise LsdError(f"{where} is not a sample lsd wrote (its index record is missing or names another index)")
    return merge.Record(0, 0, os.path.getsize(where), index, tuple(obj.get(k) for k in merge.PROVENANCE), name=name)


def _remove_stale_temps(path: str) -> None:
    for name in os.listdir(path):
        if fileio.is_temp(name):
            fileio.remove_if_stale(os.path.join(path, name))


@contextlib.contextmanager
def open_output(path: str, indices: Sequence[int], provenance: dict, resume: bool = False, force: bool = False,
                log: Callable[[str], None] | None = None) -> Iterator[tuple[Callable, int, list[int]]]:
    """(write(index, pixels (H, W, C) uint8), samples kept, indices still to draw) for ``-o DIR/``, under the
    directory's lock until the block ends. With ``resume`` a PNG of this run (complete, same provenance) is
    kept and a damaged one redrawn; a sample this run does not make is an error, as in a jsonl file."""
    created = not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    try:
        with fileio.locked_append(os.path.join(path, LOCK)):
            _remove_stale_temps(path)
            found = _samples(path)
            if not (resume or force) and _holds_files(path):
                raise LsdError(_refusal(path))
            if force:
                for name in found.values():
                    os.unlink(os.path.join(path, name))
                found = {}
            expected = tuple(provenance.get(k) for k in merge.PROVENANCE)
            done = set()
            for i, name in sorted(found.items()):
                if i not in indices:
                    raise LsdError(f"{path} holds sample {i}, which this run does not make; was -n or --shard changed?")
                try:
                    r = record(path, name)
                except LsdError as exc:
                    if log:
                        log(f"redrawing {name}: {exc}")
                    continue
                diff = merge._mismatch(r.source, expected)
                if diff:
                    raise LsdError(f"{os.path.join(path, name)} was sampled with {diff[0]}, this run uses {diff[1]}")
                done.add(i)
            todo = [i for i in indices if i not in done]

            def write(index: int, pixels: torch.Tensor) -> None:
                fileio.write_bytes(os.path.join(path, file_name(index)),
                                   images.encode(pixels, images.provenance_text(index, provenance)))

            yield write, len(done), todo
    except BaseException:
        if created:  # nothing of ours to keep: leave no empty directory behind
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


def write_directory(model, path: str, indices: Sequence[int], provenance: dict, draw: Callable[[list], Iterable],
                    resume: bool = False, force: bool = False, log: Callable[[str], None] | None = None) -> int:
    """Draw the samples of ``indices`` that ``path`` lacks (``draw(todo)`` yields (indices, tokens)) and write
    each as its PNG; returns how many were written."""
    written = 0
    with open_output(path, indices, provenance, resume, force, log) as (write, done, todo):
        if done and log:
            log(f"resuming {path}: {done} of {len(indices)} samples already there")
        for chunk, x in draw(todo):
            for i, pixels in zip(chunk, images.samples_to_images(model, x)):
                write(i, pixels)
                written += 1
    return written


def write_grid(model, path: str, batches: Iterable, log: Callable[[str], None] | None = None) -> int:
    """Every sample of ``batches`` ((indices, tokens) pairs) tiled in index order into one PNG, written atomically."""
    pieces = [images.samples_to_images(model, x) for _, x in batches]
    n = sum(len(p) for p in pieces)
    if not n:
        if log:
            log(f"no samples to draw: {path} not written")
        return 0
    fileio.write_bytes(path, images.encode(images.grid(torch.cat(pieces))))
    return n


def merge_directories(paths: list[str], output: str | None) -> int:
    """Copy the per-sample PNGs of ``paths`` (shard directories) into directory ``output`` after checking that
    indices 0..n-1 each appear once and all came from one sampler, model and seed; returns n."""
    if not output:
        raise LsdError("merging PNG directories needs -o DIR/ to copy the samples into")
    if not is_directory(output):
        output += os.sep
    order = merge.plan(paths, read=lambda p: [record(p, name) for _, name in sorted(_samples(p).items())])
    check_output(output)
    os.makedirs(output, exist_ok=True)
    with fileio.locked_append(os.path.join(output, LOCK)):
        for path, r in order:
            fileio.copy(os.path.join(path, r.name), os.path.join(output, r.name))
    return len(order)
