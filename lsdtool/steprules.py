"""The one table of step rules (DESIGN §5): name, transition kernel, graphs, calls per step, step function.

Torch-free, so the command line, recipe schema and artifact checks can read it without importing
the engine. Each rule's step function is named as ``"module:function"`` and imported only when the
engine runs it; it is a generator ``step(run, k, x)`` yielding one :class:`lsdtool.samplers.Step`
per model call of step k (see :class:`lsdtool.samplers.Run`), drawing through the kernel type the row
names (:mod:`lsdtool.kernels`). A rule declares the graphs it runs on (:meth:`StepRule.supports` is
the one check of that) and its model calls per step, a number or a function of the sampler's options.
Adding a rule is one entry below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

KERNELS = ("categorical", "commit-by-score")  # kernel types of lsdtool.kernels (a categorical step takes its
# closed form, MaskedCategorical, at the masked rows of an absorbing graph)
GRAPH_WORDS = {"absorb": "an absorbing", "uniform": "a uniform"}  # for messages: "needs an absorbing model"


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def graph_name(model) -> str:
    """The name of a model's graph, whether it holds a graph object or a name."""
    graph = model.graph
    return graph if isinstance(graph, str) else graph.name


@dataclass(frozen=True)
class StepRule:
    name: str
    kernel: str  # the kernel type its steps draw with (one of KERNELS)
    graphs: tuple[str, ...]  # names of the graphs it runs on
    step: str  # "module:function" of the step generator, imported lazily
    distillable: bool  # LSD can fit its coefficients (its kernel has a one-step likelihood; for the commit rules,
    # that of the teacher's committed tokens, the commit set taken as given, Phi in temperature mode)
    calls: int | str = 1  # model calls (NFE) per step, or "module:function" of the sampler options -> calls

    def step_function(self):
        """The step generator ``step(run, k, x)``, imported on first use."""
        return _resolve(self.step)

    def calls_per_step(self, options: dict | None = None) -> int:
        """Model calls per step for a sampler with ``options``."""
        return self.calls if isinstance(self.calls, int) else int(_resolve(self.calls)(dict(options or {})))

    def supports_graph(self, name: str) -> bool:
        return name in self.graphs

    def supports(self, model) -> bool:
        """True when the rule runs on ``model``'s graph."""
        return self.supports_graph(graph_name(model))

    def requirement(self) -> str:
        """What the rule needs, e.g. "an absorbing model"."""
        words = [GRAPH_WORDS.get(g, f"a {g}") for g in self.graphs]
        return " or ".join(words[:1] + [w.split(" ", 1)[1] for w in words[1:]]) + " model"

    def problem(self, model) -> str | None:
        """One line saying why the rule cannot run on ``model``, or None."""
        if self.supports(model):
            return None
        return f"the {self.name} sampler needs {self.requirement()}; {getattr(model, 'name', 'this model')} is {graph_name(model)}"


TEXT = ("absorb", "uniform")
RULES: dict[str, StepRule] = {rule.name: rule for rule in (
    StepRule("euler", "categorical", TEXT, "lsdtool.samplers:one_call_step", True),
    StepRule("tweedie", "categorical", TEXT, "lsdtool.samplers:one_call_step", True),
    StepRule("count", "categorical", ("absorb",), "lsdtool.samplers:count_step", True),  # fixed-count random order
    StepRule("theta-trapezoidal", "categorical", TEXT, "lsdtool.samplers:trapezoidal_step", False, 2),  # second order, theta = 1/2
    StepRule("confidence", "commit-by-score", ("absorb",), "lsdtool.adaptive:confidence_step", True),  # most confident first
    StepRule("entropy-bound", "commit-by-score", ("absorb",), "lsdtool.adaptive:entropy_bound_step", False),  # <= 1 call per sample and step
)}
NAMES: tuple[str, ...] = tuple(RULES)  # every rule: `lsd sample --base`, compare's plain rows, artifacts
DISTILLABLE: tuple[str, ...] = tuple(r.name for r in RULES.values() if r.distillable)  # recipe `base`, `lsd distill --base`


def rule(name: str) -> StepRule:
    """The table entry for ``name``; ValueError names the known rules."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown base {name!r} (expected one of {', '.join(NAMES)})") from None
