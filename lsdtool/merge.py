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


def _parse(raw: bytes):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def scan(path: str, torn_ok: bool = False) -> tuple[list[Record], int]:
    """The records of a jsonl sample file and the byte size of its complete part.

    A torn last line (no newline at the end, or invalid JSON) is left out when ``torn_ok``, else an error.
    """
    records, offset = [], 0
    with open(path, "rb") as f:
        while raw := f.readline():
            line = len(records) + 1
            obj = _parse(raw) if raw.endswith(b"\n") else None
            if obj is None:
                last = not f.read(1)  # only the last line can be a torn write
                if last and torn_ok:
                    break
                if last and not raw.endswith(b"\n"):
                    raise LsdError(f"{path} line {line} is incomplete (an interrupted run? finish it with lsd sample ... --resume)")
                raise LsdError(f"{path} line {line} is not valid JSON (write samples with --format jsonl)")
            index = obj.get("index") if isinstance(obj, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise LsdError(f"{path} line {line} is not a sample record (write samples with --format jsonl)")
            records.append(Record(line, offset, len(raw), index, tuple(obj.get(k) for k in PROVENANCE)))
            offset += len(raw)
    return records, offset


def _what(field: str, value) -> str:
    return f"{field.replace('_', ' ')} {value}"


def _mismatch(source: tuple, reference: tuple) -> tuple[str, str] | None:
    """(this, reference) descriptions of the first provenance field that differs, or None."""
    for field, a, b in zip(PROVENANCE, source, reference):
        if a != b:
            return _what(field, a), _what(field, b)
    return None


def resume(path: str, indices: list[int], provenance: dict) -> int:
    """How many of ``indices`` ``path`` already holds, in order and from this run's sampler, model and
    seed; cuts a torn last line off the file. A missing file holds none."""
    if not os.path.exists(path):
        return 0
    records, end = scan(path, torn_ok=True)
    expected = tuple(provenance.get(k) for k in PROVENANCE)
    for pos, r in enumerate(records):
        if pos >= len(indices):
            raise LsdError(f"{path} holds more samples than this run makes ({len(indices)}); was -n or --shard changed?")
        if r.index != indices[pos]:
            raise LsdError(f"{path} line {r.line} holds index {r.index} where this run writes index {indices[pos]}; "
                           "was -n or --shard changed?")
        diff = _mismatch(r.source, expected)
        if diff:
            raise LsdError(f"{path} line {r.line} was sampled with {diff[0]}, this run uses {diff[1]}")
    if end < os.path.getsize(path):
        os.truncate(path, end)
    return len(records)


def _check_shard_names(paths: list[str]) -> None:
    """When every file is named like ``*.shard-I-of-N.*`` with one N, every shard must be there."""
    found = [SHARD_NAME.search(os.path.basename(p)) for p in paths]
    if not found or not all(found) or len({int(m.group(2)) for m in found}) != 1:
        return
    num_shards = int(found[0].group(2))
    missing = sorted(set(range(num_shards)) - {int(m.group(1)) for m in found})
    if missing:
        raise LsdError(f"shard {missing[0]} of {num_shards} is missing" + (f" ({len(missing)} shards missing)" if len(missing) > 1 else ""))


def plan(paths: list[str]) -> list[tuple[str, Record]]:
    """(file, record) for indices 0..n-1 in order, after checking each appears once and all agree."""
    _check_shard_names(paths)
    seen: dict[int, tuple[str, Record]] = {}
    reference = None
    for path in paths:
        for r in scan(path)[0]:
            if r.index in seen:
                other, first = seen[r.index]
                where = f"twice in {path} (lines {first.line} and {r.line})" if other == path else f"in {other} and {path}"
                raise LsdError(f"index {r.index} appears {where}")
            if reference is None:
                reference = (path, r)
            diff = _mismatch(r.source, reference[1].source)
            if diff:
                raise LsdError(f"{path} line {r.line} was sampled with {diff[0]}, {reference[0]} with {diff[1]}")
            seen[r.index] = (path, r)
    n = max(seen, default=-1) + 1
    if len(seen) < n:
        missing = next(i for i in range(n) if i not in seen)
        count = n - len(seen)
        raise LsdError(f"index {missing} is missing" + (f" ({count} indices missing in all)" if count > 1 else ""))
    return [seen[i] for i in range(n)]


def merge(paths: list[str], output: str | None) -> int:
    """Write the records of ``paths`` in index order to ``output`` (atomically) or stdout; returns n."""
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
