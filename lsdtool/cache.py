"""The artifact cache: location, keys, lookup-or-distil, listing (DESIGN §7)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from lsdtool import artifacts, recipes
from lsdtool.errors import LsdError


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """``--cache-dir``, else ``LSD_CACHE_DIR``, else platformdirs' user cache dir for ``lsd``."""
    if explicit:
        return Path(explicit)
    if os.environ.get("LSD_CACHE_DIR"):
        return Path(os.environ["LSD_CACHE_DIR"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("lsd"))


_root = cache_dir  # the functions below take a ``cache_dir`` argument that shadows the name


def key(fingerprint: str, recipe_toml: str) -> str:
    """Hash of (model fingerprint, effective recipe)."""
    return hashlib.sha256(f"{fingerprint}\n{recipe_toml}".encode()).hexdigest()[:16]


def artifact_path(name: str, fingerprint: str, recipe: dict, root: Path) -> Path:
    """<root>/<model>/<model>-<lsd|lsd+>-<steps>-<key>.safetensors"""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    kind = "lsd+" if recipe["plus"] else "lsd"
    return root / safe / f"{safe}-{kind}-{recipe['steps']}-{key(fingerprint, recipes.to_toml(recipe))}.safetensors"


def lookup(model_name: str, overrides: dict | None = None, *, cache_dir=None, recipe_file: str | None = None,
           offline: bool | None = None) -> Path | None:
    """The cached artifact for a model and recipe, found without loading the model (or torch); None on a miss."""
    from lsdtool.models import identify

    name, fingerprint = identify(model_name, offline)
    recipe = recipes.effective(name, recipe_file, overrides)
    path = artifact_path(name, fingerprint, recipe, _root(cache_dir))
    try:
        meta, _, _ = artifacts.read(path)
    except LsdError:
        return None
    return path if meta["model_fingerprint"] == fingerprint else None


def obtain(model, overrides: dict | None = None, *, cache_dir=None, refit: bool = False, device=None,
           quiet: bool = False, recipe_file: str | None = None, world=None):
    """(path, Sampler) of the artifact for ``model`` and the effective recipe, distilling it on a miss
    (with a distributed ``world``, rank 0 fits and writes; the other ranks get (path, None))."""
    recipe = recipes.effective(model.name, recipe_file, overrides)
    path = artifact_path(model.name, model.fingerprint, recipe, _root(cache_dir))
    if path.exists() and not refit:
        try:
            sampler, _ = artifacts.load(path)
            return path, sampler
        except LsdError:
            if not quiet:
                from lsdtool.console import log

                log(f"cached artifact {path} is unreadable; distilling it again")
    from lsdtool import distill

    result = distill.distill(model, recipe, device=device, quiet=quiet, world=world)
    if result is None:
        return path, None
    meta = artifacts.metadata(model, result.sampler, recipe, recipes.to_toml(recipe), result.fit)
    artifacts.save(path, result.sampler, meta)
    return path, result.sampler


def entries(root: Path) -> list[dict]:
    """Every artifact under the cache root with its main metadata; unreadable files are listed as such."""
    rows = []
    for path in sorted(root.rglob("*.safetensors")) if root.exists() else []:
        try:
            sampler, meta = artifacts.load(path)
            rows.append({"path": str(path), "model": meta["model"], "steps": sampler.steps, "plus": meta["plus"] == "true",
                         "base": sampler.base, "mode": sampler.mode, "objective": meta.get("objective", ""),
                         "created": meta["created"], "bytes": path.stat().st_size})
        except LsdError as exc:
            rows.append({"path": str(path), "error": str(exc)})
    return rows
