"""Reading jsonl sample files back: resuming an interrupted output and merging shard outputs.

Records are copied byte for byte, never re-serialised, so a merged or resumed file equals the
file an uninterrupted, unsharded run writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

from lsdtool import fileio
from lsdtool.errors import LsdError
from lsdtool.sharding import SHARD_NAME

PROVENANCE = ("seed", "sampler", "model", "model_fingerprint")


@dataclass
class Record:
    """Where one sample sits in its file: 1-based line, byte offset and length, index, provenance."""

    line: int
    offset: int
    length: int
    index: int
    source: tuple
    name: str | None = None  # a file of its own (a per-sample PNG) instead of a line

    @property
    def place(self) -> str:
        return f"line {self.line}" if self.name is None else self.name


def _parse(raw: bytes):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


_RECORD_START = b'{"index":'  # how every record lsd writes begins
MAX_LINE = 1 << 26  # a longer line is not a sample record; reading stops there, whatever the file size


def _records(f: BinaryIO, path: str, torn_ok: bool) -> Iterator[Record]:
    """The records of an open jsonl sample file from its start.

    A last line without a newline is a torn write: left out when ``torn_ok`` and it begins like a
    record (anything else is not ours to cut), else an error. A complete line must be a record.
    """
    f.seek(0)
    offset, line = 0, 0
    while raw := f.readline(MAX_LINE):
        line += 1
        if not raw.endswith(b"\n"):
            if len(raw) == MAX_LINE:
                raise LsdError(f"{path} line {line} is longer than {MAX_LINE} bytes: not a sample file")
            if torn_ok and (raw.startswith(_RECORD_START) or _RECORD_START.startswith(raw)):
                return
            if torn_ok:
                raise LsdError(f"{path} line {line} is not a sample record; refusing to write over it")
            raise LsdError(f"{path} line {line} is incomplete (an interrupted run? finish it with lsd sample ... --resume)")
        obj = _parse(raw)
        if obj is None:
            raise LsdError(f"{path} line {line} is not valid JSON (write samples with --format jsonl)")
        index = obj.get("index") if isinstance(obj, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise LsdError(f"{path} line {line} is not a sample record (write samples with --format jsonl)")
        yield Record(line, offset, len(raw), index, tuple(obj.get(k) for k in PROVENANCE))
        offset += len(raw)


def scan(path: str, torn_ok: bool = False) -> tuple[list[Record], int]:
    """The records of a jsonl sample file and the byte size of its complete part (see :func:`_records`)."""
    with open(path, "rb") as f:
        records = list(_records(f, path, torn_ok))
    return records, sum(r.length for r in records)


def _what(field: str, value) -> str:
    return f"{field.replace('_', ' ')} {value}"


def _mismatch(source: tuple, reference: tuple) -> tuple[str, str] | None:
    """(this, reference) descriptions of the first provenance field that differs, or None."""
    for field, a, b in zip(PROVENANCE, source, reference):
        if a != b:
            return _what(field, a), _what(field, b)
    return None


def samples_done(f: BinaryIO, path: str, indices: Sequence[int], provenance: dict) -> int:
    """How many of ``indices`` the open file ``f`` (``path``) already holds, in order and from this
    run's sampler, model and seed; cuts a torn last line off. Reads record by record (memory flat in n)."""
    expected = tuple(provenance.get(k) for k in PROVENANCE)
    done, end, problem = 0, 0, None
    for r in _records(f, path, torn_ok=True):  # a malformed line anywhere is reported before a mismatch
        if problem:
            continue
        if done >= len(indices):
            problem = f"{path} holds more samples than this run makes ({len(indices)}); was -n or --shard changed?"
        elif r.index != indices[done]:
            problem = (f"{path} line {r.line} holds index {r.index} where this run writes index {indices[done]}; "
                       "was -n or --shard changed?")
        elif diff := _mismatch(r.source, expected):
            problem = f"{path} line {r.line} was sampled with {diff[0]}, this run uses {diff[1]}"
        else:
            done, end = done + 1, r.offset + r.length
    if problem:
        raise LsdError(problem)
    if end < os.fstat(f.fileno()).st_size:
        f.truncate(end)
    return done


