"""Jump-Your-Steps sampling schedules (Park et al., ICLR 2025) for any absorbing model.

JYS keeps the sampler (Euler / tau-leaping, Phi = 1) and moves the grid. For a coarse step
t1 -> t3 the sampler holds the reverse rates of time t1 until t3; inserting a point t2 lets it
switch to the rates of t2 on [t3, t2]. The KL upper bound (KLUB) of the path measures drops, to
first order, by

    KLUB(t1, t2, t3) = (t2 - t3) E_{x0 ~ data} sum_{positions, y} R2 log(R2 / R1)   [released code]
                     (+ R1 - R2 inside the sum for the full Poisson KL)

with R1 = R(x_{t1}, t1), R2 = R(x_{t2}, t2), where x_{t1} and x_{t2} are forward-noised copies of the
same clean sample with the same uniforms (masked at t iff u < 1 - e^{-sigma_bar(t)}), so the masks are
nested. The grid is refined hierarchically: start from [1, eps]; at each level, in every interval
(t1, t3), pick t2 by golden-section search maximising the KLUB drop (i.e. minimising the KLUB left
after the split), snap the new points to a fine grid of ``src_steps`` steps and keep them distinct.
Level j has 2^j steps, so JYS schedules exist for power-of-two step counts; a deeper level refines
the one above, which is why all levels up to the largest requested one are computed (and cached)
together. Settings follow the released code: search in (t3 + 1e-3, t1 - 1e-3), tolerance
0.25 / src_steps, at most 32 iterations, and the best point evaluated is kept.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import time
from pathlib import Path

import torch

from lsdtool import rng
from lsdtool.diffusion import graph_of
from lsdtool.errors import LsdError
from lsdtool.samplers import DEFAULT_EPS, Sampler

FORMS = ("released", "poisson")
GOLDEN = 1.618
_CACHE_ELEMS = 1 << 26  # keep the start-of-interval log rates in memory below this many elements
VERSION = "1"


TASK_DATA = {"countdown": "lsdtool.models.countdown:generate"}  # task -> "module:function" (n, L, generator) -> (n, L)


def task_data(model) -> str | None:
    """The generator of clean data for the model's task, where the task has one built in."""
    return TASK_DATA.get(getattr(model, "task", None))


def supports(model) -> bool:
    """Jump-Your-Steps' KLUB is the absorbing graph's: it needs a model whose graph has a mask."""
    return graph_of(model).absorbing


def golden_section(f, a: float, c: float, err: float, max_iter: int = 32) -> tuple[float, dict[float, float]]:
    """Minimise f on (a, c) as the released JYS code does: the probe goes into the larger side of the
    bracket; returns the best point evaluated and every evaluation."""
    b = a + (c - a) / (1 + GOLDEN)
    values = {a: f(a), b: f(b), c: f(c)}
    fb = values[b]
    for _ in range(max_iter):
        if c - a <= err:
            break
        if b - a > c - b:
            x, left = b - (b - a) / (1 + GOLDEN), True
        else:
            x, left = b + (c - b) / (1 + GOLDEN), False
        fx = values[x] = f(x)
        if fx < fb:
            b, fb = x, fx
        elif left:
            a = x
        else:
            c = x
    return min(values, key=values.get), values


