"""Sampler artifacts: one safetensors file, tensors ``timesteps``/``coeffs`` plus string metadata (DESIGN §7)."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from lsdtool.errors import LsdError
from lsdtool.samplers import Sampler

FORMAT = "lsd.sampler"
FORMAT_VERSION = "1"
REQUIRED = ("format", "format_version", "model", "model_fingerprint", "graph", "noise", "base", "mode",
            "steps", "plus", "teacher_steps", "seed", "recipe", "fit", "lsdtool_version", "created")


def metadata(model, sampler: Sampler, recipe: dict, recipe_toml: str, fit: dict) -> dict[str, str]:
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


def save(path: str | Path, sampler: Sampler, meta: dict[str, str]) -> Path:
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


def load(path: str | Path) -> tuple[Sampler, dict[str, str]]:
    """Read and validate an artifact; every problem is one LsdError naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise LsdError(f"sampler artifact {path} does not exist")
    if path.is_dir():
        raise LsdError(f"sampler artifact {path} is a directory, not a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in ("timesteps", "coeffs") if k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LsdError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    if meta.get("format") != FORMAT:
        raise LsdError(f"{path} is not an lsd sampler artifact (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LsdError(f"{path} has format_version {meta.get('format_version')!r}; this lsd reads {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in meta] + [k for k in ("timesteps", "coeffs") if k not in tensors]
    if missing:
        raise LsdError(f"{path} lacks {', '.join(missing)}")
    try:
        json.loads(meta["fit"])
        steps = int(meta["steps"])
    except ValueError:
        raise LsdError(f"{path} has malformed metadata (steps or fit)") from None
    sampler = Sampler(tensors["timesteps"].double(), tensors["coeffs"].double(), meta["base"], meta["mode"],
                      meta.get("denoise") == "true", meta=dict(meta))
    try:
        sampler.check()
    except ValueError as exc:
        raise LsdError(f"{path}: {exc}") from None
    if sampler.steps != steps:
        raise LsdError(f"{path}: metadata says {steps} steps but holds {sampler.steps} coefficients")
    return sampler, meta


def check_model(meta: dict[str, str], model, path, force: bool = False) -> None:
    """An artifact is for one model: a fingerprint mismatch is an error unless ``force``."""
    if meta["model_fingerprint"] != model.fingerprint and not force:
        raise LsdError(f"{path} was distilled for {meta['model']} ({meta['model_fingerprint']}), not for "
                       f"{model.name} ({model.fingerprint}); pass --force to use it anyway")
    if meta["graph"] != model.graph:
        raise LsdError(f"{path} is for a {meta['graph']} model but {model.name} is {model.graph}")
