"""Quality metrics: the countdown error figures (DESIGN §9) and text metrics (§11)."""

from __future__ import annotations

import torch


def countdown_errors(x: torch.Tensor) -> dict[str, float]:
    """The three countdown figures for samples x (B, L).

    ``error`` (JYS): walking left to right with prev = x[0], token j is wrong when prev != 0 and
    x[j] != prev - 1, and then prev resets to 0; mean over samples of wrong / L.
    ``break_rate``: fraction of transitions breaking the rule, without the reset.
    ``valid``: fraction of sequences with no break at all.
    """
    x = x.long()
    b, l = x.shape
    breaks = torch.zeros_like(x, dtype=torch.bool)
    breaks[:, 1:] = (x[:, :-1] != 0) & (x[:, 1:] != x[:, :-1] - 1)
    # A break right after a wrong token sees prev = 0 and is forgiven, so within a run of
    # consecutive breaks exactly the 1st, 3rd, 5th, ... count as wrong.
    pos = torch.arange(l, device=x.device).expand(b, l)
    last_ok = torch.where(breaks, torch.zeros_like(pos), pos).cummax(-1).values
    wrong = breaks & ((pos - last_ok) % 2 == 1)
    return {
        "error": (wrong.sum(-1).double() / l).mean().item(),
        "break_rate": (breaks[:, 1:].sum(-1).double() / (l - 1)).mean().item(),
        "valid": (breaks.sum(-1) == 0).double().mean().item(),
    }


def countdown_error_reference(x) -> float:
    """The JYS evaluation loop, written plainly (for tests)."""
    total = 0.0
    for row in x.tolist():
        prev, wrong = row[0], 0
        for v in row[1:]:
            if prev != 0 and v != prev - 1:
                wrong += 1
                prev = 0
            else:
                prev = v
        total += wrong / len(row)
    return total / len(x)
