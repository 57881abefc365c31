"""Sampler artifacts: one safetensors file, tensors ``timesteps``/``coeffs`` plus string metadata (DESIGN §7)."""

from __future__ import annotations

import json
import math
import os
import struct
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
    """Write atomically through :func:`lsdtool.fileio.write_bytes` (a full disk is an OSError naming ``path``)."""
    from safetensors.torch import save

    from lsdtool import fileio

    sampler.check()
    tensors = {"timesteps": sampler.timesteps.detach().double().cpu().contiguous(),
               "coeffs": sampler.coeffs.detach().double().cpu().contiguous()}
    return fileio.write_bytes(path, save(tensors, metadata={k: str(v) for k, v in meta.items()}))


MAX_HEADER = 1 << 24  # bytes; an artifact's header (metadata, recipe, fit record) is a few KiB
PHI_RANGE = (1e-3, 1e3)  # sane coefficients: the untrained Phi is 1 and a fit moves it by far less than 1000x


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
    from lsdtool.errors import describe

    path = Path(path)
    if not path.exists():
        raise LsdError(f"sampler artifact {path} does not exist")
    if path.is_dir():
        raise LsdError(f"sampler artifact {path} is a directory, not a .safetensors file")
    try:
        header, values = _read_parts(path)
    except OSError as exc:
        raise LsdError(f"cannot read sampler artifact {path} ({describe(exc)})") from None
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise LsdError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise LsdError(f"{path} is not an lsd sampler artifact (its metadata is not an object)")
    if meta.get("format") != FORMAT:
        raise LsdError(f"{path} is not an lsd sampler artifact (format {str(meta.get('format'))[:40]!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LsdError(f"{path} has format_version {str(meta.get('format_version'))[:40]!r}; this lsd reads {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in meta] + [k for k in ("timesteps", "coeffs") if k not in values]
    if missing:
        raise LsdError(f"{path} lacks {', '.join(missing)}")
    try:
        json.loads(meta["fit"])
        steps = int(meta["steps"])
    except (TypeError, ValueError):
        raise LsdError(f"{path} has malformed metadata (steps or fit)") from None
    ts, cs = values["timesteps"], values["coeffs"]
    problem = grid_problem(ts, cs, meta["base"], meta["mode"])
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
                      meta["mode"], meta.get("denoise") == "true", meta=meta)
    return sampler, meta


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
    if abs(ts[0] - 1) > 1e-9:
        return f"the grid must start at tau_0 = 1 (pure noise), got {ts[0]:g}"
    if mode == "score" and not all(c > 0 for c in cs):
        return "score-mode coefficients must be positive"
    low, high = PHI_RANGE
    outside = [c for c in cs if not low <= c <= high]
    if outside:
        return f"coefficient Phi = {outside[0]:g} lies outside the sane range [{low:g}, {high:g}]"
    return None


def check_model(meta: dict[str, str], model, path, force: bool = False) -> None:
    """An artifact is for one model: a fingerprint mismatch is an error unless ``force``."""
    if meta["model_fingerprint"] != model.fingerprint and not force:
        raise LsdError(f"{path} was distilled for {meta['model']} ({meta['model_fingerprint']}), not for "
                       f"{model.name} ({model.fingerprint}); pass --force to use it anyway")
    if meta["graph"] != model.graph:
        raise LsdError(f"{path} is for a {meta['graph']} model but {model.name} is {model.graph}")
