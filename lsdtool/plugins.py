"""Naming user code on the command line: ``MODULE:NAME`` (``--metric``, ``--model``), torch-free.

MODULE is a dotted module name (importable, or beside the user in the working directory) or a
path to a ``.py`` file; NAME is an attribute of it (dots reach inside, e.g. ``Class.method``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys

from lsdtool.errors import LsdError, first_line


def split(spec: str) -> tuple[str, str] | None:
    """(MODULE, NAME) of a ``MODULE:NAME`` spec, or None when ``spec`` has not that shape."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr or not all(part.isidentifier() for part in attr.split(".")):
        return None
    return module_name, attr


def is_file(module_name: str) -> bool:
    """Whether MODULE names a ``.py`` file rather than a dotted module."""
    return module_name.endswith(".py") or os.sep in module_name


def absolute(spec: str) -> str:
    """``spec`` with a ``.py`` path made absolute (how to find it again from any directory)."""
    module_name, attr = split(spec) or (None, None)
    if module_name is None or not is_file(module_name):
        return spec
    return f"{os.path.abspath(os.path.expanduser(module_name))}:{attr}"


def _import(module_name: str, kind: str, spec: str):
    if not is_file(module_name):
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())  # as `python -m` would find a module beside the user
        return importlib.import_module(module_name)
    path = os.path.abspath(os.path.expanduser(module_name))
    if not os.path.isfile(path):
        raise LsdError(f"{kind} {spec}: no file {module_name}")
    # registered under a name of its own while it runs (dataclasses and pickling look modules up there)
    name = f"lsd_{kind}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_object(spec: str, kind: str, usage: str):
    """(the object named by ``spec`` = MODULE:NAME, a digest of its source file); every failure is one
    LsdError starting ``<kind> <spec>:``; ``usage`` is the hint for a spec of the wrong shape."""
    parts = split(spec)
    if parts is None:
        raise LsdError(f"{kind} {spec!r}: use {usage}")
    module_name, attr = parts
    try:
        module = _import(module_name, kind, spec)
    except LsdError:
        raise
    except Exception as e:  # ImportError, SyntaxError, anything the module raises at import
        raise LsdError(f"{kind} {spec}: cannot import {module_name} ({first_line(e, with_type=True)})") from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise LsdError(f"{kind} {spec}: {module_name} has no function {attr!r}")
    return obj, source_digest(obj, module)


def source_digest(obj, module) -> str:
    """sha256 (16 hex) of the file defining ``obj`` (else its module), or ``unknown``."""
    for owner in (obj, module):
        try:
            with open(inspect.getsourcefile(owner), "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()[:16]
        except (TypeError, OSError):
            continue
    return "unknown"
