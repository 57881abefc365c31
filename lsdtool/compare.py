"""Samplers x NFE on one model, from the same start states and seeds: the rows behind ``lsd compare``.

Every row samples indices 0..n-1 with one seed through the one engine loop, so row (sampler, NFE)
holds exactly what ``lsd sample`` prints for the same sampler, seed and n. NFE counts every model
call: a two-call-per-step rule (theta-trapezoidal) gets K/2 steps for NFE K and is skipped at odd K.

Samplers (``--samplers`` names):
- ``euler``, ``tweedie``: the plain rules on the uniform grid (identical for absorb + loglinear).
- ``count``: fixed-count random order (absorbing models only).
- ``confidence``: commit the most confident of candidates drawn at every masked position, n_k as for
  count (absorbing models only, :mod:`lsdtool.adaptive`); ``lsd+:confidence`` (any lsd variant with
  ``:confidence``) runs the rule on the distilled artifact's grid.
- ``entropy-bound``: EB-Sampler; the number of model calls adapts per sample, so the cell at NFE K uses
  the gamma from ``GAMMAS`` whose mean NFE on the held-out seed lies nearest K, and the row reports its
  realised mean and max NFE (every row does; for the fixed-step rules both equal the column).
- ``theta-trapezoidal``: the second-order two-stage rule, theta = 1/2.
- ``jys``: Euler on the Jump-Your-Steps grid (power-of-two steps; clean data needed, see :mod:`lsdtool.jys`).
- ``euler-temp``: Euler with one global temperature (temperature mode, every Phi_k equal).
- ``power``: Euler on the grid tau_k = eps + (1 - eps)(1 - k/M)^rho.
- ``lsd``, ``lsd+`` and variants ``lsd+:paper``, ``lsd:temperature``, ``lsd+:paper:temperature``,
  ``lsd:teacher-path``, ``lsd:tweedie`` ...: distilled samplers from the cache (distilled on a miss).
The two controls' single scalar (temperature, rho) is picked from a fixed candidate list by the
evaluation metric on a held-out seed (``tune_seed``, never the evaluation seed) with ``tune_n`` samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from lsdtool.errors import LsdError
from lsdtool import distillation, jys, steprules
from lsdtool.diffusion import graph_of
from lsdtool.metrics import TextEval
from lsdtool.samplers import DEFAULT_EPS, Sampler, power_grid

DEFAULT_SAMPLERS = ("euler", "tweedie", "lsd", "lsd+")
PLAIN = steprules.NAMES  # one row per step rule of the table
ADAPTIVE = ("entropy-bound",)  # rules whose calls vary per sample: a rule option is tuned to each NFE column
CONTROLS = ("euler-temp", "power")
KNOWN = PLAIN + ("jys",) + CONTROLS + ("lsd", "lsd+")
UNFAITHFUL = ("confidence", "entropy-bound")  # rules that pick positions by the model's confidence
LSD_VARIANTS = {"paper": ("objective", "paper"), "teacher-path": ("objective", "teacher-path"),
                "score": ("mode", "score"), "temperature": ("mode", "temperature"),
                "euler": ("base", "euler"), "tweedie": ("base", "tweedie"),
                "confidence": ("drive", "confidence")}  # run the confidence rule on the distilled grid
TEMPERATURES = (0.7, 0.85, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0)  # inverse temperatures Phi (> 1 sharpens)
RHOS = (0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)
# entropy-bound budgets gamma, fewest model calls first
GAMMAS = (1000.0, 500.0, 200.0, 100.0, 50.0, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
TUNE_SEED_OFFSET = 1_000_003
JYS_SEED = 0  # clean data and forward-noise uniforms of the KLUB: fixed, so schedules are shared across --seed
JYS_SRC_STEPS = 1024  # the fine grid JYS points are snapped to (as in the released code)


@dataclass
class Row:
    sampler: str
    steps: int
    nfe: int
    metrics: dict
    seconds_per_sample: float
    details: dict = field(default_factory=dict)
    nfe_mean: float | None = None  # realised model calls per sample (mean, max); None: not measured
    nfe_max: int | None = None
    preview: torch.Tensor | None = field(default=None, repr=False)  # image models: pixels of the first samples

    def as_dict(self) -> dict:
        out = {"sampler": self.sampler, "steps": self.steps, "nfe": self.nfe, "metrics": self.metrics,
               "nfe_mean": self.nfe_mean, "nfe_max": self.nfe_max,
               "seconds_per_sample": self.seconds_per_sample,
               "seconds_per_nfe": self.seconds_per_sample / max(self.nfe_mean or self.nfe, 1),
               "samples_per_second": 1 / self.seconds_per_sample if self.seconds_per_sample > 0 else None}
        if self.details:
            out["details"] = self.details
        return out


@dataclass
class Comparison:
    protocol: dict
    rows: list[Row]
    notes: list[str]
    skipped: list[dict]

    def as_dict(self) -> dict:
        return {"protocol": self.protocol, "rows": [r.as_dict() for r in self.rows], "notes": self.notes,
                "skipped": self.skipped}


class Skip(Exception):
    """This (sampler, NFE) cell has no sampler; the message says why."""


# ---- evaluation ------------------------------------------------------------------------------------

def make_evaluator(model, eval_model: str | None, device, batch_size: int = 8, local_files_only=None, metric=None,
                   **context):
    """The metric(s) of a comparison: ``metric`` (a name, MODULE:FUNCTION, a function, or a list of them),
    else the metric of the model's task (countdown's figures), else generative perplexity. ``context``
    (``reference=``, ``inception_weights=``) goes to the built-in factories that take it (fid, kid)."""
    from lsdtool.metrics import default_metric, make_metrics

    if metric is None:
        metric = default_metric(model, eval_model)
    return make_metrics(metric, model=model, device=device, eval_model=eval_model, batch_size=batch_size,
                        local_files_only=local_files_only, **context)


# ---- sampler names ---------------------------------------------------------------------------------

def parse_samplers(spec) -> list[str]:
    """Comma-separated (or list of) sampler names, validated; order kept, duplicates dropped."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    out = []
    for name in names:
        head, *suffix = name.split(":")
        if head not in KNOWN:
            raise LsdError(f"unknown sampler {name!r}: use {', '.join(KNOWN)} (lsd/lsd+ take :paper, :teacher-path, "
                           ":temperature, :score, :tweedie suffixes)")
        if suffix and head not in ("lsd", "lsd+"):
            raise LsdError(f"sampler {head!r} takes no ':' options ({name!r})")
        bad = [s for s in suffix if s not in LSD_VARIANTS]
        if bad:
            raise LsdError(f"unknown option {bad[0]!r} in {name!r}: use {', '.join(LSD_VARIANTS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise LsdError("no samplers given")
    return out


def lsd_overrides(name: str, steps: int, teacher_steps: int | None) -> dict:
    """The recipe overrides of an ``lsd``/``lsd+`` row (suffixes set objective, mode, base)."""
    head, *suffix = name.split(":")
    over = {"steps": steps, "plus": head == "lsd+"}
    for s in suffix:
        key, value = LSD_VARIANTS[s]
        if key != "drive":
            over[key] = value
    if teacher_steps is not None:
        over["teacher_steps"] = teacher_steps
    return over


def lsd_base(ctx: "CompareSettings", name: str, nfe: int) -> str:
    """The step rule an ``lsd``/``lsd+`` row's artifact runs: its suffix, else the model's recipe (tau-leaping,
    with its final call, on an image model)."""
    from lsdtool import recipes

    over = {k: v for k, v in lsd_overrides(name, nfe, None).items() if k in ("base", "steps")}
    return str(recipes.effective(ctx.model.name, ctx.recipe_file, over, graph=steprules.graph_name(ctx.model))["base"])


def steps_for(name: str, nfe: int) -> int:
    """Steps that spend ``nfe`` model calls, or :class:`Skip` (entropy-bound: the column, not its cap)."""
    head = name.split(":")[0]
    rule = steprules.RULES.get(head)
    if rule is not None and rule.extra_calls:  # calls that depend on the grid: the plain sampler that spends nfe
        steps = next((k for k in range(1, nfe + 1) if Sampler.plain(k, base=head).nfe == nfe), None)
        if steps is None:
            raise Skip(f"no plain {name} sampler spends exactly {nfe} model calls")
        return steps
    calls = rule.calls if rule is not None else 1
    final = rule.final_calls if rule is not None else 0
    if (nfe - final) % calls or nfe <= final:
        raise Skip(f"{name} makes {calls} model calls per step" + (f" and {final} after the last" if final else "")
                   + f"; NFE {nfe} does not fit")
    if name == "jys" and nfe & (nfe - 1):
        raise Skip(f"jys schedules exist for power-of-two step counts; NFE {nfe} is not one")
    return (nfe - final) // calls


# ---- running ---------------------------------------------------------------------------------------

@dataclass
class CompareSettings:
    """What every cell of one comparison shares: the model, samples, seeds, devices and callbacks."""

    model: object
    n: int
    seed: int
    batch_size: int
    device: torch.device
    evaluator: object
    cache_dir: str | None = None
    teacher_steps: int | None = None  # explicit --teacher-steps (also passed to LSD recipes)
    data: str | None = None
    jys_samples: int = 256
    tune_n: int = 128
    progress: object = None  # callable(description, total) -> advance(k) callback, or None
    log: object = None
    recipe_file: str | None = None
    nfes: list | None = None  # every requested column (entropy-bound tuning stops past twice the largest)

    @property
    def tune_seed(self) -> int:
        return self.seed + TUNE_SEED_OFFSET


def _progress(ctx: CompareSettings, description: str, total: int):
    if ctx.progress is None:
        return lambda k=1: None
    return ctx.progress(description, total)


def draw(ctx: CompareSettings, sampler: Sampler, n: int, seed: int, description: str = "",
         calls: list | None = None) -> tuple[torch.Tensor, float]:
    """Samples 0..n-1 for ``seed`` (CPU tokens) and the wall time spent sampling; ``calls``, when given,
    receives the model calls each sample made ((n,) long)."""
    from lsdtool.api import sample_batches

    advance = _progress(ctx, description, n * sampler.nfe)
    reported = [0]
    counts: list[torch.Tensor] = []
    current: list[torch.Tensor] = []  # the batch being sampled: model calls per sample so far

    def progress(_description, done, _total):
        advance(done - reported[0])
        reported[0] = done

    def on_step(step):
        if not current:
            current.append(torch.zeros(step.x.shape[0], dtype=torch.long))
        current[0][slice(None) if step.rows is None else step.rows.cpu()] += 1

    out = []
    start = time.perf_counter()
    for _, x in sample_batches(ctx.model, sampler, n, seed, batch_size=ctx.batch_size, device=ctx.device,
                               progress=progress, on_step=on_step):
        out.append(x)
        counts.append(current.pop() if current else torch.zeros(x.shape[0], dtype=torch.long))
    seconds = time.perf_counter() - start
    if calls is not None:
        calls.append(torch.cat(counts))
    return torch.cat(out), seconds


def _tune(ctx: CompareSettings, candidates, make, label: str) -> tuple[float, dict]:
    """The candidate whose sampler scores best on the held-out seed (ties: the first listed)."""
    scores = {}
    for c in candidates:
        x, _ = draw(ctx, make(c), ctx.tune_n, ctx.tune_seed, f"tuning {label}={c:g}")
        scores[c] = ctx.evaluator(x)[ctx.evaluator.primary]
    best = min(candidates, key=lambda c: (scores[c], candidates.index(c)))
    return best, {f"tuned_{label}": best, "tuning_scores": {f"{c:g}": scores[c] for c in candidates}}


def cell_sampler(ctx: CompareSettings, name: str, nfe: int, jys_cache: dict) -> tuple[Sampler, dict]:
    """The engine sampler for one (name, NFE) cell and what the row should say about it."""
    model = ctx.model
    head = name.split(":")[0]
    steps = steps_for(lsd_base(ctx, name, nfe) if head in ("lsd", "lsd+") else name, nfe)
    if head in steprules.RULES and not steprules.RULES[head].supports(model):
        raise Skip(f"{head} needs {steprules.RULES[head].requirement()}; {model.name} is {model.graph}")
    if head in ADAPTIVE:
        return _tune_gamma(ctx, nfe, jys_cache.setdefault("_gamma", {}))
    if head in PLAIN:
        return Sampler.plain(steps, base=head), {}
    if head == "euler-temp":
        def make(c):
            return Sampler(Sampler.plain(steps).timesteps, torch.full((steps,), float(c), dtype=torch.float64), "euler", "temperature")
        best, info = _tune(ctx, list(TEMPERATURES), make, "temperature")
        return make(best), info
    if head == "power":
        def make(r):
            return Sampler(power_grid(steps, r, eps=DEFAULT_EPS), torch.ones(steps, dtype=torch.float64), "euler", "score")
        best, info = _tune(ctx, list(RHOS), make, "rho")
        return make(best), info
    if head == "jys":
        if steps not in jys_cache:
            if not jys.supports(model):
                raise Skip(f"jys is implemented for absorbing models; {model.name} is {model.graph}")
            wanted = sorted(s for s in jys_cache.get("_wanted", [steps]) if s not in jys_cache)
            found = jys.load_or_search(model, wanted, cache_dir=ctx.cache_dir, data=ctx.data, n=ctx.jys_samples,
                               seed=JYS_SEED, src_steps=max(JYS_SRC_STEPS, max(wanted)), log=ctx.log,
                               on_interval=_progress(ctx, "jys schedule search", max(wanted) - 1))
            jys_cache.update(found)
        path, sampler = jys_cache[steps]
        return sampler, {"artifact": str(path)}
    from lsdtool import cache

    objective = lsd_overrides(name, steps, None).get("objective")
    problem = objective and distillation.objective_problem(objective, model)
    if problem:
        raise Skip(problem)
    sampler = cache.load_or_distill(model, lsd_overrides(name, steps, ctx.teacher_steps), cache_dir=ctx.cache_dir,
                                    device=ctx.device, recipe_file=ctx.recipe_file, log=ctx.log)
    if sampler.nfe != nfe:
        raise Skip(f"{name} artifact {sampler.path} spends {sampler.nfe} model calls, not {nfe}")
    path = sampler.path
    if "confidence" in name.split(":")[1:]:
        if not steprules.rule("confidence").supports(model):
            raise Skip(f"confidence needs {steprules.rule('confidence').requirement()}; {model.name} is {model.graph}")
        sampler = Sampler(sampler.timesteps, sampler.coeffs, "confidence", sampler.mode, meta=sampler.meta)
    return sampler, {"artifact": str(path)}


def _tune_gamma(ctx: CompareSettings, nfe: int, seen: dict) -> tuple[Sampler, dict]:
    """Entropy-bound at the gamma of :data:`GAMMAS` whose mean NFE on the held-out seed lies nearest
    ``nfe`` (ties: the first listed). The cap is the sequence length (at least one commit per call), so
    the rule is never cut short. Candidates run from the largest gamma (fewest calls) down and stop
    once the mean NFE passes twice the largest requested column (the mean NFE grows as gamma shrinks);
    ``seen`` keeps the measured means across columns."""
    cap = int(ctx.model.seq_len)

    def make(g):
        return Sampler.plain(cap, "entropy-bound", options={"gamma": g})

    limit = 2 * max(ctx.nfes or [nfe])
    for g in GAMMAS:
        if g not in seen:
            if seen and max(seen.values()) > limit:
                break
            calls: list = []
            draw(ctx, make(g), ctx.tune_n, ctx.tune_seed, f"tuning gamma={g:g}", calls)
            seen[g] = calls[0].double().mean().item()
    tried = [g for g in GAMMAS if g in seen]
    best = min(tried, key=lambda g: (abs(seen[g] - nfe), tried.index(g)))
    return make(best), {"tuned_gamma": best, "tuning_nfe": {f"{g:g}": seen[g] for g in tried}}


def _log_row(ctx: CompareSettings, row: Row) -> None:
    if ctx.log is None:
        return
    key = ctx.evaluator.primary
    m = row.metrics
    div, label = getattr(ctx.evaluator, "diversity", ("entropy", "H"))
    ctx.log(f"{row.sampler} NFE {row.nfe}: {key} {se_text(m[key], m.get(key + '_se'))}"
            + (f", {label} {m[div]:.3f}" if div in m else "")
            + (f", realised NFE {row.nfe_mean:.2f} (max {row.nfe_max})" if row.nfe_mean not in (None, row.nfe) else "")
            + f" ({row.seconds_per_sample * 1000:.1f} ms/sample{', cached' if row.details.get('cached') else ''})")


PREVIEW = 16  # samples per cell of an image model's --plot grid


def _preview(model, x: torch.Tensor) -> torch.Tensor | None:
    """Pixels (k, H, W, C) of the first :data:`PREVIEW` samples of an image model (one with ``shape``), else None."""
    if getattr(model, "shape", None) is None:
        return None
    from lsdtool import images

    return images.samples_to_images(model, x[:PREVIEW])


def teacher_row(ctx: CompareSettings, steps: int) -> Row:
    """The teacher reference row (the model's distillation base rule, Euler on text, ``steps`` steps). Its result is kept in the cache under
    compare/, keyed by everything it depends on, so a second identical run does not sample it again;
    such a row says ``details.cached`` and carries the timing of the run that measured it."""
    from lsdtool import cache
    from lsdtool.version import __version__
    from lsdtool.locations import cache_root

    key_src = {"model": ctx.model.fingerprint, "steps": steps, "n": ctx.n, "seed": ctx.seed,
               "metric": getattr(ctx.evaluator, "identity", ctx.evaluator.name),
               "dtype": ctx.evaluator.dtype, "version": __version__, "row": 1}
    base = teacher_base(ctx.model)
    if base != "euler":
        key_src["base"] = base
    path = cache.record_path("compare", "teacher", key_src, cache_root(ctx.cache_dir))
    sampler = Sampler.plain(steps, base)
    saved = cache.read_record(path, key_src)
    image = getattr(ctx.model, "shape", None) is not None
    if saved and "metrics" in saved and "seconds_per_sample" in saved and (not image or "preview" in saved):
        preview = torch.tensor(saved["preview"], dtype=torch.uint8) if image else None
        return Row("teacher", steps, sampler.nfe, saved["metrics"], saved["seconds_per_sample"],
                   {"reference": True, "cached": str(path)}, sampler.nfe, sampler.nfe, preview)
    x, seconds = draw(ctx, sampler, ctx.n, ctx.seed, f"teacher ({steps} steps)")
    row = Row("teacher", steps, sampler.nfe, ctx.evaluator(x), seconds / ctx.n, {"reference": True}, sampler.nfe, sampler.nfe,
              _preview(ctx.model, x))
    fields = {"metrics": row.metrics, "seconds_per_sample": row.seconds_per_sample}
    if row.preview is not None:  # a few samples' pixels, so a cached teacher still shows in --plot
        fields["preview"] = row.preview.tolist()
    cache.write_record(path, key_src, fields)
    return row


def teacher_base(model) -> str:
    """The step rule of the teacher: the base of the model's recipe on its graph (Euler unless the graph needs another)."""
    from lsdtool import recipes
    from lsdtool.diffusion import graph_of

    return str(recipes.effective(model.name, graph=graph_of(model).name)["base"])


def teacher_steps_default(model, recipe_file: str | None = None) -> int:
    """The teacher steps of the model's recipe (what its LSD artifacts were distilled from)."""
    from lsdtool import recipes

    return int(recipes.effective(model.name, recipe_file)["teacher_steps"])


def run(model, samplers, nfes, *, n: int = 256, seed: int = 0, teacher_steps: int | None = None, batch_size: int = 64,
        device=None, evaluator=None, cache_dir=None, data: str | None = None, teacher: bool = True,
        tune_n: int | None = None, jys_samples: int = 256, recipe_file: str | None = None, progress=None,
        log=None, metric=None) -> Comparison:
    """Run every (sampler, NFE) cell plus the teacher reference row; returns rows (no rendering).

    ``metric``: what to score each cell's samples (B, L) with when no ``evaluator`` is given: a
    built-in name (``countdown``, ``gen-ppl``), ``"MODULE:FUNCTION"``, a function returning per-sample
    values (B,) or a dict of them, or a list of these (see :func:`lsdtool.metrics.make_metrics`).
    """
    from lsdtool.version import __version__
    from lsdtool.generation import pick_device

    dev = device if isinstance(device, torch.device) else pick_device(device)
    names = parse_samplers(samplers)
    nfes = sorted({int(k) for k in nfes})
    if not nfes or nfes[0] < 1:
        raise LsdError("NFE values must be positive integers")
    if n < 1:
        raise LsdError("-n must be at least 1")
    if any(name == "jys" for name in names) and not data and not jys.task_data(model) and jys.supports(model):
        raise LsdError(f"jys needs clean data for {model.name}: pass --data FILE (jsonl of token ids)")
    evaluator = evaluator or make_evaluator(model, None, dev, metric=metric)
    ctx = CompareSettings(model, n, seed, batch_size, dev, evaluator, cache_dir, teacher_steps, data, jys_samples,
                          tune_n or min(n, 128), progress, log, recipe_file, nfes)
    n_teacher = teacher_steps or teacher_steps_default(model, recipe_file)
    rows, skipped, notes = [], [], []
    jys_cache: dict = {"_wanted": [k for k in nfes if k & (k - 1) == 0]}
    for name in names:
        for nfe in nfes:
            try:
                sampler, details = cell_sampler(ctx, name, nfe, jys_cache)
            except Skip as why:
                skipped.append({"sampler": name, "nfe": nfe, "reason": str(why)})
                continue
            calls: list = []
            x, seconds = draw(ctx, sampler, n, seed, f"{name} NFE {nfe}", calls)
            rows.append(Row(name, sampler.steps, nfe, evaluator(x), seconds / n, details,
                            calls[0].double().mean().item(), int(calls[0].max()), _preview(model, x)))
            _log_row(ctx, rows[-1])
    if teacher:
        rows.append(teacher_row(ctx, n_teacher))
        _log_row(ctx, rows[-1])
    notes += _notes(model, names, rows, skipped, ctx)
    protocol = {
        "model": model.name, "model_fingerprint": model.fingerprint, "graph": str(model.graph), "noise": model.noise.describe(),
        "n": n, "seed": seed, "sample_indices": f"0..{n - 1}", "teacher_steps": n_teacher, "teacher_sampler": teacher_base(model),
        "nfe": nfes, "samplers": names, "metric": evaluator.primary, "eval_model": evaluator.name,
        "diversity": {"key": evaluator.diversity[0], "label": evaluator.diversity[1]},
        "eval_dtype": evaluator.dtype, "device": str(dev), "batch_size": batch_size, "tune_seed": ctx.tune_seed,
        "tune_n": ctx.tune_n, "lsdtool_version": __version__, "torch_version": torch.__version__,
    }
    if recipe_file:
        protocol["recipe"] = str(recipe_file)
    if hasattr(evaluator, "headlines"):
        protocol["headlines"] = evaluator.headlines
    image_protocols = [m.protocol for m in getattr(evaluator, "metrics", [evaluator]) if hasattr(m, "protocol")]
    if image_protocols:  # FID/KID: features, reference, KID subsets
        protocol["image_metrics"] = image_protocols
    if any(isinstance(m, TextEval) for m in getattr(evaluator, "metrics", [evaluator])):
        import transformers

        protocol["transformers_version"] = transformers.__version__
        protocol["perplexity"] = "exp(mean NLL over all B*(L-1) tokens, ids scored as sampled, no BOS)"
    if "jys" in names:
        protocol["jys"] = {"data": data or "countdown.generate", "samples": jys_samples, "seed": JYS_SEED,
                           "src_steps": max([JYS_SRC_STEPS, *nfes]), "klub": "released"}
    return Comparison(protocol, rows, notes, skipped)


def _notes(model, names, rows, skipped, ctx) -> list[str]:
    notes = []
    plain_heads = {n.split(":")[0] for n in names}
    if {"euler", "tweedie"} <= plain_heads and graph_of(model).absorbing and model.noise.name == "loglinear":
        notes.append("tweedie ≡ euler for absorb + loglinear (identical step probabilities; the rows match up to "
                     "floating-point ties)")
    if "theta-trapezoidal" in plain_heads:
        notes.append("theta-trapezoidal (θ = 1/2) makes 2 model calls per step: NFE K uses K/2 steps")
    if "euler-temp" in plain_heads:
        notes.append(f"euler-temp: one global inverse temperature Φ (temperature mode) picked from "
                     f"{', '.join(map(str, TEMPERATURES))} by the metric on held-out seed {ctx.tune_seed} "
                     f"(n = {ctx.tune_n}), never the evaluation seed")
    if "power" in plain_heads:
        notes.append(f"power: grid τ_k = ε + (1 − ε)(1 − k/M)^ρ, ρ picked from {', '.join(map(str, RHOS))} by the "
                     f"metric on held-out seed {ctx.tune_seed} (n = {ctx.tune_n})")
    if "jys" in plain_heads:
        notes.append(f"jys: Euler on the Jump-Your-Steps grid (KLUB golden-section search on {ctx.jys_samples} clean "
                     "samples, cached)")
    if plain_heads & set(UNFAITHFUL) or any("confidence" in n.split(":")[1:] for n in names):
        notes.append("confidence and entropy-bound do not sample the model's distribution: they commit the positions "
                     "the model is surest of, trading diversity for per-token quality (see the diversity figure "
                     f"{ctx.evaluator.diversity[1]} beside each cell)")
    if "entropy-bound" in plain_heads:
        notes.append(f"entropy-bound: model calls vary per sample; each cell shows the realised mean (max) NFE, with "
                     f"gamma picked from {', '.join(f'{g:g}' for g in GAMMAS)} so that the mean NFE on held-out seed "
                     f"{ctx.tune_seed} (n = {ctx.tune_n}) lies nearest the column")
    if ctx.evaluator.diversity[0] == "diversity":
        notes.append("H pos: mean over positions of the entropy (nats) of the token across samples; it is at most "
                     "log(number of distinct samples), so it drops to 0 when a sampler collapses onto one sequence")
    if any(n.split(":")[0] in ("lsd", "lsd+") for n in names):
        notes.append("lsd/lsd+: distilled artifacts from the cache (distilled on a miss) with the model's recipe")
    for s in skipped:
        notes.append(f"skipped {s['sampler']} at NFE {s['nfe']}: {s['reason']}")
    return notes


def se_text(value: float, se: float | None) -> str:
    """'value ± se' with digits that fit the standard error; the value alone where the metric has no s.e. (None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    digits = 4 if not se or se <= 0 else max(1, min(6, 1 - int(math.floor(math.log10(se)))))
    if abs(value) >= 100:
        digits = min(digits, 1)
    return f"{value:.{digits}f}" if se is None else f"{value:.{digits}f} ± {se:.{digits}f}"
