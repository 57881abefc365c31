"""Quality metrics: the countdown error figures (DESIGN §9), text metrics (§11) and the registry that also
names the image metrics of :mod:`lsdtool.metrics_image` (FID, KID)."""

from __future__ import annotations

import torch


def countdown_errors(x: torch.Tensor) -> dict[str, float]:
    """The three countdown figures for samples x (B, L), averaged over samples.

    ``error`` (JYS): walking left to right with prev = x[0], token j is wrong when prev != 0 and
    x[j] != prev - 1, and then prev resets to 0; mean over samples of wrong / L.
    ``break_rate``: fraction of transitions breaking the rule, without the reset.
    ``valid``: fraction of sequences with no break at all.
    """
    return {k: v.mean().item() for k, v in countdown_error_rows(x).items()}


def countdown_error_rows(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample countdown figures (B,) float64: ``error``, ``break_rate`` and ``valid`` (0/1);
    their means are :func:`countdown_errors`."""
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
        "error": wrong.sum(-1).double() / l,
        "break_rate": breaks[:, 1:].sum(-1).double() / (l - 1),
        "valid": (breaks.sum(-1) == 0).double(),
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


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for n < 2)."""
    v = values.detach().double().reshape(-1)
    n = v.numel()
    if n == 0:
        return float("nan"), float("nan")
    se = (v.std(unbiased=True) / n**0.5).item() if n > 1 else 0.0
    return v.mean().item(), se


def unigram_entropy(x: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Per-sample entropy (nats) of the empirical token distribution of each row: (B, L) -> (B,) float64."""
    x = x.long()
    v = int(vocab_size or int(x.max().item()) + 1)
    counts = torch.zeros(x.shape[0], v, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, x, torch.ones_like(x, dtype=torch.float64))
    p = counts / x.shape[1]
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def position_entropy(x: torch.Tensor) -> float:
    """Diversity across samples: the mean over positions j of the entropy (nats) of the empirical
    distribution of x[:, j] over the B samples; x (B, L). At most log(number of distinct rows), so it
    is 0 when every sample is the same sequence."""
    x = x.long()
    b, l = x.shape
    v = int(x.max().item()) + 1
    counts = torch.zeros(l, v, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, x.t(), torch.ones(l, b, dtype=torch.float64, device=x.device))
    p = counts / b
    return (-(p * p.clamp_min(1e-300).log()).sum(-1)).mean().item()


def load_eval_model(name: str, device="cpu", local_files_only: bool | None = None):
    """A Hugging Face causal LM in float32 for generative perplexity (from the HF cache when offline)."""
    import os

    from transformers import AutoModelForCausalLM

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.path.isdir(name)
    try:
        lm = AutoModelForCausalLM.from_pretrained(name, local_files_only=local_files_only, torch_dtype=torch.float32)
    except OSError as exc:
        from lsdtool.errors import LsdError

        where = "a local directory or the Hugging Face cache" if local_files_only else "the Hugging Face hub"
        raise LsdError(f"cannot load evaluator {name!r} from {where}: download it first "
                       f"(huggingface-cli download {name}) ({str(exc).splitlines()[0][:160]})") from None
    return lm.to(device).eval()


def sequence_nll(x: torch.Tensor, lm, batch_size: int = 8) -> torch.Tensor:
    """Per-sample NLL (nats) of tokens 1..L-1 of each row under the causal LM ``lm``, scoring the ids
    as they are (no retokenising, no BOS): (B, L) -> (B, L-1) float64."""
    vocab = lm.get_output_embeddings().weight.shape[0] if lm.get_output_embeddings() is not None else lm.config.vocab_size
    if int(x.max().item()) >= vocab:
        from lsdtool.errors import LsdError

        raise LsdError(f"sampled token id {int(x.max().item())} is outside the evaluator's vocabulary ({vocab})")
    dev = next(lm.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            ids = x[start : start + batch_size].long().to(dev)
            logits = lm(input_ids=ids).logits[:, :-1].double()
            nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            out.append(nll.cpu())
    return torch.cat(out)


def generative_perplexity(x: torch.Tensor, lm, batch_size: int = 8, vocab_size: int | None = None) -> dict[str, float]:
    """Generative perplexity of samples x (B, L) under ``lm`` with the unigram entropy beside it.

    ``gen_ppl`` = exp(mean NLL over all B (L-1) scored tokens); ``gen_ppl_per_sample`` = mean over samples
    of exp(mean NLL of the sample); ``entropy`` = mean per-sample unigram entropy (nats). Standard errors
    (``*_se``) are over samples (delta method for ``gen_ppl``).
    """
    import math

    nll = sequence_nll(x, lm, batch_size)
    per_sample = nll.mean(-1)  # every sample scores L-1 tokens, so the overall mean is the mean of these
    m, se = mean_se(per_sample)
    ps_mean, ps_se = mean_se(per_sample.exp())
    ent, ent_se = mean_se(unigram_entropy(x, vocab_size))
    return {"gen_ppl": math.exp(m), "gen_ppl_se": math.exp(m) * se, "nll": m, "nll_se": se,
            "gen_ppl_per_sample": ps_mean, "gen_ppl_per_sample_se": ps_se, "entropy": ent, "entropy_se": ent_se}


# ---- the metric registry: what ``lsd compare --metric`` names --------------------------------------

class PerSampleMetric:
    """A metric from a function of the samples x (B, L) -> per-sample values (B,) or a dict of them.

    Each figure is reported as its mean with the standard error over samples (``<key>`` and
    ``<key>_se``); the headline is ``primary`` (the first figure when not given). ``spec`` names the
    function in error messages; ``identity`` changes whenever the function's source file does, so
    cached results are never reused across edits.
    """

    dtype = "float64"
    diversity = ("diversity", "H pos")  # figure key, table label: position_entropy of the cell's samples

    def __init__(self, fn, spec: str, figure: str, primary: str | None = None, identity: str | None = None):
        self.fn, self.spec, self.figure = fn, spec, figure
        self.name, self.identity = spec, identity or spec
        self._primary = primary

    @property
    def primary(self) -> str:
        return self._primary or self.figure

    def __call__(self, x: torch.Tensor) -> dict:
        from lsdtool.errors import LsdError, first_line

        try:
            out = self.fn(x)
        except Exception as e:
            raise LsdError(f"metric {self.spec} failed on samples of shape {tuple(x.shape)}: "
                           f"{first_line(e, with_type=True)}") from None
        figures = out if isinstance(out, dict) else {self.figure: out}
        if not figures:
            raise LsdError(f"metric {self.spec} returned an empty dict")
        result = {}
        for key, values in figures.items():
            try:
                v = torch.as_tensor(values.detach().cpu() if isinstance(values, torch.Tensor) else values,
                                    dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise LsdError(f"metric {self.spec} returned {type(values).__name__} for {key!r}; expected "
                               f"{x.shape[0]} numbers (one per sample)") from None
            if tuple(v.shape) != (x.shape[0],):
                raise LsdError(f"metric {self.spec} returned shape {tuple(v.shape)} for {key!r}; expected "
                               f"({x.shape[0]},), one value per sample")
            result[str(key)], result[f"{key}_se"] = mean_se(v)
        result.setdefault("diversity", position_entropy(x))
        if self._primary is None or self._primary not in result:
            self._primary = str(next(iter(figures)))
        return result


class TextEval:
    """Generative perplexity under a causal LM (float32, ids scored as sampled) with unigram entropy."""

    primary = "gen_ppl"
    dtype = "float32"
    diversity = ("entropy", "H")

    def __init__(self, name: str, device, vocab_size: int, batch_size: int = 8, local_files_only=None):
        self.name, self.vocab_size, self.batch_size = name, vocab_size, batch_size
        self.identity = name
        self.lm = load_eval_model(name, device, local_files_only)

    def __call__(self, x: torch.Tensor) -> dict:
        return generative_perplexity(x, self.lm, self.batch_size, self.vocab_size)


class MetricSet:
    """Several metrics on the same samples: their figures merged; the headline is the first metric's."""

    def __init__(self, metrics: list):
        self.metrics = metrics
        self.name = " + ".join(m.name for m in metrics)
        self.identity = " + ".join(m.identity for m in metrics)
        self.dtype = metrics[0].dtype
        self.diversity = metrics[0].diversity

    @property
    def primary(self) -> str:
        return self.metrics[0].primary

    @property
    def headlines(self) -> list[str]:
        return [m.primary for m in self.metrics]

    def __call__(self, x: torch.Tensor) -> dict:
        from lsdtool.errors import LsdError

        out: dict = {}
        for m in self.metrics:
            figures = m(x)
            div = getattr(m, "diversity", ("diversity",))[0]
            if div in out:  # the diversity figure each metric adds: the first one stands
                figures.pop(div, None)
                figures.pop(f"{div}_se", None)
            clash = sorted(set(figures) & set(out))
            if clash:
                raise LsdError(f"metrics {self.name} both report {clash[0]!r}; name the figures apart")
            out.update(figures)
        return out


def countdown_metric(**_) -> PerSampleMetric:
    """The three countdown figures of DESIGN §9; ``error`` (JYS) is the headline."""
    return PerSampleMetric(countdown_error_rows, "countdown-rule", "error", primary="error")


def gen_ppl_metric(*, model, device, eval_model=None, batch_size: int = 8, local_files_only=None, **_) -> TextEval:
    """Generative perplexity under ``eval_model`` (default gpt2-large) with unigram entropy (DESIGN §11)."""
    return TextEval(eval_model or "gpt2-large", device, model.vocab_size, batch_size, local_files_only)


def plugin_factory(spec: str):
    """A built-in metric factory that lives in a module of its own (``MODULE:FACTORY``), imported on first use
    like a user's metric, so that module may build on this one (image metrics: :mod:`lsdtool.metrics_image`)."""

    def factory(**context):
        import importlib

        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)(**context)

    factory.__doc__ = f"The metric of {spec}."
    return factory


# name -> factory(model=, device=, eval_model=, batch_size=, local_files_only=, reference=, inception_weights=) -> metric
BUILTIN_METRICS = {"countdown": countdown_metric, "gen-ppl": gen_ppl_metric,
                   "fid": plugin_factory("lsdtool.metrics_image:fid_metric"),
                   "kid": plugin_factory("lsdtool.metrics_image:kid_metric"),
                   "fd-digits": plugin_factory("lsdtool.metrics_digits:fd_digits_metric"),
                   "kid-digits": plugin_factory("lsdtool.metrics_digits:kid_digits_metric")}


def resolve_metric(spec: str, **context):
    """One metric: a built-in name (``countdown``, ``gen-ppl``) or a user's MODULE:FUNCTION."""
    from lsdtool.errors import LsdError

    if not isinstance(spec, str) and callable(spec):  # the API may pass the function itself
        name = getattr(spec, "__qualname__", None) or type(spec).__name__
        return PerSampleMetric(spec, f"{getattr(spec, '__module__', '?')}:{name}", getattr(spec, "__name__", "value"),
                               identity=f"callable:{id(spec)}")
    spec = str(spec).strip()
    if spec in BUILTIN_METRICS:
        return BUILTIN_METRICS[spec](**context)
    if ":" not in spec:
        raise LsdError(f"unknown metric {spec!r}: use {', '.join(BUILTIN_METRICS)} or MODULE:FUNCTION")
    from lsdtool.plugins import import_object

    fn, digest = import_object(spec, "metric", f"{', '.join(BUILTIN_METRICS)} or MODULE:FUNCTION")
    return PerSampleMetric(fn, spec, spec.rpartition(":")[2], identity=f"{spec}@{digest}")


TASK_METRICS = {"countdown": "countdown", "digits": "fd-digits"}  # a model's task -> the metric compare uses by default


def default_metric(model, eval_model: str | None = None) -> str:
    """The metric of the model's task (unless an evaluation LM is named), else generative perplexity."""
    task_metric = TASK_METRICS.get(getattr(model, "task", None))
    return task_metric if task_metric and not eval_model else "gen-ppl"


def make_metrics(specs, **context):
    """A metric (or :class:`MetricSet`) from one spec or a list of them; ``context`` goes to built-in factories."""
    from lsdtool.errors import LsdError

    specs = [specs] if isinstance(specs, str) or callable(specs) else list(specs)
    if not specs:
        raise LsdError("no metric given")
    metrics = [resolve_metric(s, **context) for s in specs]
    return metrics[0] if len(metrics) == 1 else MetricSet(metrics)
