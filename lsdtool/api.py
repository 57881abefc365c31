"""The Python API: load a model, distil a sampler (cached like ``lsd distill``), draw samples
(identical to ``lsd sample``). The command line is a client of these functions.

Nothing here prints: progress goes to an optional ``progress(description, completed, total)``
callback, notes to an optional ``log(message)`` callback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from lsdtool import conditioning, console, recipes, steprules
from lsdtool.errors import LsdError
from lsdtool.samplers import Sampler

Progress = Callable[[str, float, float], None]


def load_model(name_or_path: str, device=None, offline: bool | None = None, trust_remote_code: bool = False):
    """A model by registry name, hub id, local directory, MODULE:FACTORY (a module or a .py file and a function
    returning a DiffusionModel) or a name given to ``lsdtool.models.register``, on ``device`` (None or "auto":
    CUDA when present); ``trust_remote_code`` lets a transformers model run the code it ships."""
    from lsdtool import generation, models

    return models.load(name_or_path, device=generation.pick_device(device), offline=offline,
                       trust_remote_code=trust_remote_code)


def distill(model, steps: int | None = None, plus: bool | None = None, *, cache: bool = True, cache_dir=None,
            recipe: str | Path | dict | None = None, refit: bool = False, device=None, progress: Progress | None = None,
            log: Callable[[str], None] | None = None, **recipe_keys) -> Sampler:
    """Distil an LSD (``plus``: LSD+) sampler with ``steps`` steps for ``model``; any recipe key is a keyword
    (``objective=``, ``teacher_steps=``, ...). Effective recipe: defaults <- the model's shipped recipe (or
    ``recipe``: a TOML file or a dict) <- keywords, exactly as ``lsd distill``. With ``cache`` the artifact is
    looked up in (and written to) the same cache file as ``lsd distill`` uses; the returned sampler carries
    ``.path`` (None without cache), ``.fit`` (the fit report) and ``.meta``."""
    from lsdtool import artifacts, generation
    from lsdtool import cache as artifact_cache
    from lsdtool import distillation

    overrides = {"steps": steps, "plus": plus, **recipe_keys}
    recipe_file, recipe_dict = (None, recipe) if isinstance(recipe, dict) else (recipe, None)
    dev = generation.pick_device(device) if device is not None else getattr(model, "device", None)
    with console.reporting(progress):
        if cache:
            return artifact_cache.load_or_distill(model, overrides, cache_dir=cache_dir, refit=refit, device=dev,
                                                  recipe_file=recipe_file, recipe=recipe_dict, log=log)
        if recipe_dict is not None:
            overrides = {**recipe_dict, **{k: v for k, v in overrides.items() if v is not None}}
        effective = recipes.effective(model.name, recipe_file, overrides, graph=steprules.graph_name(model))
        result = distillation.distill(model, effective, device=dev)
    sampler = result.sampler
    sampler.meta = artifacts.metadata(model, sampler, effective, recipes.to_toml(effective), result.fit)
    return sampler


def block_recipe(gen_length: int | None, block_length: int | None = None, prompts: str | Path | None = None,
                 base: str | None = None, teacher_steps: int | None = None, steps: int | None = None) -> dict:
    """Recipe keys of block-schedule distillation (``lsd distill --gen-length ... --prompts ...``): the lengths, the
    prompts file and its digest (part of the cache key); the teacher commits one token per step and the rule is
    ``confidence`` unless said otherwise. {} without a gen length."""
    if gen_length is None:
        if prompts is not None or block_length is not None:
            raise LsdError("--prompts and --block-length need --gen-length")
        return {}
    keys = {"gen_length": int(gen_length), "block_length": int(block_length or gen_length),
            "base": base or "confidence", "teacher_steps": teacher_steps or int(gen_length)}
    from lsdtool.grids import blocks_problem

    for n, who in ((steps, "student"), (keys["teacher_steps"], "teacher")):
        problem = blocks_problem(keys, n)
        if problem:
            raise LsdError(f"{who}: {problem}")
    if prompts is not None:
        import hashlib

        keys["prompts"] = str(Path(prompts).resolve())
        keys["prompts_digest"] = hashlib.sha256(Path(prompts).read_bytes()).hexdigest()[:16]
    return keys


def load_artifact(path: str | Path, model_name: str | None = None, device=None, offline: bool | None = None,
                  force: bool = False, trust_remote_code: bool = False):
    """(model, sampler) of an artifact: the model it names (or ``model_name``), loaded on ``device``, and the
    sampler checked to fit it (``force`` accepts one distilled for another model of the same graph)."""
    sampler = Sampler.load(path)
    source = model_name or sampler.meta.get("model_source") or sampler.meta.get("model")
    if not source:
        raise LsdError(f"{path} is a plain sampler that names no model; say which model to use (--model)")
    from lsdtool.models.locate import UnknownModel

    try:
        model = load_model(source, device=device, offline=offline, trust_remote_code=trust_remote_code)
    except UnknownModel:
        if model_name:
            raise
        raise LsdError(f"{path} was made for model {source!r}, which is neither built in nor registered now: register "
                       "it first (lsdtool.models.register), or say which model to use (--model)") from None
    return model, Sampler.load(path, model=model, force=force)


def check_layout(sampler: Sampler, gen_length: int | None, block_length: int | None) -> None:
    """LsdError unless a sampler made for a gen/block length is used with the same ones."""
    options = sampler.options
    for key, value in (("gen_length", gen_length), ("block_length", block_length)):
        have = options.get(key) if key == "gen_length" else options.get(key, options.get("gen_length"))
        if value is not None and have != value:
            what = key.replace("_", " ")
            raise LsdError(f"this sampler was distilled for {what} {have}, not {value}; distil one for {value}")


def prompted(model, sampler: Sampler, prompt: str | None = None, prompts: str | Path | None = None, chat: bool = False):
    """The fixed prompt tokens of ``--prompt`` (every sample) or ``--prompts`` (jsonl, one per sample) before the
    sampler's ``gen_length`` generated tokens, as :class:`lsdtool.conditioning.Conditions` (None without a
    prompt); sets the model's sequence length to prompt + gen length."""
    from lsdtool import prompts as prompting

    gen = sampler.options.get("gen_length")
    if gen is None:
        raise LsdError("prompted generation needs a sampler with a gen_length")
    return prompting.prompted(model, int(gen), prompt, None if prompts is None else str(prompts), chat)


