"""The embedded countdown task (DESIGN §9): its data generator and its exact denoiser.

The data is a first-order Markov chain on 0..31 (after k > 0 comes k-1; after 0 a uniform
restart; the first token is uniform), so p(x0_i | unmasked tokens) is exact by forward-backward
in O(L V^2). The concrete score at a masked slot is p(y | unmasked) / expm1(sigma_bar(t)).
"""

from __future__ import annotations

import torch

from lsdtool.diffusion import Absorb, LogLinear
from lsdtool.models.base import DiffusionModel
from lsdtool.models.countdown_id import FINGERPRINT, LEAK

N_VALUES = 32
SEQ_LEN = 256


def generate(n: int, seq_len: int = SEQ_LEN, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, seq_len) countdown sequences: starts n ~ U{0..31}, then n, n-1, ..., 0, truncated."""
    starts = torch.randint(0, N_VALUES, (n, seq_len), generator=generator)
    ends = (starts + 1).cumsum(-1)  # exclusive end offset of each segment
    pos = torch.arange(seq_len).expand(n, seq_len).contiguous()
    seg = torch.searchsorted(ends, pos, right=True)
    offset = pos - (ends.gather(1, seg) - starts.gather(1, seg) - 1)
    return starts.gather(1, seg) - offset


def transition_matrix(leak: float = LEAK, n_values: int = N_VALUES) -> torch.Tensor:
    """(n, n) float64 chain T[a, b] = P(next = b | current = a), smoothed by ``leak``."""
    t = torch.zeros(n_values, n_values, dtype=torch.float64)
    t[torch.arange(1, n_values), torch.arange(0, n_values - 1)] = 1.0
    t[0] = 1.0 / n_values
    return (1 - leak) * t + leak / n_values


def posterior_recursive(x: torch.Tensor, leak: float = LEAK, n_values: int = N_VALUES) -> torch.Tensor:
    """Scaled forward-backward, position by position: x (B, L), ids >= n unobserved -> (B, L, n).

    The plain recursion, kept as the reference that :class:`ChainPosterior` is tested against.
    """
    b, l = x.shape
    trans = transition_matrix(leak, n_values).to(x.device)
    xt = x.T
    observed = xt < n_values
    emit = torch.ones(l, b, n_values, dtype=torch.float64, device=x.device)
    emit[observed] = torch.nn.functional.one_hot(xt[observed], n_values).double()
    alpha = torch.empty_like(emit)
    alpha[0] = emit[0] / emit[0].sum(-1, keepdim=True)
    for i in range(1, l):
        a = (alpha[i - 1] @ trans) * emit[i]
        alpha[i] = a / a.sum(-1, keepdim=True)
    post = torch.empty_like(emit)
    post[l - 1] = alpha[l - 1]
    beta = torch.ones(b, n_values, dtype=torch.float64, device=x.device)
    for i in range(l - 2, -1, -1):
        beta = (emit[i + 1] * beta) @ trans.T
        beta = beta / beta.sum(-1, keepdim=True)
        post[i] = alpha[i] * beta
    post = post / post.sum(-1, keepdim=True)
    return post.transpose(0, 1)


class ChainPosterior:
    """p(x0_i = y | unmasked tokens of x) for the countdown chain without a loop over positions.

    An observed token's forward message is exactly onehot(x_j) (its emission is a point mass), so
    the message at a masked position i is row x_p of T^(i-p) (p the last observed position
    before i; u T^i, u uniform, if there is none), and the backward message is column x_q of
    T^(q-i) (q the next observed position; all ones if there is none). Both come from tables of
    matrix powers built once, so a call is two gathers over (B, L, n).
    """

    def __init__(self, seq_len: int = SEQ_LEN, leak: float = LEAK, n_values: int = N_VALUES):
        self.n_values = n = n_values
        trans = transition_matrix(leak, n)
        powers = [torch.eye(n, dtype=torch.float64)]
        for _ in range(seq_len):
            powers.append(powers[-1] @ trans)
        powers = torch.stack(powers)  # (L+1, n, n): T^d
        uniform = torch.full((seq_len + 1, 1, n), 1.0 / n, dtype=torch.float64) @ powers
        self.forward_table = torch.cat([powers, uniform], 1)  # [d, r]: row r of T^d; r = n: u T^d
        ones = torch.ones(seq_len + 1, n, 1, dtype=torch.float64)
        self.backward_table = torch.cat([powers, ones], 2).transpose(1, 2).contiguous()  # [d, c]: column c of T^d

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) with ids >= n unobserved -> (B, L, n) float64 posterior."""
        b, l = x.shape
        n, dev = self.n_values, x.device
        if self.forward_table.device != dev:
            self.forward_table, self.backward_table = self.forward_table.to(dev), self.backward_table.to(dev)
        observed = x < n
        pos = torch.arange(l, device=dev).expand(b, l)
        prev = torch.where(observed, pos, -1).cummax(-1).values
        nxt = torch.where(observed, pos, l).flip(-1).cummin(-1).values.flip(-1)
        prev_tok = torch.where(prev >= 0, x.gather(1, prev.clamp_min(0)), n)
        next_tok = torch.where(nxt < l, x.gather(1, nxt.clamp_max(l - 1)), n)
        # one flat row index per (distance, token) into each table: index_select is a plain row copy
        rows = (torch.where(prev >= 0, pos - prev, pos) * (n + 1) + prev_tok).reshape(-1)
        post = self.forward_table.reshape(-1, n).index_select(0, rows)
        rows = (torch.where(nxt < l, nxt - pos, 0) * (n + 1) + next_tok).reshape(-1)
        post.mul_(self.backward_table.reshape(-1, n).index_select(0, rows))  # alpha * beta
        return post.div_(post.sum(-1, keepdim=True)).reshape(b, l, n)


