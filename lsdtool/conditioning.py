"""Conditioning: tokens given in advance (prefix, suffix, infill) that a sample keeps throughout.

A given position is set in the start state and held fixed by the engine, so it never changes
(absorb: it starts unmasked; uniform: it is excluded from every draw). The free positions draw
from the sample's own random stream, so conditioning one sample never changes another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from lsdtool.diffusion import graph_of
from lsdtool.errors import LsdError
from lsdtool.samplers import start_state

FREE = -1  # a position the sampler generates
_INPUT_KEYS = ("prefix", "suffix", "tokens")


@dataclass
class Conditions:
    """Given tokens: ``rows`` (K, L) int32, FREE where generated; K = 1 is shared by every sample."""

    rows: torch.Tensor

    def __len__(self) -> int:
        return self.rows.shape[0]

    def given(self, indices: list[int]) -> torch.Tensor:
        """(b, L) long given tokens of the samples ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.rows[torch.zeros_like(idx) if len(self) == 1 else idx].long()


def start(model, index: torch.Tensor, seed: int, given: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_init (B, L), fixed (B, L) bool): the usual start state with the given (B, L) tokens set."""
    fixed = given != FREE
    return torch.where(fixed, given, start_state(model, index, seed)), fixed


def spans(row: torch.Tensor) -> list[list[int]]:
    """Half-open [start, end) runs of the given positions of one (L,) row, e.g. [[0, 3], [250, 256]]."""
    flags = [0, *(row != FREE).int().tolist(), 0]
    edges = [j for j in range(len(flags) - 1) if flags[j] != flags[j + 1]]  # positions where a run starts or ends
    return [[edges[k], edges[k + 1]] for k in range(0, len(edges), 2)]


def _ids(model, value, what: str) -> list[int]:
    """Token ids of a text (tokenised by the model) or of a list of ids; checked against the vocabulary."""
    if isinstance(value, str):
        ids = model.encode(value)
    elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        ids = value
    else:
        raise LsdError(f"{what} must be a string or a list of token ids")
    mask = graph_of(model).mask_id
    bad = next((v for v in ids if not 0 <= v < model.vocab_size or v == mask), None)
    if bad is not None:
        where = "the mask" if bad == mask else "outside the vocabulary"
        raise LsdError(f"{what} holds token id {bad}, {where}: the model's tokens are {_token_range(model.vocab_size, mask)}")
    return list(ids)


def checked_ids(model, value, what: str) -> list[int]:
    """Token ids of a text or id list, checked against the model's vocabulary (no mask)."""
    return _ids(model, value, what)


def _token_range(vocab_size: int, mask: int | None) -> str:
    """The real token ids as text: "0..31", or "0..9 and 11..15" around a mask in the middle."""
    if mask is None or mask == vocab_size - 1:
        return f"0..{vocab_size - 1 - (mask is not None)}"
    return f"0..{mask - 1} and {mask + 1}..{vocab_size - 1}"


def _row(model, prefix, suffix, where: str) -> torch.Tensor:
    """(L,) given row from an optional prefix and suffix (texts or id lists)."""
    l = model.seq_len
    row = torch.full((l,), FREE, dtype=torch.int32)
    head = _ids(model, prefix, f"{where}prefix") if prefix is not None else []
    tail = _ids(model, suffix, f"{where}suffix") if suffix is not None else []
    if len(head) > l:
        raise LsdError(f"{where}prefix has {len(head)} tokens but samples are {l} long")
    if len(tail) > l - len(head):
        raise LsdError(f"{where}prefix ({len(head)} tokens) and suffix ({len(tail)}) overlap in a sample of {l} tokens")
    row[: len(head)] = torch.tensor(head, dtype=torch.int32)
    row[l - len(tail) :] = torch.tensor(tail, dtype=torch.int32)
    return row


def _tokens_row(model, tokens, where: str) -> torch.Tensor:
    """(L,) given row from a full-length list of ids with null where the sampler generates."""
    l = model.seq_len
    if not isinstance(tokens, list) or len(tokens) != l:
        raise LsdError(f"{where}tokens must be a list of {l} ids or nulls")
    given = [v for v in tokens if v is not None]
    _ids(model, given, f"{where}tokens")
    return torch.tensor([FREE if v is None else v for v in tokens], dtype=torch.int32)


def from_text(model, prefix: str | None, suffix: str | None) -> Conditions | None:
    """One shared condition from ``--prefix``/``--suffix`` texts, or None when neither is given."""
    if prefix is None and suffix is None:
        return None
    return Conditions(_row(model, prefix, suffix, "")[None])


def read_input(model, path: str) -> Conditions:
    """Per-sample conditions from a jsonl file: line k conditions sample k with {prefix, suffix} or {tokens}."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows = []
    for k, line in enumerate(lines, 1):
        where = f"{path} line {k}: "
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise LsdError(f"{where}not valid JSON (use {{}} for a sample without conditions)") from None
        if not isinstance(obj, dict):
            raise LsdError(f"{where}expected an object with {', '.join(_INPUT_KEYS)}")
        unknown = sorted(set(obj) - set(_INPUT_KEYS))
        if unknown:
            raise LsdError(f"{where}unknown key {unknown[0]!r} (expected {', '.join(_INPUT_KEYS)})")
        if "tokens" in obj and ("prefix" in obj or "suffix" in obj):
            raise LsdError(f"{where}give tokens, or prefix/suffix, not both")
        if "tokens" in obj:
            rows.append(_tokens_row(model, obj["tokens"], where))
        else:
            rows.append(_row(model, obj.get("prefix"), obj.get("suffix"), where))
    if not rows:
        raise LsdError(f"{path} holds no lines")
    return Conditions(torch.stack(rows))
