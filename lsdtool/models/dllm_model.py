"""The adapter around a transformers masked diffusion LM (see :mod:`lsdtool.models.dllm` for loading)."""

from __future__ import annotations

import torch

from lsdtool.diffusion import Absorb, LogLinear
from lsdtool.diffusion.noise import NEVER, log_expm1
from lsdtool.models.base import DiffusionModel

_CHUNK = 1 << 22  # logit elements per chunk of the in-place passes: float32 temporaries stay at 16 MB


def shift_right_(logits: torch.Tensor) -> torch.Tensor:
    """Dream's alignment in place: out[:, i] = logits[:, i - 1] for i >= 1, out[:, 0] = logits[:, 0] (B, L, V)."""
    b, l, v = logits.shape
    step = max(1, _CHUNK // max(1, b * v))
    for end in range(l, 1, -step):  # from the end, so every source is read before it is overwritten
        start = max(1, end - step)
        logits[:, start:end] = logits[:, start - 1 : end - 1].clone()
    return logits


def block_causal(length: int, start: int, block: int, device) -> torch.Tensor:
    """(L, L) bool: query j sees key i iff block(i) <= block(j), blocks of ``block`` tokens tiling from ``start``
    (the prompt before it falls into blocks of its own, earlier ones)."""
    pos = torch.arange(length, device=device)
    ids = torch.div(pos - start, block, rounding_mode="floor")
    return ids[None, :] <= ids[:, None]


def log_score_(logits: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The absorbing log score in place over x0 logits (B, L, V): log softmax over the real tokens minus
    ``shift`` (B,) = log(e^sigma - 1) at masked rows, NEVER elsewhere and 0 at the current token of a known row.
    Row chunks keep the float32 temporaries small whatever the logits' dtype."""
    b, l, v = logits.shape
    flat = logits.view(b * l, v)
    per_row = shift.to(torch.float32).repeat_interleave(l)
    step = max(1, _CHUNK // v)
    for start in range(0, b * l, step):
        rows = flat[start : start + step]
        rows[:, mask_id] = -torch.inf
        lse = torch.logsumexp(rows.float(), -1) + per_row[start : start + step]
        rows.sub_(lse.to(rows.dtype)[:, None])
        rows[:, mask_id] = NEVER
    xf = x.reshape(-1)
    known = (xf != mask_id).nonzero().squeeze(-1)
    flat.index_fill_(0, known, NEVER)
    flat[known, xf[known]] = 0.0
    return logits


class TransformersDLLM(DiffusionModel):
    """A transformers model whose forward(input_ids, attention_mask) returns x0 ``.logits``; absorbing graph with
    the model's own mask id, loglinear noise (the time enters only through log(e^sigma - 1))."""

    def __init__(self, net, config: dict, quirk, *, name: str, fingerprint: str, mask_id: int, tokenizer=None):
        self.net, self.quirk, self.tokenizer = net, quirk, tokenizer
        self.name, self.fingerprint = name, fingerprint
        self.vocab_size = int(config.get("vocab_size") or net.config.vocab_size)
        self.graph = Absorb(self.vocab_size, mask_id)
        self.noise = LogLinear(1e-3)
        limit = config.get("max_sequence_length") or config.get("max_position_embeddings")
        self.context = int(limit) if limit else None
        self.seq_len = min(self.context or 1024, 1024)  # set to prompt + gen length by prompted sampling
        self.pad_id = None  # left padding to hide from attention (set when prompts of different lengths are padded)
        self.layout = None  # (gen_length, block_length) of a block sampler, for block-causal attention
        self.device = torch.device("cpu")

    @property
    def family(self) -> str:
        return self.quirk.family

    def to(self, device) -> "TransformersDLLM":
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def configure(self, options: dict) -> None:
        """Take the block layout of the sampler about to run (LLaDA2's attention follows its blocks)."""
        gen = options.get("gen_length")
        self.layout = (int(gen), int(options.get("block_length") or gen)) if gen else None

    def attention(self, x: torch.Tensor) -> torch.Tensor | None:
        """The attention mask the family needs: None, (B, L) 0/1 key padding, or (B, 1, L, L) 0/1 in the net's dtype."""
        b, l = x.shape
        keys = None
        if self.pad_id is not None:  # the leading run of pad tokens is padding
            keys = (x != self.pad_id).long().cummax(-1).values
        if not self.quirk.block_causal:
            return keys
        gen, block = self.layout or (l, 32)
        full = block_causal(l, l - gen, block, x.device)[None, None].expand(b, 1, l, l)
        if keys is not None:
            full = full & keys.bool()[:, None, None, :]
        return full.to(next(self.net.parameters()).dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The x0 logits (B, L, V) of the family, aligned so that row i predicts the token at i."""
        mask = self.attention(x)
        with torch.no_grad():
            out = self.net(input_ids=x, attention_mask=mask) if mask is not None else self.net(input_ids=x)
        logits = out.logits if hasattr(out, "logits") else out[0]
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"{self.name} returned {logits.shape[-1]} logits per position, its config says {self.vocab_size}")
        logits = logits.contiguous()
        return shift_right_(logits) if self.quirk.shift else logits

    def x0_log_probs(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p(x0 | x) over the real tokens (B, L, V-1) float32."""
        return torch.log_softmax(self.graph.real_columns(self.logits(x)).float(), -1)

    def log_score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, L, V) in the logits' dtype, computed in place (module docstring of :mod:`lsdtool.models.dllm`);
        differentiable in t when t requires a gradient."""
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(x.shape[0])
        shift = log_expm1(self.noise.total(t.double()))
        if not (torch.is_grad_enabled() and t.requires_grad):
            return log_score_(self.logits(x), x, shift, self.graph.mask_id)
        ls = log_score_(self.logits(x), x, torch.zeros_like(shift), self.graph.mask_id).float()
        masked = (x == self.graph.mask_id)[..., None] & (torch.arange(self.vocab_size, device=x.device) != self.graph.mask_id)
        return ls - torch.where(masked, shift.float()[:, None, None], 0.0)

    # --- text ------------------------------------------------------------------------------------

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer is not None

    def decode(self, tokens, skip_special: bool = False) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([int(v) for v in tokens], skip_special_tokens=skip_special)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"model {self.name} has no tokenizer to encode text with")
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def chat(self, text: str) -> list[int]:
        """Token ids of a user turn in the tokenizer's chat template, with the generation prompt."""
        from lsdtool.errors import LsdError

        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise LsdError(f"--chat: the tokenizer of {self.name} has no chat template")
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      tokenize=False)
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))
