"""Finding a checkpoint and naming it without loading it (and without importing torch).

A model is a directory holding ``config.json`` and one weight file (``model.safetensors`` or
``pytorch_model.bin``); hub ids resolve through the Hugging Face cache. The fingerprint is the hub
revision, or a digest of the weight file (remembered per path, size and mtime so a repeated
command does not hash a large file again).

tauLDR image models (DESIGN §12) come in two layouts instead: the authors' published folder
(``config_001.yaml`` or ``config.yaml`` beside ``ckpt_*.pt``) and a training run
(``config/config_NNN.yaml``, ``checkpoints/ckpt_*.pt``); the newest config and checkpoint are used
unless a checkpoint file is named.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lsdtool import fileio
from lsdtool.errors import LsdError
from lsdtool.locations import cache_root
from lsdtool.models.families import BY_NAME, CONFIG_FILES, WEIGHT_FILES, Family, recognise
from lsdtool.models.registry import DOWNLOAD_ONLY, REGISTRY
# Models shipped inside the package, one directory per registry name (countdown, countdown-net).
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Located:
    name: str  # short name (registry name, hub id or directory name)
    config_path: Path
    weight_path: Path | None  # None for a code-defined family (no weight file); a tauLDR ckpt_*.pt
    fingerprint: str
    family: Family
    config: dict


class UnknownModel(LsdError):
    """A name that is no registry name, hub id, directory, MODULE:FACTORY or registered model."""


def unknown(name: str) -> UnknownModel:
    return UnknownModel(f"unknown model {name!r}: use one of {', '.join(REGISTRY)}, a hub id (owner/name), "
                        "a local directory, MODULE:FACTORY or a name given to lsdtool.models.register")


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache() -> str:
    """The hub cache directory as huggingface_hub would pick it now (HF_HUB_CACHE, HF_HOME/hub, default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or os.path.exists(s) or (os.sep in s and not HUB_ID.fullmatch(s))


def _not_cached(repo_id: str) -> LsdError:
    return LsdError(f"{repo_id} is not in the Hugging Face cache ({_hub_cache()}); run `hf download {repo_id}` "
                    "on a machine with network access, or pass a local directory")


class _NotCached(Exception):
    """The file is neither in the cache nor fetchable now (offline or hub unreachable)."""


def _hub_file(repo_id: str, filename: str, offline: bool) -> str | None:
    """Path of one file of a hub repo, downloading it unless offline; None if the repo lacks it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(repo_id, filename, cache_dir=_hub_cache(), local_files_only=offline)
    except LocalEntryNotFoundError:
        raise _NotCached from None
    except EntryNotFoundError:
        return None
    except RepositoryNotFoundError:
        raise LsdError(f"{repo_id} is not a model repository on the Hugging Face hub (or it is private)") from None
    except Exception as e:  # network and HTTP failures
        raise LsdError(f"cannot fetch {repo_id} from the Hugging Face hub ({first_line(e)}); "
                       f"run `hf download {repo_id}` on a machine with network access, or pass a local directory"
                       ) from None


def _hub_config(repo_id: str, offline: bool) -> Path:
    """The config file of a hub repo (the first of :data:`CONFIG_FILES` it has), from the cache or the hub."""
    for fn in CONFIG_FILES:
        try:
            config = _hub_file(repo_id, fn, offline)
        except _NotCached:
            raise _not_cached(repo_id) from None
        if config is not None:
            return Path(config)
    raise LsdError(f"hub repository {repo_id} has no {' or '.join(CONFIG_FILES)}")


def _hub_weights(repo_id: str, family: Family, offline: bool) -> Path | None:
    """The family's weight file in a hub repo, from the cache or (unless offline) the hub."""
    uncached = False
    for fn in family.weight_files:
        try:
            weights = _hub_file(repo_id, fn, offline)
        except _NotCached:
            uncached = True
            continue
        if weights is not None:
            return Path(weights)
    if uncached:
        raise _not_cached(repo_id)
    if family.weight_files:
        raise LsdError(f"hub repository {repo_id} holds neither {' nor '.join(family.weight_files)}")
    return None


def cached_locally(hub_id: str) -> bool:
    """Whether config and weights of ``hub_id`` are in the Hugging Face cache now (no network)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(fn):
        return isinstance(try_to_load_from_cache(hub_id, fn, cache_dir=_hub_cache()), str)

    return cached("config.json") and any(cached(fn) for fn in WEIGHT_FILES)


def _local_config(directory: Path) -> Path:
    for fn in CONFIG_FILES:
        if (directory / fn).is_file():
            return directory / fn
    raise LsdError(f"model directory {directory} has no {' or '.join(CONFIG_FILES)}")


def _local_weights(directory: Path, family: Family) -> Path | None:
    for fn in family.weight_files:
        if (directory / fn).is_file():
            return directory / fn
    if family.weight_files:
        raise LsdError(f"model directory {directory} holds neither {' nor '.join(family.weight_files)}")
    return None


def first_line(e: Exception) -> str:
    """The gist of an exception message: its first line, up to the first full stop."""
    lines = str(e).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(e).__name__


def read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LsdError(f"cannot read {path}: {first_line(e)}") from None
    if isinstance(config, dict) and set(config) == {"config"} and isinstance(config["config"], dict):
        config = config["config"]  # PyTorchModelHubMixin's wrapping
    if not isinstance(config, dict):
        raise LsdError(f"{path} does not hold a JSON object")
    return config


def family_name(config: dict, path: Path) -> str:
    """The name of the family (:data:`families.FAMILIES`) whose config ``config`` is."""
    return recognise(config, path).name


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def weight_digest(path: Path) -> str:
    """file_digest, remembered in the lsd cache per (path, size, mtime)."""
    st = path.stat()
    memo_path = cache_root() / "digests.json"
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if ident not in memo:
        memo[ident] = file_digest(path)
        try:
            fileio.write_text(memo_path, json.dumps(memo))
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
    return memo[ident]


def locate(name_or_path: str, offline: bool | None = None) -> Located:
    """Resolve a registry name, hub id or local directory to its config, family, weights, name and fingerprint."""
    offline = _env_offline() if offline is None else bool(offline)
    hub_id = None
    if name_or_path in REGISTRY:
        hub_id, name = REGISTRY[name_or_path], name_or_path
        directory = EMBEDDED_DIR / name_or_path
        if hub_id is None and not directory.is_dir():
            raise LsdError(f"{name_or_path} is an embedded model but {directory} is missing: reinstall lsdtool")
    elif os.path.isdir(os.path.expanduser(name_or_path)):
        directory = Path(os.path.expanduser(name_or_path))
        name = directory.resolve().name
    elif _looks_like_path(name_or_path):
        what = "is not a directory" if os.path.exists(os.path.expanduser(name_or_path)) else "does not exist"
        raise LsdError(f"model directory {name_or_path} {what}")
    elif HUB_ID.fullmatch(name_or_path):
        hub_id = name_or_path
        name = next((k for k, v in REGISTRY.items() if v == hub_id), hub_id)
    elif name_or_path in DOWNLOAD_ONLY:
        raise LsdError(f"{name_or_path} is {DOWNLOAD_ONLY[name_or_path]}")
    else:
        raise unknown(name_or_path)
    config_path = _hub_config(hub_id, offline) if hub_id else _local_config(directory)
    config = read_config(config_path)
    family = recognise(config, config_path)
    weight_path = _hub_weights(hub_id, family, offline) if hub_id else _local_weights(directory, family)
    if family.fingerprint is not None:  # code-defined: the code's version is the identity
        fingerprint = family.fingerprint
    elif hub_id:
        fingerprint = f"hub:{hub_id}@{weight_path.parent.name}"
    else:
        fingerprint = f"{family.name}:sha256:{weight_digest(weight_path)}"
    return Located(name, config_path, weight_path, fingerprint, family, config)


# --- tauLDR checkpoints: a yaml config beside ckpt_*.pt, or a training run's config/ and checkpoints/ ---------


def _newest(directory: Path, pattern: str) -> Path | None:
    found = sorted(p for p in directory.glob(pattern) if p.is_file())
    return found[-1] if found else None  # names are zero-padded counters (ckpt_0001999999.pt, config_002.yaml)


def _config_in(directory: Path) -> Path | None:
    for d in (directory, directory / "config"):
        found = _newest(d, "config_*.yaml") or (d / "config.yaml" if (d / "config.yaml").is_file() else None)
        if found is not None:
            return found
    return None


CHECKPOINT_SUFFIXES = (".pt", ".safetensors")  # tauLDR's pickle; the EMA weights alone as safetensors (ours)


def _checkpoint_in(directory: Path) -> Path | None:
    for d in (directory, directory / "checkpoints"):
        found = sorted(p for s in CHECKPOINT_SUFFIXES for p in d.glob(f"ckpt_*{s}") if p.is_file())
        if found:
            return found[-1]
    return None


def find_tauldr(path: str) -> tuple[Path, Path] | None:
    """(config, checkpoint) when ``path`` is a tauLDR folder or a checkpoint file beside its config, else None."""
    if REGISTRY.get(path, "") is None and (EMBEDDED_DIR / path / "config.yaml").is_file():
        path = str(EMBEDDED_DIR / path)  # an embedded tauLDR model (digits-net)
    p = Path(path).expanduser()
    if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES:
        config = _config_in(p.parent) or _config_in(p.parent.parent)
        return (config, p) if config is not None else None
    if not p.is_dir():
        return None
    config, ckpt = _config_in(p), _checkpoint_in(p)
    return (config, ckpt) if config is not None and ckpt is not None else None


def locate_tauldr(path: str) -> Located:
    """The files, name and fingerprint of a tauLDR checkpoint at ``path``; LsdError if there is none."""
    found = find_tauldr(path)
    if found is None:
        raise LsdError(f"{path} holds no tauLDR checkpoint (a config yaml with ckpt_*.pt or ckpt_*.safetensors, or config/ and checkpoints/)")
    config, ckpt = found
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return Located(run.resolve().name, config, ckpt, f"tauldr:sha256:{weight_digest(ckpt)}", BY_NAME["tauldr"], {})



def identify(name_or_path: str, offline: bool | None = None) -> tuple[str, str]:
    """(name, fingerprint) of a model without loading it or importing torch."""
    if find_tauldr(name_or_path) is not None:
        found = locate_tauldr(name_or_path)
        return found.name, found.fingerprint
    found = locate(name_or_path, offline)
    return found.name, found.fingerprint


def availability(name: str) -> tuple[str, bool]:
    """(source, usable offline now) for a registry name (or a DOWNLOAD_ONLY one: how to get it, False)."""
    if name in DOWNLOAD_ONLY:
        return DOWNLOAD_ONLY[name], False
    hub_id = REGISTRY[name]
    if hub_id is None:
        return "embedded", True
    return hub_id, cached_locally(hub_id)
