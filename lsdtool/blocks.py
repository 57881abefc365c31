"""Semi-autoregressive (block) decoding of the count and confidence rules, as LLaDA's ``generate()`` (DESIGN §13).

With the sampler options ``gen_length`` G and ``block_length`` B, the last G positions of the sequence
are generated in G / B blocks left to right (the positions before them are the prompt); the M steps
split evenly over the blocks, M / (G / B) each, and a step commits only masked positions of its own
block. The tokens a step commits follow the ``counts`` option over the block's steps: ``even`` (the
default with blocks) is LLaDA's get_num_transfer_tokens (masks // steps, the remainder on the first
steps); ``noise`` follows the grid's masked fraction over the block's slice of the grid, so a distilled
grid (LSD+) sets how many tokens each step of a block commits.

``greedy`` candidates are the argmax of the model's distribution over the real tokens (LLaDA's
temperature 0); ``cfg`` w > 0 is LLaDA's classifier-free guidance, logits_u + (w + 1)(logits_c - logits_u)
with the prompt (the fixed positions) masked in the unconditional copy, applied to the log scores of
masked positions (the same rows up to a per-row constant, so the same softmax and argmax).
"""

from __future__ import annotations

import torch

from lsdtool.diffusion.noise import NEVER


def layout(options: dict, length: int) -> tuple[int, int, int] | None:
    """(first generated position, block length, number of blocks), or None without block options."""
    gen = options.get("gen_length")
    if gen is None and options.get("block_length") is None:
        return None
    gen = int(gen if gen is not None else length)
    block = int(options.get("block_length") or gen)
    if gen > length:
        raise ValueError(f"gen_length {gen} exceeds the sequence length {length}")
    return length - gen, block, gen // block


def greedy_rows(graph, noise, log_score: torch.Tensor, x: torch.Tensor, a=None) -> torch.Tensor:
    """One-hot (R, V-1) float64 rows on the argmax of the real tokens (canonical layout: the mask last);
    the first of equal maxima, as torch.argmax."""
    real = log_score[:, :-1]
    return torch.zeros(real.shape, dtype=torch.float64, device=real.device).scatter_(-1, real.argmax(-1, keepdim=True), 1.0)


def guided(model, x: torch.Tensor, t: torch.Tensor, fixed: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Log scores (B, L, V) with classifier-free guidance of strength ``scale`` (module docstring)."""
    mask = model.mask_id
    if fixed is None:
        raise ValueError("classifier-free guidance needs a prompt to mask (--prompt or --prompts)")
    x_u = torch.where(fixed, torch.full_like(x, mask), x)
    both = model.log_score(torch.cat([x, x_u]), torch.cat([t, t]))
    cond, uncond = both[: x.shape[0]], both[x.shape[0] :]
    known = x != mask
    cond.sub_(uncond).mul_(scale + 1).add_(uncond)
    rows = known.reshape(-1).nonzero().squeeze(-1)
    flat = cond.reshape(-1, cond.shape[-1])
    flat.index_fill_(0, rows, NEVER)
    flat[rows, x.reshape(-1)[rows]] = 0.0
    return cond