def _refusal(path: str) -> str:
    return f"{path} already holds data; pass --resume to continue it or --force to replace it"


def check_output(path: str, resume: bool = False, force: bool = False, input_path: str | None = None) -> None:
    """Before any work: ``path`` can be appended to, is not the --input file, and is not a non-empty
    file that neither --resume nor --force allows touching."""
    fileio.check_file(path, append=True)
    if input_path and os.path.exists(input_path) and os.path.exists(path) and os.path.samefile(path, input_path):
        raise LsdError(f"-o {path} is the --input file; write the samples elsewhere")
    if not (resume or force) and os.path.isfile(path) and os.path.getsize(path) > 0:
        raise LsdError(_refusal(path))


@contextlib.contextmanager
def open_output(path: str, indices: Sequence[int], provenance: dict, resume: bool = False,
                force: bool = False) -> Iterator[tuple[BinaryIO, int]]:
    """(file positioned for appending, samples already there) for ``lsd sample -o``, under an
    exclusive lock held until the block ends: with ``resume`` the complete samples are kept (see
    :func:`samples_done`); a non-empty file is emptied only with ``force`` and refused otherwise."""
    with fileio.locked_append(path) as f:
        if not f.seekable():  # a device or FIFO: nothing to keep or lose
            yield f, 0
            return
        if resume:
            done = samples_done(f, path, indices, provenance)
        elif os.fstat(f.fileno()).st_size and not force:
            raise LsdError(_refusal(path))
        else:
            if os.fstat(f.fileno()).st_size:
                f.truncate(0)
            done = 0
        f.seek(0, os.SEEK_END)
        yield f, done


def _check_shard_names(paths: list[str]) -> None:
    """When every file is named like ``*.shard-I-of-N.*`` with one N, every shard must be there."""
    found = [SHARD_NAME.search(os.path.basename(p)) for p in paths]
    if not found or not all(found) or len({int(m.group(2)) for m in found}) != 1:
        return
    num_shards = int(found[0].group(2))
    missing = sorted(set(range(num_shards)) - {int(m.group(1)) for m in found})
    if missing:
        raise LsdError(f"shard {missing[0]} of {num_shards} is missing" + (f" ({len(missing)} shards missing)" if len(missing) > 1 else ""))


def plan(paths: list[str], read=lambda path: scan(path)[0]) -> list[tuple[str, Record]]:
    """(file, record) for indices 0..n-1 in order, after checking each appears once and all agree;
    ``read(path)`` gives a path's records (a jsonl file's by default)."""
    _check_shard_names([p.rstrip("/" + os.sep) or p for p in paths])
    seen: dict[int, tuple[str, Record]] = {}
    reference = None
    for path in paths:
        for r in read(path):
            if r.index in seen:
                other, first = seen[r.index]
                where = f"twice in {path} (lines {first.line} and {r.line})" if other == path else f"in {other} and {path}"
                raise LsdError(f"index {r.index} appears {where}")
            if reference is None:
                reference = (path, r)
            diff = _mismatch(r.source, reference[1].source)
            if diff:
                raise LsdError(f"{path} {r.place} was sampled with {diff[0]}, {reference[0]} with {diff[1]}")
            seen[r.index] = (path, r)
    n = max(seen, default=-1) + 1
    if len(seen) < n:
        missing = next(i for i in range(n) if i not in seen)
        count = n - len(seen)
        raise LsdError(f"index {missing} is missing" + (f" ({count} indices missing in all)" if count > 1 else ""))
    return [seen[i] for i in range(n)]


def merge(paths: list[str], output: str | None) -> int:
    """Write the records of ``paths`` in index order to ``output`` (atomically) or stdout; returns n."""
    if output:
        fileio.check_file(output)  # before reading any input: a missing directory is refused, not created
    order = plan(paths)
    with fileio.atomic_write(output, "wb") if output else contextlib.nullcontext(sys.stdout.buffer) as out:
        current, f = None, None
        try:
            for path, r in order:
                if path != current:  # shards are contiguous blocks, so each file is opened once
                    if f:
                        f.close()
                    current, f = path, open(path, "rb")
                f.seek(r.offset)
                out.write(f.read(r.length))
            out.flush()
        finally:
            if f:
                f.close()
    return len(order)
