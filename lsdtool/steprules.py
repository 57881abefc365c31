"""The one table of step rules (DESIGN §5): name, model calls per step, absorbing-only, step function.

Torch-free, so the command line, recipe schema and artifact checks can read it without importing
the engine. Each rule's step function is named as ``"module:function"`` and imported only when the
engine runs it; it is a generator ``step(run, k, x)`` yielding one :class:`lsdtool.samplers.Step`
per model call of step k (see :class:`lsdtool.samplers.Run`). Adding a rule is one entry below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class StepRule:
    name: str
    calls: int  # model calls (NFE) per step
    absorbing_only: bool  # needs an absorbing (masked) model
    step: str  # "module:function" of the step generator, imported lazily
    distillable: bool  # LSD can fit its coefficients (the rule has a one-step kernel, step_rows)

    def step_function(self):
        """The step generator ``step(run, k, x)``, imported on first use."""
        module, _, name = self.step.partition(":")
        return getattr(importlib.import_module(module), name)


RULES: dict[str, StepRule] = {rule.name: rule for rule in (
    StepRule("euler", 1, False, "lsdtool.samplers:one_call_step", True),
    StepRule("tweedie", 1, False, "lsdtool.samplers:one_call_step", True),
    StepRule("count", 1, True, "lsdtool.samplers:count_step", False),  # fixed-count random order
    StepRule("theta-trapezoidal", 2, False, "lsdtool.samplers:trapezoidal_step", False),  # second order, theta = 1/2
)}
NAMES: tuple[str, ...] = tuple(RULES)  # every rule: `lsd sample --base`, compare's plain rows, artifacts
DISTILLABLE: tuple[str, ...] = tuple(r.name for r in RULES.values() if r.distillable)  # recipe `base`, `lsd distill --base`


def rule(name: str) -> StepRule:
    """The table entry for ``name``; ValueError names the known rules."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown base {name!r} (expected one of {', '.join(NAMES)})") from None
