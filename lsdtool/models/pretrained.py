"""Checkpoint-backed adapters: the shared adapter base, and loading from the hub cache or a local directory.

A model is a directory holding ``config.json`` and one weight file (``model.safetensors`` or
``pytorch_model.bin``). Hub ids resolve through the Hugging Face cache, never running remote code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch

from lsdtool.errors import LsdError
from lsdtool.models.base import DiffusionModel
from lsdtool.models.ddit import freeze, load_weights

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
GPT2_TOKENS = 50257
MASK_TEXT, UNKNOWN_TEXT = "[MASK]", "[UNK]"

_tokenizer_state: dict = {}


def gpt2_tokenizer():
    """The GPT-2 tokenizer from the Hugging Face cache, loaded once; None (said once on stderr) if absent."""
    if "tokenizer" not in _tokenizer_state:
        try:
            from transformers import AutoTokenizer

            _tokenizer_state["tokenizer"] = AutoTokenizer.from_pretrained("gpt2", local_files_only=True)
        except Exception:
            _tokenizer_state["tokenizer"] = None
            print("lsd: the GPT-2 tokenizer is not in the Hugging Face cache; emitting token ids instead of text",
                  file=sys.stderr)
    return _tokenizer_state["tokenizer"]


class PretrainedModel(DiffusionModel):
    """An adapter around a frozen torch network ``net``; text through GPT-2 when the vocabulary is GPT-2's."""

    family: str
    weight_prefix = ""  # stripped from checkpoint keys before loading

    def __init__(self, net: torch.nn.Module, *, name: str, fingerprint: str, graph: str, vocab_size: int,
                 seq_len: int, noise):
        self.net = net
        self.name, self.fingerprint = name, fingerprint
        self.graph, self.vocab_size, self.seq_len, self.noise = graph, int(vocab_size), int(seq_len), noise
        self.device = torch.device("cpu")

    def to(self, device) -> "PretrainedModel":
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def sigma_bar(self, t, batch: int) -> torch.Tensor:
        """Total noise (B,) at t given as a scalar, (B,) or (B, 1); differentiable in t."""
        t = torch.as_tensor(t, device=self.device)
        t = t if t.is_floating_point() else t.float()
        return self.noise.total(t.reshape(-1).expand(batch))

    @property
    def n_tokens(self) -> int:
        """Number of real tokens (the mask excluded)."""
        return self.vocab_size - (self.graph == "absorb")

    def _tokenizer(self):
        return gpt2_tokenizer() if self.n_tokens == GPT2_TOKENS else None

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer() is not None

    def decode(self, tokens) -> str | None:
        """Text of one sample; the mask and ids GPT-2 lacks show as placeholders."""
        tok = self._tokenizer()
        if tok is None:
            return None
        parts, run = [], []
        for v in (int(v) for v in tokens):
            if 0 <= v < GPT2_TOKENS:
                run.append(v)
                continue
            if run:
                parts.append(tok.decode(run))
                run = []
            parts.append(MASK_TEXT if v == self.mask_id else UNKNOWN_TEXT)
        if run:
            parts.append(tok.decode(run))
        return "".join(parts)

    def encode(self, text: str) -> list[int]:
        tok = self._tokenizer()
        if tok is None:
            raise ValueError(f"model {self.name} has no GPT-2 tokenizer available to encode text with")
        return list(tok.encode(text))


# --- locating a checkpoint ---------------------------------------------------------------------


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
        raise LsdError(f"cannot fetch {repo_id} from the Hugging Face hub ({_first_line(e)}); "
                       f"run `hf download {repo_id}` on a machine with network access, or pass a local directory"
                       ) from None


def _hub_files(repo_id: str, offline: bool) -> tuple[Path, Path]:
    """(config.json, weight file) of a hub repo, from the cache or (unless offline) the hub."""
    try:
        config = _hub_file(repo_id, "config.json", offline)
    except _NotCached:
        raise _not_cached(repo_id) from None
    if config is None:
        raise LsdError(f"hub repository {repo_id} has no config.json")
    uncached = False
    for fn in WEIGHT_FILES:
        try:
            weights = _hub_file(repo_id, fn, offline)
        except _NotCached:
            uncached = True
            continue
        if weights is not None:
            return Path(config), Path(weights)
    if uncached:
        raise _not_cached(repo_id)
    raise LsdError(f"hub repository {repo_id} holds neither {' nor '.join(WEIGHT_FILES)}")