class CountdownModel(DiffusionModel):
    """Exact, training-free absorbing model of the countdown data (loglinear noise, V = 33, L = 256)."""

    name = "countdown"
    task = "countdown"
    graph = Absorb(N_VALUES + 1)
    vocab_size = N_VALUES + 1
    seq_len = SEQ_LEN

    def __init__(self, leak: float = LEAK):
        self.leak = leak
        self.posterior = ChainPosterior(SEQ_LEN, leak)
        self.noise = LogLinear(1e-3)
        self.fingerprint = FINGERPRINT if leak == LEAK else f"countdown:v1:exact-chain-leak-{leak:g}"

    @property
    def has_tokenizer(self) -> bool:
        return True

    def decode(self, tokens) -> str:
        return " ".join("?" if int(v) >= N_VALUES else str(int(v)) for v in tokens)

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(tok) for tok in text.split()]
        except ValueError:
            raise ValueError(f"countdown text must be integers 0..{N_VALUES - 1} separated by spaces: {text!r}") from None
        if any(not 0 <= v < N_VALUES for v in ids):
            raise ValueError(f"countdown tokens must lie in 0..{N_VALUES - 1}: {text!r}")
        return ids

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x0 | unmasked) (B, L, 32) float64."""
        return torch.log(self.posterior(x).clamp_min_(1e-300))

    def log_score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p(y | unmasked) - log expm1(sigma_bar(t)): (B, L, V) float64, 0 at the current token."""
        sigma = self.noise.total(t.to(torch.float64))
        out = torch.empty(*x.shape, self.vocab_size, dtype=torch.float64, device=x.device)
        torch.log(self.posterior(x).clamp_min_(1e-300), out=out[..., :-1])  # written in place: no cat copy
        out[..., -1] = -700.0
        out.sub_(torch.log(torch.expm1(sigma))[:, None, None])
        return out.scatter_(-1, x[..., None], 0.0)


def build(config: dict, found) -> CountdownModel:
    """The embedded countdown model (the family table's entry point; it has no weights to read)."""
    return CountdownModel()