class Klub:
    """The KLUB drop of inserting t2 into (t1, t3), estimated on clean data ``x0`` (n, L)."""

    def __init__(self, model, x0: torch.Tensor, seed: int, batch_size: int = 256, form: str = "released"):
        if not supports(model):
            raise LsdError(f"Jump-Your-Steps is implemented here for absorbing models; {model.name} is {model.graph}")
        self.graph = graph_of(model)
        if form not in FORMS:
            raise ValueError(f"unknown KLUB form {form!r} (expected one of {', '.join(FORMS)})")
        self.model, self.form, self.batch_size = model, form, batch_size
        self.device = getattr(model, "device", torch.device("cpu"))
        self.x0 = x0.long()
        index = torch.arange(x0.shape[0], dtype=torch.long)
        self.u = rng.uniforms(seed, rng.STREAM_DATA, index, 0, x0.shape[1])  # fixed: common random numbers
        self.calls = 0
        self._start: tuple[float, list] | None = None

    def noised(self, rows: slice, t: float) -> torch.Tensor:
        p = -math.expm1(-float(self.model.noise.total(torch.tensor(t, dtype=torch.float64))))
        return torch.where(self.u[rows] < p, self.graph.mask_id, self.x0[rows])

    def log_rates(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """log R(x, t) to the real tokens (B, L, V-1) float64; meaningful at masked rows only."""
        tt = torch.full((x.shape[0],), t, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            ls = self.graph.real_columns(self.model.log_score(x.to(self.device), tt)).to(torch.float64)
        self.calls += 1
        rate = float(self.model.noise.rate(torch.tensor(t, dtype=torch.float64)))
        return (ls + math.log(rate)).cpu()

    def _batches(self):
        n = self.x0.shape[0]
        return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]

    def start_rates(self, t1: float) -> list:
        """Log rates at (x_{t1}, t1) per batch, kept while the search stays in one interval."""
        if self._start is not None and self._start[0] == t1:
            return self._start[1]
        batches = self._batches()
        keep = self.x0.numel() * self.graph.n_real <= _CACHE_ELEMS
        rates = [self.log_rates(self.noised(r, t1), t1) if keep else None for r in batches]
        self._start = (t1, rates)
        return rates

    def __call__(self, t1: float, t2: float, t3: float) -> float:
        total = 0.0
        start = self.start_rates(t1)
        mask = self.graph.mask_id
        for rows, lr1 in zip(self._batches(), start):
            if lr1 is None:
                lr1 = self.log_rates(self.noised(rows, t1), t1)
            x2 = self.noised(rows, t2)
            lr2 = self.log_rates(x2, t2)
            r2 = lr2.exp()
            term = r2 * (lr2 - lr1)
            if self.form == "poisson":
                term = term - r2 + lr1.exp()
            total += (term.sum(-1) * (x2 == mask)).sum().item()
        return (t2 - t3) * total / self.x0.shape[0]


def _snap(times: list[float], fine: torch.Tensor) -> list[int]:
    """Indices on the fine grid nearest to ``times``, made strictly increasing."""
    idx = [int((fine - v).abs().argmin()) for v in times]
    for i in range(1, len(idx)):
        if idx[i] <= idx[i - 1]:
            idx[i] = min(idx[i - 1] + 1, len(fine) - 1)
    return idx


def schedules(klub: Klub, max_steps: int, src_steps: int = 1024, eps: float = DEFAULT_EPS, start: list[int] | None = None,
              max_iter: int = 32, on_interval=None) -> dict[int, dict]:
    """Refine the grid level by level up to ``max_steps`` (a power of two) steps.

    Returns {steps: {"timesteps": (steps+1,) float64, "indices": fine-grid indices, "klub": [drop per
    inserted point]}} for every level computed. ``start`` resumes from a cached level's indices.
    """
    if max_steps < 1 or max_steps & (max_steps - 1):
        raise ValueError(f"Jump-Your-Steps schedules have power-of-two step counts, got {max_steps}")
    if src_steps < max_steps:
        raise ValueError(f"src_steps ({src_steps}) must be at least the number of steps ({max_steps})")
    fine = torch.linspace(1.0, eps, src_steps + 1, dtype=torch.float64)
    idx = list(start) if start else [0, src_steps]
    err, delta = 0.25 / src_steps, 1e-3
    out = {}
    if len(idx) == 2:
        out[1] = {"timesteps": fine[idx].clone(), "indices": list(idx), "klub": []}
    while len(idx) - 1 < max_steps:
        for i in range(len(idx) - 1):  # room for a point in every interval (neighbours at least 2 apart)
            if idx[i + 1] - idx[i] < 2:
                idx[i + 1] = min(idx[i] + 2, src_steps)
        for i in range(len(idx) - 1, 0, -1):
            if idx[i] - idx[i - 1] < 2:
                idx[i - 1] = max(idx[i] - 2, 0)
        times = [float(fine[i]) for i in idx]
        new, drops = [], []
        for t1, t3 in zip(times[:-1], times[1:]):
            lo, hi = t3 + min(delta, (t1 - t3) / 4), t1 - min(delta, (t1 - t3) / 4)
            best, values = golden_section(lambda t2: -klub(t1, t2, t3), lo, hi, err, max_iter)
            new.append(best)
            drops.append(-values[best])
            if on_interval is not None:
                on_interval()
        merged = [v for pair in zip(times[:-1], new) for v in pair] + [times[-1]]
        idx = _snap(merged, fine)
        steps = len(idx) - 1
        out[steps] = {"timesteps": fine[idx].clone(), "indices": list(idx), "klub": drops}
    return out


# ---- data and cache -------------------------------------------------------------------------------

def read_data(path: str | Path, seq_len: int, n: int) -> torch.Tensor:
    """Clean sequences for the KLUB from a jsonl file: one JSON list of token ids (or an object with
    ``tokens``) per line; each is cut to ``seq_len`` tokens and must have at least that many."""
    rows = []
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LsdError(f"cannot read data file {path}: {type(exc).__name__}") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            ids = obj["tokens"] if isinstance(obj, dict) else obj
            ids = [int(v) for v in ids]
        except (ValueError, KeyError, TypeError):
            raise LsdError(f"{path}:{no}: expected a JSON list of token ids or an object with \"tokens\"") from None
        if len(ids) < seq_len:
            raise LsdError(f"{path}:{no}: {len(ids)} tokens, the model needs {seq_len}")
        rows.append(ids[:seq_len])
        if len(rows) == n:
            break
    if not rows:
        raise LsdError(f"{path} holds no sequences")
    return torch.tensor(rows, dtype=torch.long)


def clean_data(model, data: str | None, n: int, seed: int) -> tuple[torch.Tensor, str]:
    """(x0 (n', L), description): generated countdown data, or the first n sequences of ``data``."""
    if data:
        x0 = read_data(data, model.seq_len, n)
        desc = f"file:{Path(data).name}"
    elif task_data(model):
        module, _, name = task_data(model).partition(":")
        generate = getattr(importlib.import_module(module), name)
        x0 = generate(n, model.seq_len, torch.Generator().manual_seed(seed))
        desc = f"{model.task}.{name}"
    else:
        raise LsdError(f"Jump-Your-Steps needs clean data for {model.name}: pass --data FILE (jsonl of token ids)")
    graph = graph_of(model)
    if int(x0.max()) >= model.vocab_size or int(x0.min()) < 0 or bool((x0 == graph.mask_id).any()):
        raise LsdError(f"data token ids must be real tokens of {model.name}: 0..{model.vocab_size - 1} except the mask {graph.mask_id}")
    return x0, desc


def _settings(model, x0: torch.Tensor, desc: str, n: int, seed: int, src_steps: int, form: str) -> dict:
    digest = hashlib.sha256(x0.numpy().astype("int64").tobytes()).hexdigest()[:16]
    return {"method": "jys", "version": VERSION, "fingerprint": model.fingerprint, "data": desc, "data_digest": digest,
            "samples": int(x0.shape[0]), "seed": seed, "src_steps": src_steps, "form": form, "max_iter": 32}


def _meta(model, settings: dict, fit: dict) -> dict[str, str]:
    """The artifact metadata of a JYS grid (the sampler's own fields are written from the sampler)."""
    from lsdtool.artifacts import model_fields

    recipe = "".join(f"{k} = {json.dumps(v)}\n" for k, v in sorted(settings.items()))
    return {**model_fields(model), "plus": "false", "objective": "jys", "teacher_steps": str(settings["src_steps"]),
            "seed": str(settings["seed"]), "recipe": recipe, "fit": json.dumps(fit, sort_keys=True)}


def load_or_search(model, steps_list, *, cache_dir=None, data: str | None = None, n: int = 256, seed: int = 0,
                   src_steps: int = 1024, form: str = "released", batch_size: int = 256, log=None,
                   on_interval=None) -> dict[int, tuple[Path, Sampler]]:
    """JYS samplers for every power-of-two count in ``steps_list``, from the cache or computed (and cached).
    ``on_interval`` is called after each interval's search (max(steps_list) - 1 of them from scratch)."""
    from lsdtool import cache
    from lsdtool.locations import cache_root

    steps_list = sorted(set(int(s) for s in steps_list))
    bad = [s for s in steps_list if s < 1 or s & (s - 1)]
    if bad:
        raise LsdError(f"Jump-Your-Steps schedules have power-of-two step counts, not {', '.join(map(str, bad))}")
    root = cache_root(cache_dir)
    x0, desc = clean_data(model, data, n, seed)
    settings = _settings(model, x0, desc, n, seed, src_steps, form)
    out, missing = {}, []
    for s in steps_list:
        path = cache.jys_path(model.name, settings, s, root)
        if path.exists():
            try:
                out[s] = (path, Sampler.load(path))
                continue
            except LsdError:
                pass
        missing.append(s)
    if not missing:
        return out
    # resume from the deepest cached level below the largest missing one
    start, level = None, 1
    while level < max(missing):
        path = cache.jys_path(model.name, settings, level, root)
        if path.exists():
            try:
                start = Sampler.load(path).fit["indices"]
            except (LsdError, KeyError, ValueError):
                pass
        level *= 2
    if start is not None and len(start) - 1 >= max(missing):
        start = None
    klub = Klub(model, x0, seed, batch_size, form)
    began = time.time()
    if log:
        log(f"jys: searching {model.name} schedules up to {max(missing)} steps on {x0.shape[0]} clean samples")
    levels = schedules(klub, max(missing), src_steps, start=start, on_interval=on_interval)
    for s, lv in levels.items():
        fit = {"indices": lv["indices"], "klub_drop": lv["klub"], "model_calls": klub.calls,
               "seconds": round(time.time() - began, 2), "form": form}
        sampler = Sampler(lv["timesteps"], torch.ones(s, dtype=torch.float64), "euler", "score",
                          meta=_meta(model, settings, fit))
        path = sampler.save(cache.jys_path(model.name, settings, s, root))
        if s in missing:
            out[s] = (path, sampler)
    return out
