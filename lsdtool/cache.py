"""The artifact cache: location, keys, lookup-or-distil, listing (DESIGN §7)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from lsdtool import artifacts, fileio, recipes
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
           quiet: bool = False, recipe_file: str | None = None):
    """(path, Sampler) of the artifact for ``model`` and the effective recipe, distilling it on a miss."""
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

    result = distill.distill(model, recipe, device=device, quiet=quiet)
    meta = artifacts.metadata(model, result.sampler, recipe, recipes.to_toml(recipe), result.fit)
    artifacts.save(path, result.sampler, meta)
    return path, result.sampler


def entries(root: Path) -> list[dict]:
    """Every artifact under the cache root with its main metadata; unreadable files are listed as such,
    and so are temp files (``"temp": true``), with ``"stale": true`` where no process is writing them
    any more (an interrupted write: :func:`prune` removes those)."""
    rows = []
    for path in sorted(root.rglob("*.safetensors")) if root.exists() else []:
        try:
            meta, _, cs = artifacts.read(path)
            rows.append({"path": str(path), "model": meta["model"], "steps": len(cs), "plus": meta["plus"] == "true",
                         "base": meta["base"], "mode": meta["mode"], "objective": meta.get("objective", ""),
                         "created": meta["created"], "bytes": path.stat().st_size})
        except LsdError as exc:
            rows.append({"path": str(path), "error": str(exc)})
    for path in temp_files(root):
        rows.append({"path": str(path), "temp": True, "stale": not fileio.in_use(path), "bytes": path.stat().st_size})
    return rows


def temp_files(root: Path) -> list[Path]:
    """Temp files under the cache root (see :func:`lsdtool.fileio.is_temp`), stale or still being written."""
    return sorted(p for p in root.rglob(f"*{fileio.TEMP_SUFFIX}") if fileio.is_temp(p)) if root.exists() else []


def prune(root: Path) -> list[Path]:
    """Remove the temp files under the cache root that no running lsd is still writing; the removed paths."""
    return [p for p in temp_files(root) if fileio.remove_if_stale(p)]
