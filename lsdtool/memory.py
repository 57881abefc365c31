"""``--batch-size auto``: a batch size from the memory a device has free, and the error that says a batch did not fit."""

from __future__ import annotations

import os

import torch

# Peak bytes of one sampling step per sample, in units of its float32 scores (L x V x 4 bytes): the scores, the
# engine's float64 row chunks and the forward's activations together. benchmarks/engine_overhead.py --memory
# (benchmarks/results/engine-memory-cpu-quick.json: CPU, tiny network, L = 1024) measured the growth of the
# peak over the loaded model at 1.3-2.8 of the scores for sampling at B = 16 and 64 (a bare forward: 1.2-2.3);
# B = 1 adds a fixed few MiB. 3.5 covers every rule and graph measured.
STEP_FACTOR = 3.5
SHARE = 0.5  # of the free memory a batch may take: the rest is for the allocator's slack and everything else
AUTO_CAP = 1024  # samples per batch at most: past this a CPU gains nothing and a GPU little


def available_bytes(device: torch.device) -> int:
    """Bytes free for a batch: CUDA's free memory, else MemAvailable of /proc/meminfo (or free pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 30  # no way to ask: assume 1 GiB


def sample_bytes(model) -> int:
    """Estimated peak bytes of one sample in a sampling step: L x V float32 scores times :data:`STEP_FACTOR`."""
    return int(model.seq_len * model.vocab_size * 4 * STEP_FACTOR)


def auto_batch_size(model, device: torch.device, n: int) -> int:
    """The batch size ``auto`` starts with: what :data:`SHARE` of the free memory holds, 1..min(n, AUTO_CAP)."""
    fits = int(available_bytes(device) * SHARE) // max(1, sample_bytes(model))
    return max(1, min(fits, n, AUTO_CAP))


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
