"""Checks of a sampler's grid, coefficients and rule options in pure Python (no torch): shared by
:meth:`lsdtool.samplers.Sampler.check` and the artifact reader."""

from __future__ import annotations

import math

from lsdtool import steprules

MODES = ("score", "temperature")  # what Phi multiplies: the concrete score, or the log score
PHI_RANGE = (1e-3, 1e3)  # sane coefficients: the untrained Phi is 1 and a fit moves it by far less than 1000x


def grid_problem(ts: list[float], cs: list[float], base: str, mode: str) -> str | None:
    """What is wrong with a grid tau_0 > ... > tau_M in (0, 1] and coefficients Phi_1..M, or None."""
    if base not in steprules.RULES:
        return f"unknown base {base!r} (expected one of {', '.join(steprules.NAMES)})"
    if mode not in MODES:
        return f"unknown mode {mode!r} (expected {' or '.join(MODES)})"
    if len(cs) < 1 or len(ts) != len(cs) + 1:
        return f"timesteps ({len(ts)}) and coeffs ({len(cs)}) do not match (need M+1 and M, M >= 1)"
    if not all(math.isfinite(v) for v in ts + cs):
        return "timesteps or coeffs contain NaN or inf"
    if not all(b < a for a, b in zip(ts, ts[1:])):
        return "timesteps are not strictly decreasing"
    if ts[-1] <= 0 or ts[0] > 1:
        return f"timesteps must lie in (0, 1], got {ts[0]:g} .. {ts[-1]:g}"
    if abs(ts[0] - 1) > 1e-9:
        return f"the grid must start at tau_0 = 1 (pure noise), got {ts[0]:g}"
    if mode == "score" and not all(c > 0 for c in cs):
        return "score-mode coefficients must be positive"
    low, high = PHI_RANGE
    outside = [c for c in cs if not low <= c <= high]
    if outside:
        return f"coefficient Phi = {outside[0]:g} lies outside the sane range [{low:g}, {high:g}]"
    return None


# the options of the step rules that take any (lsdtool.adaptive): name -> allowed values (a tuple) or a check of a number
COUNTS = ("noise", "even")  # tokens per step: following the grid's masked fraction, or split evenly (LLaDA)
_WHOLE = lambda v: v >= 1 and float(v).is_integer()  # noqa: E731 (a count of tokens)
BLOCKS = {"gen_length": _WHOLE, "block_length": _WHOLE, "greedy": (True, False), "cfg": lambda v: v >= 0}  # lsdtool.blocks
OPTIONS = {
    "count": {"counts": COUNTS, **BLOCKS},
    "confidence": {"temperature": lambda v: v > 0, "score": ("probability", "margin"), "counts": COUNTS, **BLOCKS},
    "entropy-bound": {"temperature": lambda v: v > 0, "gamma": lambda v: v >= 0},
    "tau-leaping": {"min_t": lambda v: 0 < v < 1},
    "tau-leaping-pc": {"min_t": lambda v: 0 < v < 1, "corrector_entry": lambda v: 0 <= v <= 1,
                       "corrector_steps": lambda v: v >= 0 and v == int(v), "corrector_size": lambda v: v > 0},
}


def options_problem(base: str, options, steps: int | None = None) -> str | None:
    """What is wrong with a step rule's options (a dict), or None; with ``steps``, also whether they divide into
    the blocks."""
    if not isinstance(options, dict):
        return "options must be a mapping"
    allowed = OPTIONS.get(base, {})
    for key, value in options.items():
        check = allowed.get(key)
        if check is None:
            return f"base {base!r} takes no option {key!r}" + (f" (it takes {', '.join(allowed)})" if allowed else "")
        if isinstance(check, tuple):
            if value not in check:
                return f"option {key} must be one of {', '.join(check)}, got {value!r}"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not check(value):
            return f"option {key} = {value!r} is out of range"
    return blocks_problem(options, steps)


def blocks_problem(options: dict, steps: int | None) -> str | None:
    """What is wrong with the block options (:mod:`lsdtool.blocks`) and the number of steps, or None."""
    gen, block = options.get("gen_length"), options.get("block_length")
    if block is not None and gen is not None and gen % block:
        return f"block length {block:g} does not divide gen length {gen:g}"
    if steps is not None and gen is not None:
        blocks = int(gen // (block or gen))
        if steps % blocks:
            return f"{steps} steps do not divide into {blocks} blocks (use a multiple of {blocks})"
    return None
