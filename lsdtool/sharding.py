"""Splitting one sampling run across processes: shard specs, launcher environments, output names.

Shard I of N draws the I-th of N contiguous blocks of the global indices 0..n-1 (earlier blocks
are one longer when N does not divide n). Since sample i depends only on (seed, i), the shards'
outputs concatenated in shard order equal the unsharded output line for line.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

# (index variable, count variable) per launcher, in the order they are tried.
_LAUNCHERS = (
    ("RANK", "WORLD_SIZE"),  # torchrun, accelerate
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),  # sbatch --array
    ("SLURM_PROCID", "SLURM_NTASKS"),  # srun -n N
)
_TEMPLATE = re.compile(r"\{(shard|num_shards)(?::([^{}]*))?\}")
SHARD_NAME = re.compile(r"\.shard-(\d+)-of-(\d+)(?:\.[^./\\]*)?$")


def _check(shard: int, num_shards: int, what: str) -> tuple[int, int]:
    if num_shards < 1:
        raise ValueError(f"{what}: the number of shards must be at least 1")
    if not 0 <= shard < num_shards:
        raise ValueError(f"{what}: the shard must lie in 0..{num_shards - 1} (shards are numbered from 0)")
    return shard, num_shards


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; ValueError with a one-line reason otherwise."""
    m = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", text or "")
    if not m:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}")
    return _check(int(m.group(1)), int(m.group(2)), f"--shard {text}")


def _int(env: Mapping[str, str], var: str) -> int:
    try:
        return int(env[var])
    except ValueError:
        raise ValueError(f"{var}={env[var]!r} is not an integer") from None


def shard_from_env(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(I, N) from a launcher's variables (torchrun/accelerate, SLURM array, srun), or None outside one."""
    for index_var, count_var in _LAUNCHERS:
        if index_var not in env or count_var not in env:
            continue
        shard, num_shards = _int(env, index_var), _int(env, count_var)
        what = f"{index_var}={env[index_var]} {count_var}={env[count_var]}"
        if index_var == "SLURM_ARRAY_TASK_ID":
            first = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
            stride = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
            if stride < 1 or (shard - first) % stride:
                raise ValueError(f"{what}: the array must be a range (e.g. --array=0-{num_shards - 1})")
            shard = (shard - first) // stride
        return _check(shard, num_shards, what)
    return None


def shard_range(n: int, shard: int, num_shards: int) -> range:
    """The global indices of shard ``shard`` of ``num_shards`` over 0..n-1 (a contiguous block)."""
    size, extra = divmod(n, num_shards)
    start = shard * size + min(shard, extra)
    return range(start, start + size + (shard < extra))


def shard_path(output: str, shard: int, num_shards: int) -> str:
    """The output file of one shard: ``{shard}``/``{num_shards}`` expanded (5 digits unless a spec
    like ``{shard:03d}`` is given), else ``out.shard-0000I-of-0000N.jsonl`` when N > 1."""
    values = {"shard": shard, "num_shards": num_shards}
    if _TEMPLATE.search(output):
        return _TEMPLATE.sub(lambda m: format(values[m.group(1)], m.group(2) or "05d"), output)
    if num_shards == 1:
        return output
    root, ext = os.path.splitext(output)
    return f"{root}.shard-{shard:05d}-of-{num_shards:05d}{ext}"


def launcher_device(name: str | None, env: Mapping[str, str]) -> str | None:
    """``cuda:LOCAL_RANK`` for an ``auto`` device under a launcher on a CUDA machine, else ``name``."""
    if name not in (None, "", "auto") or "LOCAL_RANK" not in env:
        return name
    import torch

    local_rank = _int(env, "LOCAL_RANK")
    return f"cuda:{local_rank}" if torch.cuda.is_available() else name
