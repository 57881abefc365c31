"""TOML recipes for distillation: schema, validation, lookup of shipped recipes, merge with flags (DESIGN §7)."""

from __future__ import annotations

import sys
from pathlib import Path

from lsdtool import steprules
from lsdtool.errors import LsdError
from lsdtool.grids import MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# key -> (type, default, allowed values or None, help)
SCHEMA: dict[str, tuple[type, object, tuple | None, str]] = {
    "model": (str, "", None, "model the recipe was written for (informational)"),
    "steps": (int, 8, None, "student steps M"),
    "plus": (bool, False, None, "LSD+: also learn the time schedule"),
    "base": (str, "euler", steprules.DISTILLABLE, "base step rule"),
    "mode": (str, "score", MODES, "what Phi multiplies"),
    "objective": (str, "teacher-path", ("teacher-path", "paper"), "fitting objective"),
    "teacher_steps": (int, 1024, None, "teacher steps N"),
    "samples": (int, 256, None, "teacher trajectories used for fitting"),
    "batch": (int, 64, None, "trajectories per rollout batch"),
    "iters": (int, 20, None, "optimiser iterations"),
    "lr": (float, 0.05, None, "optimiser learning rate"),
    "seed": (int, 0, None, "seed of the teacher start states and perturbations"),
    "candidates": (int, 128, None, "teacher-path: candidate boundaries for the schedule DP"),
    "relax": (bool, True, None, "paper: start the student from a Hamming-perturbed teacher start"),
    "zeta": (float, 0.05, None, "paper: fraction of positions perturbed by the relaxation"),
    "fill": (str, "uniform", ("teacher", "uniform"), "paper: tokens put at perturbed positions (uniform measured better)"),
    "distance": (str, "mse", ("mse",), "paper: score distance"),
    # block decoding (lsdtool.blocks): 0 / "" = none; written to the TOML (and the cache key) only when set
    "gen_length": (int, 0, None, "tokens generated after each prompt (0: the model's whole sequence)"),
    "block_length": (int, 0, None, "blocks of this many tokens, left to right (0: one block)"),
    "prompts": (str, "", None, "jsonl of {\"prompt\": TEXT}, one per teacher trajectory (cycled)"),
    "prompts_digest": (str, "", None, "sha256 of the prompts file (set by lsd, part of the cache key)"),
}
OPTIONAL = ("gen_length", "block_length", "prompts", "prompts_digest")
POSITIVE = ("steps", "teacher_steps", "samples", "batch", "candidates")

# Shipped recipes: inside the installed package (copied there by the build), else the checkout's recipes/.
RECIPE_DIRS = [Path(__file__).resolve().parent / "recipes", Path(__file__).resolve().parent.parent / "recipes"]


def defaults() -> dict:
    return {k: v[1] for k, v in SCHEMA.items()}


def complete(values: dict, source: str = "recipe") -> dict:
    """A validated recipe with every key the ``values`` leave out at its default."""
    return {**defaults(), **validate({k: v for k, v in values.items() if v is not None}, source)}


def validate(values: dict, source: str) -> dict:
    """Check keys, types and allowed values; ints are accepted where floats are expected."""
    out = {}
    for key, value in values.items():
        if key not in SCHEMA:
            raise LsdError(f"{source}: unknown recipe key {key!r} (known: {', '.join(SCHEMA)})")
        typ, _, allowed, _ = SCHEMA[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise LsdError(f"{source}: recipe key {key!r} must be {typ.__name__}, got {type(value).__name__} {value!r}")
        if allowed is not None and value not in allowed:
            raise LsdError(f"{source}: recipe key {key!r} must be one of {', '.join(allowed)}, got {value!r}")
        if key in ("gen_length", "block_length") and value < 0:
            raise LsdError(f"{source}: recipe key {key!r} must not be negative, got {value}")
        if key in POSITIVE and value < 1:
            raise LsdError(f"{source}: recipe key {key!r} must be at least 1, got {value}")
        if key in ("lr", "zeta") and not (value > 0 and value < float("inf")):
            raise LsdError(f"{source}: recipe key {key!r} must be a positive number, got {value}")
        out[key] = value
    return out


def parse(text: str, source: str) -> dict:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LsdError(f"{source}: malformed TOML: {exc}") from None
    return validate(data, source)


def read(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError, PermissionError) as exc:
        raise LsdError(f"cannot read recipe {path}: {type(exc).__name__}") from None
    return parse(text, str(path))


def shipped(model_name: str, steps: int | None) -> Path | None:
    """The shipped recipe for a model: ``<model>-nfe<K>.toml`` when it exists, else ``<model>.toml``."""
    for d in RECIPE_DIRS:
        for name in ([f"{model_name}-nfe{steps}.toml"] if steps else []) + [f"{model_name}.toml"]:
            if (d / name).is_file():
                return d / name
    return None


def effective(model_name: str, recipe_file: str | None = None, overrides: dict | None = None,
              graph: str | None = None) -> dict:
    """defaults <- shipped recipe (or --recipe FILE) <- CLI flags; ``None`` overrides are ignored. With the
    model's ``graph`` name, a base left at its default that cannot run on that graph becomes the first
    distillable rule that can (``tau-leaping`` for an ordinal image model)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    overrides = validate(overrides, "command line")
    values = defaults()
    path = Path(recipe_file) if recipe_file else shipped(model_name, overrides.get("steps"))
    chosen = dict(read(path)) if path is not None else {}
    values.update(chosen)
    values.update(overrides)
    if graph is not None and "base" not in chosen and "base" not in overrides \
            and not steprules.rule(values["base"]).supports_graph(graph):
        values["base"] = next((n for n in steprules.DISTILLABLE if steprules.rule(n).supports_graph(graph)), values["base"])
    values["model"] = model_name
    if values["teacher_steps"] < values["steps"]:
        raise LsdError(f"teacher_steps ({values['teacher_steps']}) must be at least steps ({values['steps']})")
    return values


def to_toml(values: dict) -> str:
    """Flat scalar dict -> TOML text, keys in schema order (what is hashed and stored)."""
    lines = []
    for key in SCHEMA:
        if key not in values or (key in OPTIONAL and values[key] == SCHEMA[key][1]):
            continue
        v = values[key]
        if isinstance(v, bool):
            lines.append(f"{key} = {'true' if v else 'false'}")
        elif isinstance(v, str):
            lines.append(f"{key} = {json_str(v)}")
        else:
            lines.append(f"{key} = {v!r}")
    return "\n".join(lines) + "\n"


def json_str(s: str) -> str:
    import json

    return json.dumps(s)