def cached_locally(hub_id: str) -> bool:
    """Whether config and weights of ``hub_id`` are in the Hugging Face cache now (no network)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(fn):
        return isinstance(try_to_load_from_cache(hub_id, fn, cache_dir=_hub_cache()), str)

    return cached("config.json") and any(cached(fn) for fn in WEIGHT_FILES)


def _local_files(directory: Path) -> tuple[Path, Path]:
    config = directory / "config.json"
    if not config.is_file():
        raise LsdError(f"model directory {directory} has no config.json")
    for fn in WEIGHT_FILES:
        if (directory / fn).is_file():
            return config, directory / fn
    raise LsdError(f"model directory {directory} holds neither {' nor '.join(WEIGHT_FILES)}")


# --- reading a checkpoint ----------------------------------------------------------------------


def _first_line(e: Exception) -> str:
    """The gist of an exception message: its first line, up to the first full stop."""
    lines = str(e).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(e).__name__


def read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LsdError(f"cannot read {path}: {_first_line(e)}") from None
    if isinstance(config, dict) and set(config) == {"config"} and isinstance(config["config"], dict):
        config = config["config"]  # PyTorchModelHubMixin's wrapping
    if not isinstance(config, dict):
        raise LsdError(f"{path} does not hold a JSON object")
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from safetensors or a weights-only torch pickle; LsdError naming the file otherwise."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LsdError(f"cannot load {path}: truncated, corrupt or not only tensors ({_first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise LsdError(f"{path} does not hold a flat dictionary of named tensors")
    return state


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def family_of(config: dict, path: Path) -> type[PretrainedModel]:
    """The adapter class for a config: MDLM (HF-style), SEDD (has a graph), RADD (tokens + model, no graph)."""
    from lsdtool.models.mdlm import MDLM
    from lsdtool.models.radd import RADD
    from lsdtool.models.sedd import SEDD

    if config.get("model_type") == "mdlm" or "model_length" in config:
        return MDLM
    if "graph" in config:
        return SEDD
    if "tokens" in config and "model" in config:
        return RADD
    raise LsdError(f"{path} is not a SEDD, RADD or MDLM config")


# --- loading -----------------------------------------------------------------------------------


def load_pretrained(name_or_path: str, offline: bool | None = None) -> DiffusionModel:
    """A SEDD, RADD or MDLM adapter from a registry short name, a hub id or a local directory (on CPU)."""
    from lsdtool.models import REGISTRY

    offline = _env_offline() if offline is None else bool(offline)
    hub_id = None
    if name_or_path in REGISTRY:
        hub_id, name = REGISTRY[name_or_path], name_or_path
        if hub_id is None:
            raise LsdError(f"{name_or_path} is an embedded model, not a checkpoint")
    elif os.path.isdir(os.path.expanduser(name_or_path)):
        directory = Path(os.path.expanduser(name_or_path))
        name = directory.resolve().name
    elif _looks_like_path(name_or_path):
        what = "is not a directory" if os.path.exists(os.path.expanduser(name_or_path)) else "does not exist"
        raise LsdError(f"model directory {name_or_path} {what}")
    elif HUB_ID.fullmatch(name_or_path):
        hub_id = name_or_path
        name = next((k for k, v in REGISTRY.items() if v == hub_id), hub_id)
    else:
        raise LsdError(f"unknown model {name_or_path!r}: use a registry name, a hub id (owner/name) or a directory")

    config_path, weight_path = _hub_files(hub_id, offline) if hub_id else _local_files(directory)
    config = read_config(config_path)
    cls = family_of(config, config_path)
    if hub_id:
        fingerprint = f"hub:{hub_id}@{weight_path.parent.name}"
    else:
        fingerprint = f"{cls.family}:sha256:{file_digest(weight_path)}"
    with torch.device("meta"):  # parameters are assigned from the checkpoint, never initialised
        try:
            model = cls(config, name=name, fingerprint=fingerprint)
        except (KeyError, TypeError, ValueError) as e:
            why = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else _first_line(e)
            raise LsdError(f"{config_path} is not a valid {cls.family.upper()} config: {why}") from None
    state = read_weights(weight_path)
    prefix = cls.weight_prefix
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    load_weights(model.net, state, str(weight_path))
    freeze(model.net)
    return model