def conditions(model, prefix: str | None = None, suffix: str | None = None, input: str | Path | None = None,
               image: str | Path | None = None, keep: str | Path | None = None):
    """The fixed tokens of ``--prefix``/``--suffix`` (every sample), ``--input`` (jsonl, line k for sample k) or
    ``--image``/``--keep`` (inpainting: PNGs, see :func:`lsdtool.images.inpaint_conditions`), as a
    :class:`lsdtool.conditioning.Conditions`, or None when nothing is fixed."""
    if input is not None and (prefix is not None or suffix is not None):
        raise ValueError("give input, or prefix/suffix, not both")
    if image is not None or keep is not None:
        if image is None or keep is None or input is not None or prefix is not None or suffix is not None:
            raise ValueError("inpainting needs image and keep, and no input, prefix or suffix")
        from lsdtool import images

        return images.inpaint_conditions(model, image, keep)
    if input is not None:
        return conditioning.read_input(model, str(input))
    return conditioning.from_text(model, prefix, suffix)


def sample_count(n: int | None, fixed, input=None) -> int:
    """How many samples to draw: ``n``, by default 16 or one per line of ``input`` (never more than it has)."""
    if n is None:
        return len(fixed) if input is not None else 16
    if n < 0:
        raise ValueError(f"n must not be negative, got {n}")
    if input is not None and n > len(fixed):
        raise ValueError(f"-n {n} asks for more samples than {input} has lines ({len(fixed)})")
    return n


def sample_batches(model, sampler: Sampler, indices, seed: int = 0, *, batch_size: int | str = 64, device=None,
                   conditions=None, progress: Progress | None = None,
                   on_step=None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (global sample ids, tokens (b, L) LongTensor on CPU) batch by batch for the sample ids ``indices``
    (an int n means 0..n-1): memory stays bounded by ``batch_size`` however many samples are drawn. Sample i
    depends only on (sampler, seed, i), never on the batching; ``batch_size="auto"`` sizes the batches from the
    free memory and halves one that runs out of it. ``conditions``: see :func:`conditions`.
    ``on_step`` is called with every :class:`lsdtool.samplers.Step` (one per model call) of the batch being drawn."""
    from lsdtool import generation

    if isinstance(indices, int):
        indices = range(indices)
    elif not isinstance(indices, range):  # a range stays one: never n index objects in memory
        indices = [int(i) for i in indices]
    if batch_size != "auto" and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be at least 1 or 'auto', got {batch_size!r}")
    top = (max(indices[0], indices[-1]) if isinstance(indices, range) else max(indices)) if len(indices) else -1
    if conditions is not None and len(conditions) > 1 and top >= len(conditions):
        raise ValueError(f"sample {top} asked for, but the input has {len(conditions)} lines")
    dev = torch.device(device) if device is not None else getattr(model, "device", torch.device("cpu"))
    if device is not None and dev != getattr(model, "device", None):
        model.to(dev)
    total, done = len(indices) * sampler.nfe, 0

    def each_step(step):
        nonlocal done
        done += step.log_score.shape[0]  # the samples this call was made for
        if progress is not None:
            progress("sampling", done, total)
        if on_step is not None:
            on_step(step)

    yield from generation.batches(model, sampler, indices, seed, batch_size, dev, each_step, conditions)


def sample(model, sampler: Sampler, n: int | None = None, seed: int = 0, *, batch_size: int | str = 64, device=None,
           prefix: str | None = None, suffix: str | None = None, input: str | Path | None = None,
           prompt: str | None = None, prompts: str | Path | None = None, chat: bool = False,
           progress: Progress | None = None) -> torch.LongTensor:
    """Samples 0..n-1 as an (n, L) LongTensor on CPU, identical to ``lsd sample ... -n n --seed seed``.
    ``sampler`` is a :class:`Sampler` (``Sampler.plain(8)``, ``Sampler.load(path)``, :func:`distill`) or an
    artifact path; ``n`` defaults to 16, or one per line of ``input`` (``prompts``). With a sampler that has a
    ``gen_length``, ``prompt``/``prompts``/``chat`` are as :func:`prompted` (rows: prompt then generated tokens)."""
    if isinstance(sampler, (str, Path)):
        sampler = Sampler.load(sampler, model=model)
    if sampler.options.get("gen_length"):
        fixed, input = prompted(model, sampler, prompt, prompts, chat), prompts
    else:
        fixed = conditions(model, prefix, suffix, input)
    n = sample_count(n, fixed, input)
    out = [x for _, x in sample_batches(model, sampler, n, seed, batch_size=batch_size, device=device,
                                        conditions=fixed, progress=progress)]
    return torch.cat(out) if out else torch.empty(0, model.seq_len, dtype=torch.long)


__all__ = ["Sampler", "conditions", "distill", "load_artifact", "load_model", "sample", "sample_batches"]
