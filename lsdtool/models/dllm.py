"""Masked diffusion language models through transformers: LLaDA, LLaDA-MoE, Dream, LLaDA2 (DESIGN §13).

Such a model maps a partly masked sequence to x0 logits (B, L, V) with no time input; the concrete
score at a masked position is log s_y = log p(y | x) - log(e^sigma - 1) (as RADD's). The mask id comes
from the config (``mask_token_id``) or the tokenizer and need not be the last id. What differs between
the families is one row of :data:`QUIRKS`, keyed by the config's ``model_type``: Dream predicts the
token at i from position i - 1 (its logits are shifted right by one), LLaDA2 attends block-causally
(a position sees its own block and the ones before it). A model of unknown type that returns
``.logits`` and has a mask id is read as LLaDA.

A model that ships its own code (``auto_map`` in its config) is loaded only with ``trust_remote_code``;
without it nothing is imported and the error names the files that would run. The choice is passed to
the tokenizer too, so transformers never asks on stdout.

Memory: the log score is computed in place over the model's own logits (in their dtype, bfloat16 on a
GPU by default), chunk by chunk in float32, so a step holds the logits plus O(B L), never a float64
(B, L, V) copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lsdtool.errors import LsdError


@dataclass(frozen=True)
class Quirk:
    """How a family's forward differs from LLaDA's."""

    family: str
    shift: bool = False  # logits at i predict the token at i + 1 (Dream): shifted right by one position
    block_causal: bool = False  # attention within a block and to earlier blocks only (LLaDA2)


LLADA = Quirk("llada")
QUIRKS: dict[str, Quirk] = {
    "llada": LLADA,
    "lladamoe": Quirk("llada-moe"),
    "llada_moe": Quirk("llada-moe"),
    "dream": Quirk("dream", shift=True),
    "llada2_moe": Quirk("llada2", block_causal=True),
    "llada2": Quirk("llada2", block_causal=True),
}
REMOTE_KEYS = ("auto_map",)
_CHUNK = 1 << 22  # logit elements per chunk of the in-place log-score pass (float32 temporaries stay small)


def quirk_of(config: dict) -> Quirk:
    """The family row for a config's ``model_type`` (LLaDA's for an unknown type)."""
    return QUIRKS.get(str(config.get("model_type", "")).lower(), LLADA)


def is_dllm_config(config: dict) -> bool:
    """Whether a config describes a transformers masked diffusion LM (not a SEDD, RADD or MDLM checkpoint)."""
    kind = str(config.get("model_type", "")).lower()
    if kind == "mdlm" or "graph" in config or "model_length" in config or ("tokens" in config and "model" in config):
        return False
    return kind in QUIRKS or "mask_token_id" in config or "auto_map" in config


def remote_files(config: dict, tokenizer_config: dict | None = None) -> list[str]:
    """The model's own Python files that loading it would run (from ``auto_map`` entries)."""
    names = []
    for cfg in (config, tokenizer_config or {}):
        for value in (cfg.get("auto_map") or {}).values():
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str):
                    names.append(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return sorted(set(names))


@dataclass
class Source:
    """Where a transformers model lives: a local directory or a hub id (resolved through the cache)."""

    name: str
    ref: str  # what from_pretrained is given
    config: dict
    tokenizer_config: dict | None
    fingerprint: str
    local_only: bool
    shipped: bool = False  # inside the package: its code is lsd's own and needs no trust


def find(name_or_path: str, offline: bool | None = None) -> Source | None:
    """The :class:`Source` of a transformers masked diffusion LM, or None when the name is another kind of model."""
    from lsdtool.models import locate

    offline = locate._env_offline() if offline is None else bool(offline)
    embedded = name_or_path in locate.REGISTRY and locate.REGISTRY[name_or_path] is None
    path = locate.EMBEDDED_DIR / name_or_path if embedded else Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            return None
        config = locate.read_config(config_path)
        if not is_dllm_config(config):
            return None
        tok = path / "tokenizer_config.json"
        tok_config = locate.read_config(tok) if tok.is_file() else None
        weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
        digest = ",".join(locate.weight_digest(p) for p in weights) or locate.file_digest(config_path)
        fingerprint = f"dllm:sha256:{_short(digest)}"
        return Source(path.resolve().name, str(path), config, tok_config, fingerprint, True, embedded)
    if name_or_path in locate.REGISTRY or not locate.HUB_ID.fullmatch(name_or_path):
        return None
    try:
        config_file = locate._hub_file(name_or_path, "config.json", offline)
    except locate._NotCached:
        return None  # the one "not in the cache" error comes from the checkpoint loader
    if config_file is None:
        return None
    config = locate.read_config(Path(config_file))
    if not is_dllm_config(config):
        return None
    try:
        tok_file = locate._hub_file(name_or_path, "tokenizer_config.json", offline)
    except locate._NotCached:
        tok_file = None
    tok_config = locate.read_config(Path(tok_file)) if tok_file else None
    fingerprint = f"hub:{name_or_path}@{Path(config_file).parent.name}"
    return Source(name_or_path, name_or_path, config, tok_config, fingerprint, offline, False)


def identify(name_or_path: str, offline: bool | None = None) -> tuple[str, str]:
    """(name, fingerprint) of any model without loading it or importing torch (:func:`locate.identify` for
    the other kinds)."""
    from lsdtool.models import locate

    source = find(name_or_path, offline) if name_or_path != "countdown" else None
    return (source.name, source.fingerprint) if source is not None else locate.identify(name_or_path, offline)


def _short(digest: str) -> str:
    import hashlib

    return digest if "," not in digest else hashlib.sha256(digest.encode()).hexdigest()[:16]


def check_trust(source: Source, trust_remote_code: bool) -> None:
    """LsdError (one line, nothing imported) when the model ships code and the user has not allowed it."""
    files = remote_files(source.config, source.tokenizer_config)
    if files and not trust_remote_code and not source.shipped:
        raise LsdError(f"{source.name} runs its own code to load ({', '.join(files)}); "
                       "pass --trust-remote-code (API: trust_remote_code=True) to allow it")


def default_dtype(device):
    """bfloat16 on a GPU, float32 on CPU."""
    import torch

    return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32


def load(name_or_path: str, source: Source, *, trust_remote_code: bool = False, device=None, dtype=None):
    """A :class:`TransformersDLLM` for ``source`` (checked for trust first)."""
    check_trust(source, trust_remote_code)
    import transformers
    from transformers.utils import logging as hf_logging

    from lsdtool.models.locate import first_line

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kw = dict(trust_remote_code=trust_remote_code or source.shipped, local_files_only=source.local_only)
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.ref, **kw)
    except Exception:  # a model without a tokenizer samples token ids
        tokenizer = None
    mask_id = source.config.get("mask_token_id")
    if not isinstance(mask_id, int) and tokenizer is not None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
    if not isinstance(mask_id, int):
        raise LsdError(f"{source.name} names no mask token (mask_token_id in config.json, or the tokenizer's mask "
                       "token); only masked diffusion models can be sampled")
    dtype = dtype or default_dtype(device)
    major = int(transformers.__version__.split(".")[0])
    try:
        net = transformers.AutoModel.from_pretrained(source.ref, **kw, **({"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}))
    except Exception as e:
        raise LsdError(f"cannot load {source.name} through transformers: {first_line(e)}") from None
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    from lsdtool.models.dllm_model import TransformersDLLM

    model = TransformersDLLM(net, source.config, quirk_of(source.config), name=source.name,
                             fingerprint=source.fingerprint, mask_id=int(mask_id), tokenizer=tokenizer)
    model.task = str(source.config["task"]) if source.config.get("task") is not None else None
    return model
