"""Your own model: a factory given a name with :func:`register`, or named as MODULE:FACTORY (a module or
a ``.py`` file), called to build a :class:`~lsdtool.models.base.DiffusionModel` (torch-free until then).

A model without a ``name`` is named after its factory; one without a ``fingerprint`` gets the
factory's name and a digest of its source file, so an edit to that file is a new model (weights
read from elsewhere are not seen: set ``fingerprint`` for those).
"""

from __future__ import annotations

import inspect
import os
from typing import Callable

from lsdtool import plugins
from lsdtool.errors import LsdError, first_line
from lsdtool.models.registry import REGISTRY

USAGE = "MODULE:FACTORY (a module name or a .py file, and a function returning a DiffusionModel)"
CONTRACT = "vocab_size, seq_len, graph, noise, log_score"

_REGISTERED: dict[str, Callable] = {}


def register(name: str, factory: Callable) -> None:
    """Make ``lsdtool.load_model(name)`` (and ``--model name`` in this process) call ``factory()``."""
    if not isinstance(name, str) or not name.strip() or ":" in name or os.sep in name:
        raise LsdError(f"cannot register model {name!r}: a name is a non-empty string without ':' or '{os.sep}'")
    if name in REGISTRY:
        raise LsdError(f"cannot register model {name!r}: it is a built-in model's name")
    if not callable(factory):
        raise LsdError(f"cannot register model {name!r}: {type(factory).__name__} is not callable")
    _REGISTERED[name] = factory


def is_own(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a registered name or a MODULE:FACTORY spec (an existing directory never is)."""
    return name_or_path in _REGISTERED or (":" in name_or_path and not os.path.isdir(name_or_path))


def source(name_or_path: str) -> str:
    """How to build the model again, as an artifact records it: the registered name, or the spec with a
    ``.py`` path made absolute."""
    return name_or_path if name_or_path in _REGISTERED else plugins.absolute(name_or_path)


def build(name_or_path: str):
    """The model its factory returns, checked against the adapter contract; LsdError (one line) otherwise."""
    if name_or_path in _REGISTERED:
        factory = _REGISTERED[name_or_path]
        default_name, digest = name_or_path, _factory_digest(factory)
    else:
        factory, digest = plugins.import_object(name_or_path, "model", USAGE)
        module_name, attr = plugins.split(name_or_path)
        stem = os.path.splitext(os.path.basename(module_name))[0] if plugins.is_file(module_name) else module_name
        default_name = f"{stem}:{attr}"
    try:
        model = factory()
    except Exception as e:
        raise LsdError(f"model {name_or_path}: its factory raised {first_line(e, with_type=True)}") from None
    check(model, name_or_path)
    if not getattr(model, "name", None):
        model.name = default_name
    if not getattr(model, "fingerprint", None):
        if digest is None:
            raise LsdError(f"model {name_or_path}: it has no fingerprint and its factory no source file to derive "
                           "one from; set model.fingerprint")
        model.fingerprint = f"{default_name}:sha256:{digest}"
    return model


def _factory_digest(factory) -> str | None:
    module = inspect.getmodule(factory)
    digest = plugins.source_digest(factory, module)
    return None if digest == "unknown" else digest


def check(model, spec: str) -> None:
    """Raise LsdError naming ``spec`` unless ``model`` meets the adapter contract (DESIGN §3)."""
    from lsdtool.diffusion import Noise
    from lsdtool.diffusion.graphs import Graph, make_graph
    from lsdtool.models.base import DiffusionModel

    def fail(problem: str):
        raise LsdError(f"model {spec}: {problem} (a model has {CONTRACT})")

    if not isinstance(model, DiffusionModel):
        fail(f"the factory returned {type(model).__name__}, not an lsdtool.DiffusionModel")
    for key, least in (("vocab_size", 2), ("seq_len", 1)):
        value = getattr(model, key, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            fail(f"{key} is {value!r}, not an integer of at least {least}")
    graph = getattr(model, "graph", None)
    if not isinstance(graph, Graph):
        try:
            make_graph(graph, model.vocab_size)
        except (TypeError, ValueError) as e:
            fail(f"graph: {first_line(e)}")
    if not isinstance(getattr(model, "noise", None), Noise):
        fail(f"noise is {type(getattr(model, 'noise', None)).__name__}, not an lsdtool.diffusion.Noise")
    if type(model).log_score is DiffusionModel.log_score:
        fail("it does not define log_score(x, t)")
