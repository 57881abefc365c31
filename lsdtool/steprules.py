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

KERNELS = ("categorical", "commit-by-score", "poisson-jumps")  # kernel types of lsdtool.kernels (a categorical step takes its
# closed form, MaskedCategorical, at the masked rows of an absorbing graph)
GRAPH_WORDS = {"absorb": "an absorbing", "uniform": "a uniform", "gaussian": "an ordinal (gaussian)"}  # for messages: "needs an absorbing model"


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
    one_step: str | None  # "module:function" (t, s, base, coeff, mode, final) -> the kernel of one student step,
    # whose likelihood LSD fits; None: the rule cannot be distilled
    calls: int = 1  # model calls (NFE) per step
    final_calls: int = 0  # calls after the last step (tau-leaping's final argmax)
    extra_calls: str | None = None  # "module:function" (sampler) -> calls that depend on the sampler (correctors)
    grid: str | None = None  # "module:function" (steps, options) -> the plain grid, where not SEDD's uniform one

    @property
    def distillable(self) -> bool:
        return self.one_step is not None

    @property
    def commits(self) -> bool:
        """The rule commits candidates per step (count, confidence): LSD fits the committed tokens' likelihood."""
        return self.one_step == COMMIT_STEP

    def one_step_kernel(self, *args):
        """The kernel of one step t -> s of this rule (:mod:`lsdtool.kernels`), for the teacher-path likelihood."""
        return _resolve(self.one_step)(*args)

    def step_function(self):
        """The step generator ``step(run, k, x)``, imported on first use."""
        return _resolve(self.step)

    def nfe(self, sampler) -> int:
        """Model calls of ``sampler`` with this rule (its optional denoise call included)."""
        extra = int(_resolve(self.extra_calls)(sampler)) if self.extra_calls else 0
        return sampler.steps * self.calls + self.final_calls + extra + int(sampler.denoise)

    def steps_for(self, nfe: int) -> int | None:
        """Steps of a plain sampler that spends ``nfe`` calls (no denoise), or None where none does."""
        if self.extra_calls:
            return None  # the calls depend on the grid: the caller searches
        steps, rest = divmod(nfe - self.final_calls, self.calls)
        return steps if steps >= 1 and not rest else None

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


COMMIT_STEP = "lsdtool.samplers:commit_step_kernel"  # one student step of a commit rule
TEXT = ("absorb", "uniform")
ORDINAL = ("gaussian",)
RULES: dict[str, StepRule] = {rule.name: rule for rule in (
    StepRule("euler", "categorical", TEXT, "lsdtool.samplers:one_call_step", "lsdtool.samplers:categorical_step_kernel"),
    StepRule("tweedie", "categorical", TEXT, "lsdtool.samplers:one_call_step", "lsdtool.samplers:categorical_step_kernel"),
    StepRule("count", "categorical", ("absorb",), "lsdtool.samplers:count_step", COMMIT_STEP),  # fixed-count random order
    StepRule("theta-trapezoidal", "categorical", TEXT, "lsdtool.samplers:trapezoidal_step", None, 2),  # second order, theta = 1/2
    StepRule("confidence", "commit-by-score", ("absorb",), "lsdtool.adaptive:confidence_step", COMMIT_STEP),  # most confident first
    StepRule("entropy-bound", "commit-by-score", ("absorb",), "lsdtool.adaptive:entropy_bound_step", None),  # <= 1 call per sample and step
    StepRule("tau-leaping", "poisson-jumps", ORDINAL, "lsdtool.samplers:tau_leaping_step", "lsdtool.samplers:jump_step_kernel", final_calls=1,
             grid="lsdtool.samplers:tau_leaping_grid"),  # tauLDR's, with its final argmax
    StepRule("tau-leaping-pc", "poisson-jumps", ORDINAL, "lsdtool.samplers:tau_leaping_pc_step", None, final_calls=1,
             extra_calls="lsdtool.samplers:corrector_steps", grid="lsdtool.samplers:tau_leaping_grid"),  # + correctors
)}
NAMES: tuple[str, ...] = tuple(RULES)  # every rule: `lsd sample --base`, compare's plain rows, artifacts
DISTILLABLE: tuple[str, ...] = tuple(r.name for r in RULES.values() if r.distillable)  # recipe `base`, `lsd distill --base`


def rule(name: str) -> StepRule:
    """The table entry for ``name``; ValueError names the known rules."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown base {name!r} (expected one of {', '.join(NAMES)})") from None
