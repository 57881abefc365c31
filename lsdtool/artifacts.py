"""Sampler artifacts: one safetensors file, tensors ``timesteps``/``coeffs`` plus string metadata (DESIGN §7).

The format is written and read here only, in pure Python on the read side (a cache hit needs no
torch). A sampler's metadata is everything :attr:`Sampler.meta <lsdtool.samplers.Sampler>` carries
(model, recipe, fit, ...) with the fields the sampler itself defines written from the sampler, so
save -> load -> save keeps every tensor and every field except ``created``.

Format versions: 1 recorded no ``denoise`` and always named a model; 2 records ``denoise`` and
names a model only when the sampler was made for one (a plain sampler names none). Both are read.
"""

from __future__ import annotations

import json
import os
import struct
from datetime import datetime, timezone
from pathlib import Path

from lsdtool import errors, fileio, steprules
from lsdtool.errors import LsdError
from lsdtool.grids import grid_problem, options_problem

FORMAT = "lsd.sampler"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
# written from the sampler itself on every save (never carried over from its metadata)
OWN = ("format", "format_version", "base", "mode", "steps", "denoise", "lsdtool_version", "created")
REQUIRED = OWN
MODEL_FIELDS = ("model", "model_fingerprint", "graph", "noise")  # all of them, or none for a plain sampler
REQUIRED_V1 = ("format", "format_version", "model", "model_fingerprint", "graph", "noise", "base", "mode",
               "steps", "plus", "teacher_steps", "seed", "recipe", "fit", "lsdtool_version", "created")


def graph_params(model) -> dict:
    """The parameters of ``model``'s graph (the mask id of an absorbing graph, ...)."""
    from lsdtool.diffusion import graph_of

    return graph_of(model).params


def model_fields(model) -> dict[str, str]:
    """What an artifact records about the model it was made for (and how to load it again)."""
    return {"model": model.name, "model_fingerprint": model.fingerprint,
            "model_source": str(getattr(model, "source", model.name)), "graph": steprules.graph_name(model),
            "graph_params": json.dumps(graph_params(model), sort_keys=True), "noise": model.noise.describe()}


def metadata(model, sampler, recipe: dict, recipe_toml: str, fit: dict) -> dict[str, str]:
    """The metadata of an artifact distilled for ``model`` with the effective ``recipe``."""
    return {**model_fields(model),
            "plus": "true" if recipe.get("plus") else "false",
            "objective": str(recipe.get("objective", "")),
            "teacher_steps": str(recipe.get("teacher_steps", "")),
            "seed": str(recipe.get("seed", "")),
            "recipe": recipe_toml,
            "fit": json.dumps(fit, sort_keys=True),
            **({"prompts_digest": recipe["prompts_digest"]} if recipe.get("prompts_digest") else {})}


