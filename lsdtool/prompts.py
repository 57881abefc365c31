"""Prompted generation (LLaDA's layout): each sample is a prompt followed by ``gen_length`` generated tokens.

The prompt is held fixed by the engine (:mod:`lsdtool.conditioning`); prompts of different lengths are
left-padded with the tokenizer's pad token, which the model's attention hides. ``--chat`` wraps each
prompt as a user turn in the tokenizer's chat template.
"""

from __future__ import annotations

import json

import torch

from lsdtool import conditioning
from lsdtool.conditioning import FREE, Conditions
from lsdtool.errors import LsdError


def read_prompts(path: str) -> list[str]:
    """The prompts of a jsonl file, one ``{"prompt": TEXT}`` per line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f.read().split("\n") if line.strip()]
    except OSError as e:
        raise LsdError(f"cannot read {path}: {e.strerror or e}") from None
    out = []
    for k, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise LsdError(f"{path} line {k}: not valid JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise LsdError(f'{path} line {k}: expected {{"prompt": TEXT}}')
        out.append(obj["prompt"])
    if not out:
        raise LsdError(f"{path} holds no prompts")
    return out


def prompt_ids(model, text: str, chat: bool) -> list[int]:
    """Token ids of one prompt (in the chat template with ``chat``)."""
    if chat:
        if not hasattr(model, "chat"):
            raise LsdError(f"--chat: {model.name} has no tokenizer with a chat template")
        return model.chat(text)
    return model.encode(text)


def prompted(model, gen_length: int, prompt: str | None = None, prompts: str | None = None,
             chat: bool = False) -> Conditions | None:
    """The fixed prompt tokens before ``gen_length`` generated ones (one row shared, or one per line of
    ``prompts``), or None without a prompt; sets the model's sequence length to prompt + gen_length."""
    if prompt is not None and prompts is not None:
        raise LsdError("give --prompt or --prompts, not both")
    texts = [prompt] if prompt is not None else read_prompts(prompts) if prompts is not None else []
    if chat and not texts:
        raise LsdError("--chat needs --prompt or --prompts")
    ids = [conditioning.checked_ids(model, prompt_ids(model, text, chat), "prompt") for text in texts]
    width = max((len(i) for i in ids), default=0)
    length = width + int(gen_length)
    if not hasattr(model, "context"):
        if length != model.seq_len:
            raise LsdError(f"{model.name} samples {model.seq_len} tokens; the prompt ({width}) and --gen-length "
                           f"{gen_length} make {length}")
    elif model.context is not None and length > model.context:
        raise LsdError(f"the prompt ({width} tokens) and --gen-length {gen_length} make {length} tokens, more than "
                       f"the context of {model.name} ({model.context})")
    pad = None
    if len({len(i) for i in ids}) > 1:
        pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
        if pad is None:
            raise LsdError(f"prompts of different lengths need a pad token; the tokenizer of {model.name} has none")
    if hasattr(model, "context"):
        model.seq_len, model.pad_id = length, pad
    if not ids:
        return None
    rows = torch.full((len(ids), length), FREE, dtype=torch.int32)
    for r, i in enumerate(ids):
        rows[r, : width - len(i)] = pad if pad is not None else FREE
        rows[r, width - len(i) : width] = torch.tensor(i, dtype=torch.int32)
    return Conditions(rows)


def completion(model, row, gen_length: int) -> str | None:
    """The decoded text of the generated part of one sample (special tokens left out), or None without a tokenizer."""
    if not model.has_tokenizer:
        return None
    tail = [int(v) for v in row[-gen_length:]]
    try:
        return model.decode(tail, skip_special=True)
    except TypeError:  # a model whose decode takes no skip_special
        return model.decode(tail)
