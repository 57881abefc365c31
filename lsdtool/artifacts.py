"""Sampler artifacts: one safetensors file, tensors ``timesteps``/``coeffs`` plus string metadata (DESIGN §7)."""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from lsdtool.errors import LsdError

FORMAT = "lsd.sampler"
FORMAT_VERSION = "1"
REQUIRED = ("format", "format_version", "model", "model_fingerprint", "graph", "noise", "base", "mode",
            "steps", "plus", "teacher_steps", "seed", "recipe", "fit", "lsdtool_version", "created")


def metadata(model, sampler, recipe: dict, recipe_toml: str, fit: dict) -> dict[str, str]:
    """The metadata block of an artifact distilled for ``model`` with the effective ``recipe``."""
    from lsdtool import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.name,
        "model_fingerprint": model.fingerprint,
        "model_source": getattr(model, "source", model.name),
        "graph": model.graph,
        "noise": model.noise.describe(),
        "base": sampler.base,
        "mode": sampler.mode,
        "options": json.dumps(sampler.options, sort_keys=True),
        "steps": str(sampler.steps),
        "plus": "true" if recipe.get("plus") else "false",
        "objective": str(recipe.get("objective", "")),
        "teacher_steps": str(recipe.get("teacher_steps", "")),
        "seed": str(recipe.get("seed", "")),
        "recipe": recipe_toml,
        "fit": json.dumps(fit, sort_keys=True),
        "lsdtool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save(path: str | Path, sampler, meta: dict[str, str]) -> Path:
    """Write atomically: a temp file in the same directory, fsync, then ``os.replace``."""
    from safetensors.torch import save_file

    sampler.check()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"timesteps": sampler.timesteps.detach().double().cpu().contiguous(),
               "coeffs": sampler.coeffs.detach().double().cpu().contiguous()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(path: str | Path) -> tuple[dict[str, str], list[float], list[float]]:
    """Metadata, timesteps and coeffs of an artifact, read and validated in pure Python (no torch):
    a cache hit is answered from this alone. Every problem is one LsdError naming the file."""
    path = Path(path)
    if not path.exists():
        raise LsdError(f"sampler artifact {path} does not exist")
    if path.is_dir():
        raise LsdError(f"sampler artifact {path} is a directory, not a .safetensors file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LsdError(f"cannot read sampler artifact {path} ({exc.strerror})") from None
    try:
        (size,) = struct.unpack("<Q", raw[:8])
        if size > len(raw) - 8:
            raise ValueError("header runs past the end of the file")
        header = json.loads(raw[8 : 8 + size])
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise LsdError(f"{path} is not a readable safetensors file ({exc})") from None
    meta = header.pop("__metadata__", None) or {}
    if meta.get("format") != FORMAT:
        raise LsdError(f"{path} is not an lsd sampler artifact (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LsdError(f"{path} has format_version {meta.get('format_version')!r}; this lsd reads {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in meta] + [k for k in ("timesteps", "coeffs") if k not in header]
    if missing:
        raise LsdError(f"{path} lacks {', '.join(missing)}")
    values = {}
    for name in ("timesteps", "coeffs"):
        entry = header[name]
        try:
            begin, end = entry["data_offsets"]
            (n,) = entry["shape"]
            ok = entry["dtype"] == "F64" and end - begin == 8 * n and 8 + size + end <= len(raw)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise LsdError(f"{path}: tensor {name} is not a float64 vector inside the file")
        values[name] = list(struct.unpack(f"<{n}d", raw[8 + size + begin : 8 + size + end]))
    try:
        json.loads(meta["fit"])
        steps = int(meta["steps"])
    except ValueError:
        raise LsdError(f"{path} has malformed metadata (steps or fit)") from None
    ts, cs = values["timesteps"], values["coeffs"]
    try:
        options = json.loads(meta.get("options") or "{}")
    except ValueError:
        raise LsdError(f"{path} has malformed metadata (options)") from None
    problem = grid_problem(ts, cs, meta["base"], meta["mode"], BASES) or options_problem(meta["base"], options)
    if problem:
        raise LsdError(f"{path}: {problem}")
    if len(cs) != steps:
        raise LsdError(f"{path}: metadata says {steps} steps but holds {len(cs)} coefficients")
    return dict(meta), ts, cs


def load(path: str | Path):
    """(Sampler, metadata) of a validated artifact."""
    import torch

    from lsdtool.samplers import Sampler

    meta, ts, cs = read(path)
    sampler = Sampler(torch.tensor(ts, dtype=torch.float64), torch.tensor(cs, dtype=torch.float64), meta["base"],
                      meta["mode"], meta.get("denoise") == "true", meta=meta, options=json.loads(meta.get("options") or "{}"))
    return sampler, meta


BASES = ("euler", "tweedie", "count", "theta-trapezoidal", "confidence", "entropy-bound")
# the options of each step rule (lsdtool.adaptive): name -> allowed values (a tuple) or a check of a number
OPTIONS = {
    "confidence": {"temperature": lambda v: v > 0, "score": ("probability", "margin")},
    "entropy-bound": {"temperature": lambda v: v > 0, "gamma": lambda v: v >= 0},
}


def options_problem(base: str, options, denoise: bool = False) -> str | None:
    """What is wrong with a rule's options (a dict), or None."""
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
    if denoise and base in OPTIONS:
        return f"the {base} rule fills every mask itself and takes no denoise step"
    return None


def grid_problem(ts: list[float], cs: list[float], base: str, mode: str, bases=("euler", "tweedie")) -> str | None:
    """What is wrong with a sampler grid and its coefficients, or None (shared with Sampler.check)."""
    if base not in bases:
        return f"unknown base {base!r} (expected one of {', '.join(bases)})"
    if mode not in ("score", "temperature"):
        return f"unknown mode {mode!r} (expected score or temperature)"
    if len(cs) < 1 or len(ts) != len(cs) + 1:
        return f"timesteps ({len(ts)}) and coeffs ({len(cs)}) do not match (need M+1 and M, M >= 1)"
    if not all(math.isfinite(v) for v in ts + cs):
        return "timesteps or coeffs contain NaN or inf"
    if not all(b < a for a, b in zip(ts, ts[1:])):
        return "timesteps are not strictly decreasing"
    if ts[-1] <= 0 or ts[0] > 1:
        return f"timesteps must lie in (0, 1], got {ts[0]:g} .. {ts[-1]:g}"
    if mode == "score" and not all(c > 0 for c in cs):
        return "score-mode coefficients must be positive"
    return None


def check_model(meta: dict[str, str], model, path, force: bool = False) -> None:
    """An artifact is for one model: a fingerprint mismatch is an error unless ``force``."""
    if meta["model_fingerprint"] != model.fingerprint and not force:
        raise LsdError(f"{path} was distilled for {meta['model']} ({meta['model_fingerprint']}), not for "
                       f"{model.name} ({model.fingerprint}); pass --force to use it anyway")
    if meta["graph"] != model.graph:
        raise LsdError(f"{path} is for a {meta['graph']} model but {model.name} is {model.graph}")
