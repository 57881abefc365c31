"""The one cache (DESIGN §7): distilled artifacts, Jump-Your-Steps grids and compare's teacher rows.

Everything lives under the cache root (:func:`lsdtool.locations.cache_root`) and is written through
:mod:`lsdtool.fileio`. Keys are hashes of what an entry depends on, so a changed input is a miss.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from lsdtool import artifacts, fileio, recipes, rollouts, steprules
from lsdtool.errors import LsdError
from lsdtool.locations import cache_root


def key(fingerprint: str, recipe_toml: str) -> str:
    """Hash of (model fingerprint, effective recipe)."""
    return hashlib.sha256(f"{fingerprint}\n{recipe_toml}".encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def artifact_path(name: str, fingerprint: str, recipe: dict, root: Path) -> Path:
    """<root>/<model>/<model>-<lsd|lsd+>-<steps>-<key>.safetensors"""
    safe = _safe(name)
    kind = "lsd+" if recipe["plus"] else "lsd"
    return root / safe / f"{safe}-{kind}-{recipe['steps']}-{key(fingerprint, recipes.to_toml(recipe))}.safetensors"


def jys_path(model_name: str, settings: dict, steps: int, root: Path) -> Path:
    """<root>/jys/<model>-jys-<steps>-<hash of the search settings>.safetensors"""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return root / "jys" / f"{_safe(model_name)}-jys-{steps}-{digest}.safetensors"


def lookup(model_name: str, overrides: dict | None = None, *, cache_dir=None, recipe_file: str | None = None,
           offline: bool | None = None) -> Path | None:
    """The cached artifact for a model and recipe, found without loading the model (or torch); None on a miss,
    and for your own models (:mod:`lsdtool.models.own`), known only once built: :func:`load_or_distill` finds theirs."""
    from lsdtool.models import own
    from lsdtool.models.dllm import identify

    if own.is_own(model_name):
        return None
    name, fingerprint = identify(model_name, offline)
    recipe = recipes.effective(name, recipe_file, overrides)
    path = artifact_path(name, fingerprint, recipe, cache_root(cache_dir))
    try:
        meta, _, _ = artifacts.read(path)
    except LsdError:
        return None
    return path if meta["model_fingerprint"] == fingerprint else None


def load_or_distill(model, overrides: dict | None = None, *, cache_dir=None, refit: bool = False, device=None,
                    recipe_file: str | None = None, recipe: dict | None = None, log=None, world=None):
    """The cached :class:`~lsdtool.samplers.Sampler` for ``model`` and the effective recipe (defaults <- shipped
    recipe or ``recipe_file`` <- ``overrides``), distilled and cached on a miss; its ``path`` is the artifact.
    ``recipe`` (a dict of recipe keys) takes the place of a recipe file. ``log`` gets one-line notes.
    With a distributed ``world`` (:mod:`lsdtool.distributed`) rank 0 fits and writes; the other ranks get None."""
    from lsdtool import distillation
    from lsdtool.samplers import Sampler

    if recipe is not None:
        overrides = {**recipes.validate(recipe, "recipe"), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    effective = recipes.effective(model.name, recipe_file, overrides, graph=steprules.graph_name(model))
    path = artifact_path(model.name, model.fingerprint, effective, cache_root(cache_dir))
    if path.exists() and not refit:
        try:
            sampler = Sampler.load(path)
            if log is not None:
                log(f"cache hit: {path}")
            return sampler
        except LsdError:
            if log is not None:
                log(f"cached artifact {path} is unreadable; distilling it again")
    store = rollouts.Store(cache_root(cache_dir) / "rollouts", _safe(model.name)) if world is None else None
    result = distillation.distill(model, effective, device=device, world=world, rollouts=store)
    if result is None:
        return None
    if store is not None:
        rollouts.save_last()
    artifacts.save(path, result.sampler, artifacts.metadata(model, result.sampler, effective, recipes.to_toml(effective),
                                                            result.fit))
    return Sampler.load(path)


def entries(root: Path) -> list[dict]:
    """Every artifact under the cache root with its main metadata; unreadable files are listed as such,
    and so are temp files (``"temp": true``), with ``"stale": true`` where no process is writing them
    any more (an interrupted write: :func:`prune` removes those)."""
    rows = []
    for path in sorted(root.rglob("*.safetensors")) if root.exists() else []:
        try:
            meta, _, cs = artifacts.read(path)
            rows.append({"path": str(path), "model": meta.get("model", ""), "steps": len(cs),
                         "plus": meta.get("plus") == "true", "base": meta["base"], "mode": meta["mode"],
                         "objective": meta.get("objective", ""), "created": meta["created"],
                         "bytes": path.stat().st_size})
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


def remove(paths, root: Path, remove_all: bool = False) -> list[Path]:
    """Delete cached artifacts (``paths``, or every one with ``remove_all``), all checked before any is removed:
    each must be a file inside the cache ``root``; ``remove_all`` also prunes stale temp files. Returns the removed paths."""
    root = Path(root).resolve()
    pruned = prune(root) if remove_all else []
    targets = sorted(root.rglob("*.safetensors")) if remove_all else [Path(p) for p in paths]
    for p in targets:
        if root not in p.resolve().parents:
            raise LsdError(f"{p} is not inside the cache {root}")
        if not p.is_file():
            raise LsdError(f"{p} is not a cached artifact")
    for p in targets:
        p.unlink()
    return pruned + targets


def record_path(folder: str, stem: str, key_src: dict, root: Path) -> Path:
    """<root>/<folder>/<stem>-<hash of key_src>.json: where a JSON result keyed by ``key_src`` is kept."""
    digest = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    return root / folder / f"{stem}-{digest}.json"


def read_record(path: Path, key_src: dict) -> dict | None:
    """The JSON fields stored at ``path`` for exactly ``key_src`` (without the key), or None."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != key_src:
        return None
    return {k: v for k, v in saved.items() if k != "key"}


def write_record(path: Path, key_src: dict, fields: dict) -> None:
    """Keep ``fields`` for ``key_src`` (a read-only cache only costs the next run the work)."""
    try:
        fileio.write_text(path, json.dumps({"key": key_src, **fields}))
    except OSError:
        pass