def describe(sampler, meta: dict | None = None) -> dict[str, str]:
    """The metadata block written for ``sampler``: its carried ``meta`` (default ``sampler.meta``)
    with the sampler's own fields (base, mode, steps, denoise, format, version, time) set from it."""
    from lsdtool.version import __version__

    carried = sampler.meta if meta is None else meta
    out = {k: str(v) for k, v in carried.items() if k not in OWN}
    out.update({"format": FORMAT, "format_version": FORMAT_VERSION, "base": sampler.base, "mode": sampler.mode,
                "steps": str(sampler.steps), "denoise": "true" if sampler.denoise else "false",
                "lsdtool_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    out.pop("options", None)
    if sampler.options:  # the step rule's options (lsdtool.adaptive), written only where a rule has them
        out["options"] = json.dumps(sampler.options, sort_keys=True)
    return out


def save(path: str | Path, sampler, meta: dict | None = None) -> Path:
    """Write ``sampler`` (with ``meta``, default its own) to ``path`` atomically through :mod:`lsdtool.fileio`."""
    from safetensors.torch import save

    sampler.check()
    tensors = {"timesteps": sampler.timesteps.detach().double().cpu().contiguous(),
               "coeffs": sampler.coeffs.detach().double().cpu().contiguous()}
    return fileio.write_bytes(path, save(tensors, metadata=describe(sampler, meta)))


MAX_HEADER = 1 << 24  # bytes; an artifact's header (metadata, recipe, fit record) is a few KiB


def _read_parts(path: Path) -> tuple[dict, dict[str, list[float]]]:
    """(header, {tensor: values}) read by seeking: the 8-byte length, the header, the two vectors.
    Sizes are checked before anything is read, so memory stays small whatever the file's size."""
    from lsdtool.bounds import STEPS_LIMIT

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{size} bytes is shorter than a safetensors header")
        (header_size,) = struct.unpack("<Q", f.read(8))
        if header_size > size - 8:
            raise ValueError("header runs past the end of the file")
        if header_size > MAX_HEADER:
            raise ValueError(f"a header of {header_size} bytes is more than an artifact's {MAX_HEADER}")
        header = json.loads(f.read(header_size))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        values = {}
        for name in ("timesteps", "coeffs"):
            entry = header.get(name)
            if entry is None:
                continue
            try:
                begin, end = entry["data_offsets"]
                (n,) = entry["shape"]
                ok = (entry["dtype"] == "F64" and isinstance(n, int) and 1 <= n <= STEPS_LIMIT + 1 and 0 <= begin
                      and end - begin == 8 * n and 8 + header_size + end <= size)
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise LsdError(f"{path}: tensor {name} is not a float64 vector of at most {STEPS_LIMIT + 1} values inside the file")
            f.seek(8 + header_size + begin)
            values[name] = list(struct.unpack(f"<{n}d", f.read(8 * n)))
    return header, values


def read(path: str | Path) -> tuple[dict[str, str], list[float], list[float]]:
    """Metadata, timesteps and coeffs of an artifact, read and validated in pure Python (no torch):
    a cache hit is answered from this alone. Every problem is one LsdError naming the file."""
    path = Path(path)
    if not path.exists():
        raise LsdError(f"sampler artifact {path} does not exist")
    if path.is_dir():
        raise LsdError(f"sampler artifact {path} is a directory, not a .safetensors file")
    try:
        header, values = _read_parts(path)
    except OSError as exc:
        raise LsdError(f"cannot read sampler artifact {path} ({errors.describe(exc)})") from None
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise LsdError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise LsdError(f"{path} is not an lsd sampler artifact (its metadata is not an object)")
    if meta.get("format") != FORMAT:
        raise LsdError(f"{path} is not an lsd sampler artifact (format {str(meta.get('format'))[:40]!r})")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise LsdError(f"{path} has format_version {str(version)[:40]!r}; this lsd reads {', '.join(READABLE_VERSIONS)}")
    required = REQUIRED_V1 if version == "1" else REQUIRED
    missing = [k for k in required if k not in meta] + [k for k in ("timesteps", "coeffs") if k not in values]
    if version != "1" and any(k in meta for k in MODEL_FIELDS):
        missing += [k for k in MODEL_FIELDS if k not in meta]
    if missing:
        raise LsdError(f"{path} lacks {', '.join(missing)}")
    try:
        json.loads(meta.get("fit", "{}"))
        steps = int(meta["steps"])
    except (TypeError, ValueError):
        raise LsdError(f"{path} has malformed metadata (steps or fit)") from None
    if meta.get("denoise", "false") not in ("true", "false"):
        raise LsdError(f"{path} has malformed metadata (denoise is {meta['denoise']!r}, not true or false)")
    ts, cs = values["timesteps"], values["coeffs"]
    try:
        options = json.loads(meta.get("options") or "{}")
    except ValueError:
        raise LsdError(f"{path} has malformed metadata (options)") from None
    problem = grid_problem(ts, cs, meta["base"], meta["mode"]) or options_problem(meta["base"], options, len(cs))
    if problem:
        raise LsdError(f"{path}: {problem}")
    if len(cs) != steps:
        raise LsdError(f"{path}: metadata says {steps} steps but holds {len(cs)} coefficients")
    return dict(meta), ts, cs


def check_model(meta: dict[str, str], model, path, force: bool = False) -> None:
    """An artifact made for one model fits only that model (a fingerprint mismatch is an error unless
    ``force``); a plain one fits any model its step rule can run on."""
    if "model_fingerprint" in meta:
        if meta["model_fingerprint"] != model.fingerprint and not force:
            raise LsdError(f"{path} was distilled for {meta['model']} ({meta['model_fingerprint']}), not for "
                           f"{model.name} ({model.fingerprint}); pass --force to use it anyway")
        if meta["graph"] != steprules.graph_name(model):
            raise LsdError(f"{path} is for a {meta['graph']} model but {model.name} is {model.graph}")
        params = graph_params(model)
        if "graph_params" in meta and json.loads(meta["graph_params"]) != params:
            raise LsdError(f"{path} is for a {meta['graph']} graph with {meta['graph_params']}, "
                           f"but {model.name}'s has {json.dumps(params, sort_keys=True)}")
    rule = steprules.rule(meta["base"])
    if not rule.supports(model):
        raise LsdError(f"{path} uses the {rule.name} step rule, which needs {rule.requirement()}; {model.name} is {model.graph}")
