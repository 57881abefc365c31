"""The numeric limits of the command line, each the range the code behind it honours (torch-free).

Randomness is a hash of (seed, sample index, ...) in :mod:`lsdtool.rng`, which folds the seed to
64 bits and the sample index to 32 bits: a seed outside 0..2**64-1 or an index past 2**32-1 would
silently repeat another one's samples, so such values are refused rather than wrapped.
"""

from __future__ import annotations

import math

SEED_LIMIT = 2**64  # seeds 0..2**64-1 are distinct
INDEX_LIMIT = 2**32  # sample indices 0..2**32-1 are distinct, so at most 2**32 samples per run
STEPS_LIMIT = 2**20  # steps of a sampler or teacher: far past any useful grid, and its tensors stay small
BATCH_LIMIT = 2**20  # samples per batch
ITERS_LIMIT = 10**9  # optimiser iterations


def in_range(low: int, high: int, why: str = ""):
    """A click callback accepting integers in low..high (None passes through)."""

    def check(ctx, param, value):
        import click

        if value is not None and not low <= value <= high:
            raise click.BadParameter(f"must lie in {low}..{high}" + (f" ({why})" if why else "") + f", got {value}")
        return value

    return check


seed_range = in_range(0, SEED_LIMIT - 1, "the generator folds seeds to 64 bits")
count_range = in_range(0, INDEX_LIMIT, "sample indices are 32-bit")
steps_range = in_range(1, STEPS_LIMIT)
batch_range = in_range(1, BATCH_LIMIT)


def batch_size(ctx, param, value):
    """A click callback accepting ``auto`` (sized from free memory) or an integer in 1..BATCH_LIMIT."""
    import click

    if value is None or value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter(f"must be auto or an integer, got {value!r}") from None
    return batch_range(ctx, param, number)


def positive_finite(ctx, param, value):
    """A click callback accepting floats that are finite and above 0 (None passes through)."""
    import click

    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite number above 0, got {value}")
    return value


# torch's device types (c10::DeviceType), so that a misspelt --device is refused before torch is imported,
# on a cache hit too; whether the device exists here is checked when a model is loaded (generation.pick_device).
DEVICE_TYPES = ("cpu", "cuda", "ipu", "xpu", "mkldnn", "opengl", "opencl", "ideep", "hip", "ve", "fpga", "maia",
                "xla", "lazy", "vulkan", "mps", "meta", "hpu", "mtia", "privateuseone")


def device_name(ctx, param, value):
    """A click callback accepting ``auto`` or torch's ``TYPE[:INDEX]`` spelling of a device."""
    import re

    import click

    match = re.fullmatch(r"([a-z]+)(?::(0|[1-9][0-9]*))?", value or "")
    if value != "auto" and (match is None or match[1] not in DEVICE_TYPES):
        raise click.BadParameter(f"{value!r} is not a device name: auto, or TYPE[:INDEX] with TYPE one of "
                                 f"{', '.join(DEVICE_TYPES)} (cuda:1, say)")
    return value
