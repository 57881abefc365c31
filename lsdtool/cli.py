"""The ``lsd`` command line: parsing and rendering only (DESIGN §8). Heavy imports stay lazy."""

from __future__ import annotations

import os
import sys

import click

from lsdtool import bounds, steprules
from lsdtool.grids import MODES


class LsdGroup(click.Group):
    """Turns expected failures into one line on stderr and exit 1; Ctrl-C into exit 130, SIGTERM
    into exit 143 (both after cleaning up temp files); a closed stdout pipe into a quiet exit 0."""

    def invoke(self, ctx):
        from lsdtool import faults
        from lsdtool.errors import LsdError, describe, first_line

        try:
            with faults.terminate_as_exception():
                return super().invoke(ctx)
        except BrokenPipeError:  # the reader (e.g. `| head`) has what it wanted; 0 keeps `set -o pipefail` scripts going
            faults.silence_stdout()
            ctx.exit(0)
        except OSError as exc:  # disk full, quota, read-only, permissions, ...
            raise click.ClickException(describe(exc)) from None
        except (LsdError, ValueError) as exc:
            raise click.ClickException(first_line(exc)) from None
        except (MemoryError, RuntimeError) as exc:
            if not faults.out_of_memory(exc):
                raise
            raise click.ClickException(faults.out_of_memory(exc)) from None
        except faults.Terminated:
            click.echo("terminated", err=True)
            ctx.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=LsdGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "LSD"})
@click.version_option(package_name="lsdtool")
def main():
    """Distil, sample, inspect and compare few-step samplers for discrete diffusion models."""


device_option = click.option("--device", default="auto", show_default=True, callback=bounds.device_name,
                             help="torch device (auto: CUDA when present).")
MODEL_HELP = ("Model: registry name (lsd models), hub id, local directory, or your own as MODULE:FACTORY "
              "(a module or .py file and a function returning a DiffusionModel).")
offline_option = click.option("--offline", is_flag=True, default=None, help="Never touch the network (also HF_HUB_OFFLINE=1).")


@main.command()
@click.option("--model", "model_name", help=MODEL_HELP)
@click.option("--sampler", "sampler_path", type=click.Path(dir_okay=True), help="Distilled sampler artifact (.safetensors); it names the model.")
@click.option("--steps", type=int, callback=bounds.steps_range, help="Number of steps of a plain sampler.")
@click.option("--base", type=click.Choice(steprules.NAMES), default=None, help="Step rule  [default: euler; confidence with --gen-length]")
@click.option("--gamma", type=float, help="entropy-bound: joint-entropy budget per step  [default: 0.1]; --steps caps the calls.")
@click.option("--temperature", type=float, help="confidence, entropy-bound: candidate temperature  [default: 1]; 0: greedy (argmax; also count)")
@click.option("--margin", is_flag=True, help="confidence: rank by top-1 minus top-2 probability instead of the drawn token's.")
@click.option("--even", is_flag=True, help="count, confidence: commit an even share of the masks per step (LLaDA's split) instead of following the noise schedule.")
@click.option("--denoise", is_flag=True, help="Add SEDD's final denoise step (one more NFE).")
@click.option("-n", "num", type=int, callback=bounds.count_range, help="Number of samples  [default: 16, or one per --input line]")
@click.option("--seed", type=int, default=0, show_default=True, callback=bounds.seed_range, help="0..2**64-1.")
@click.option("--batch-size", default="64", show_default=True, callback=bounds.batch_size,
              help="Samples per batch, or auto: from the free memory, halved where a batch does not fit.")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl", "tokens", "png"]), default="text", show_default=True,
              help="png (image models): -o GRID.png for one grid, -o DIR/ for one PNG per sample.")
@click.option("-o", "--output", type=click.Path(), help="Write samples here instead of stdout (png: a file, or DIR/).")
@click.option("--force", is_flag=True, help="Override a safety refusal: use an artifact distilled for another model; "
              "replace a non-empty -o FILE.")
@click.option("--shard", "shard_spec", metavar="I/N", help="Draw only block I of N of the indices 0..n-1 (default: from RANK/WORLD_SIZE or SLURM).")
@click.option("--resume", is_flag=True, help="Keep the complete samples already in -o FILE (jsonl) or -o DIR/ (png) and draw the rest.")
@click.option("--prefix", help="Text every sample starts with (kept fixed).")
@click.option("--suffix", help="Text every sample ends with (kept fixed).")
@click.option("--input", "input_path", type=click.Path(dir_okay=False), help="jsonl: line k gives sample k's prefix/suffix, or tokens with nulls to fill.")
@click.option("--image", "image_path", type=click.Path(dir_okay=False), help="Inpainting (image models): a PNG whose pixels --keep fixes.")
@click.option("--keep", "keep_path", type=click.Path(dir_okay=False), help="Inpainting: a PNG mask; its non-zero pixels keep --image's values.")
@click.option("--prompt", help="Prompt of every sample (the generated tokens follow it); needs --gen-length.")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False), help='jsonl: line k holds sample k\'s {"prompt": TEXT}.')
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template.")
@click.option("--gen-length", type=int, callback=bounds.in_range(1, bounds.INDEX_LIMIT), help="Tokens generated after the prompt.")
@click.option("--block-length", type=int, callback=bounds.in_range(1, bounds.INDEX_LIMIT), help="Generate in blocks of this many tokens, left to right  [default: --gen-length]; --steps is the total over the blocks.")
@click.option("--remasking", type=click.Choice(["low_confidence", "random"]), help="With --gen-length: commit the most confident candidates (confidence) or random ones (count).")
@click.option("--cfg", type=float, help="Classifier-free guidance scale (the prompt masked in the unconditional copy).")
@click.option("--trust-remote-code", is_flag=True, help="Let a transformers model run the code it ships.")
@device_option
@offline_option
def sample(model_name, sampler_path, steps, base, gamma, temperature, margin, even, denoise, num, seed, batch_size, fmt, output, force, shard_spec,
           resume, prefix, suffix, input_path, image_path, keep_path, prompt, prompts_path, chat, gen_length, block_length,
           remasking, cfg, trust_remote_code, device, offline):
    """Draw samples; one per line on stdout (or -o FILE)."""
    from lsdtool import api, console, generation, imagefiles, merge, sharding
    from lsdtool.samplers import Sampler

    shard, num_shards = sharding.parse_shard(shard_spec) if shard_spec else sharding.shard_from_env(os.environ) or (0, 1)
    directory = bool(output) and imagefiles.is_directory(output)
    if directory and fmt != "png":
        raise ValueError(f"-o {output} is a directory: per-sample files need --format png")
    if fmt == "png" and not output:
        raise ValueError("--format png needs -o GRID.png (one grid) or -o DIR/ (one PNG per sample)")
    if resume and not (output and (fmt == "jsonl" or directory)):
        raise ValueError("--resume needs -o FILE and --format jsonl, or -o DIR/ and --format png")
    if input_path and (prefix is not None or suffix is not None):
        raise ValueError("give --input, or --prefix/--suffix, not both")
    if (image_path is None) != (keep_path is None):
        raise ValueError("inpainting needs both --image IMG.png and --keep MASK.png")
    prompted = prompt is not None or prompts_path is not None
    if sum(bool(v) for v in (image_path, input_path or prefix is not None or suffix is not None, prompted)) > 1:
        raise ValueError("give one of --image/--keep, --prompt/--prompts, or --input/--prefix/--suffix, not several")
    if (prompted or chat) and gen_length is None and not sampler_path:
        raise ValueError("--prompt, --prompts and --chat need --gen-length")
    path = (imagefiles.shard_dir if directory else sharding.shard_path)(output, shard, num_shards) if output else None
    if directory:
        imagefiles.check_output(path, resume, force)
    elif path:
        merge.check_output(path, resume, force, input_path or prompts_path)
    dev = generation.pick_device(sharding.launcher_device(device, os.environ))
    if sampler_path:
        model, sampler = api.load_artifact(sampler_path, model_name, device=dev, offline=offline, force=force,
                                           trust_remote_code=trust_remote_code)
        if gen_length is not None or block_length is not None:
            api.check_layout(sampler, gen_length, block_length)
    else:
        if not model_name or steps is None:
            raise click.UsageError("give --model and --steps, or --sampler ARTIFACT")
        blocks = {"gen_length": gen_length, "block_length": block_length, "cfg": cfg} if gen_length is not None else {}
        if base is None:
            base = ("count" if remasking == "random" else "confidence") if gen_length is not None else "euler"
        greedy = temperature == 0
        options = {k: v for k, v in (("gamma", gamma), ("temperature", None if greedy else temperature),
                                     ("greedy", True if greedy else None),
                                     ("score", "margin" if margin else None), ("counts", "even" if even else None),
                                     *blocks.items()) if v is not None}
        sampler = Sampler.plain(steps, base=base, denoise=denoise, options=options)
        sampler.check()  # before the model loads
        model = api.load_model(model_name, device=dev, offline=offline, trust_remote_code=trust_remote_code)
    if fmt == "png":
        from lsdtool import images

        images.shape_of(model)  # a text model: refused before anything is drawn or written
    if sampler.options.get("gen_length"):
        conditions = api.prompted(model, sampler, prompt, prompts_path, chat)
        input_path = prompts_path
    else:
        conditions = api.conditions(model, prefix, suffix, input_path, image=image_path, keep=keep_path)
    num = api.sample_count(num, conditions, input_path)
    indices = sharding.shard_range(num, shard, num_shards)
    if num_shards > 1:
        block = f"indices {indices[0]}..{indices[-1]}" if indices else "no indices"
        console.log(f"shard {shard}/{num_shards}: {block} of {num}")
    _write_samples(model, sampler, indices, seed, batch_size, dev, fmt, path, conditions, resume, force)


def _write_samples(model, sampler, indices, seed, batch_size, dev, fmt, output, conditions=None, resume=False, force=False):
    import contextlib

    from lsdtool import api, conditioning, console, generation, merge, prompts

    extra = generation.provenance(model, sampler, seed)
    if fmt == "png":
        _write_images(model, sampler, indices, seed, batch_size, dev, output, conditions, resume, force, extra)
        return
    opened = merge.open_output(output, indices, extra, resume, force) if output else contextlib.nullcontext((sys.stdout.buffer, 0))
    with opened as (out, done):
        if done:
            console.log(f"resuming {output}: {done} of {len(indices)} samples already there")
        with console.Bars() as bars:
            for chunk, x in api.sample_batches(model, sampler, indices[done:], seed, batch_size=batch_size, device=dev,
                                               conditions=conditions, progress=bars):
                given = conditions.given(chunk) if conditions is not None else None
                gen = sampler.options.get("gen_length")
                for k, (i, row) in enumerate(zip(chunk, x)):
                    fields = extra if given is None else {**extra, "given": conditioning.spans(given[k])}
                    if gen and fmt == "jsonl":
                        fields = {**fields, "completion": prompts.completion(model, row, int(gen))}
                    out.write((generation.record(model, i, row, fmt, fields) + "\n").encode("utf-8"))
                out.flush()


def _write_images(model, sampler, indices, seed, batch_size, dev, output, conditions, resume, force, extra):
    from lsdtool import api, console, imagefiles

    def draw(todo):
        with console.Bars() as bars:
            yield from api.sample_batches(model, sampler, todo, seed, batch_size=batch_size, device=dev,
                                          conditions=conditions, progress=bars)

    if imagefiles.is_directory(output):
        imagefiles.write_directory(model, output, indices, extra, draw, resume, force, console.log)
    else:
        imagefiles.write_grid(model, output, draw(indices), console.log)


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_cmd(as_json):
    """List the known models and whether each is usable offline now."""
    import json

    from lsdtool import models

    rows = []
    for name in [*models.REGISTRY, *models.DOWNLOAD_ONLY]:
        try:
            source, ready = models.availability(name)
        except ImportError:
            source, ready = models.REGISTRY[name], False
        rows.append({"name": name, "source": source, "offline": ready})
    if as_json:
        click.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "source", "usable offline")
    for r in rows:
        table.add_row(r["name"], r["source"], "yes" if r["offline"] else "no (download first)")
    Console().print(table)


@main.command("merge")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="Write here (atomically) instead of stdout; a directory DIR/ for PNG directories.")
def merge_cmd(files, output):
    """Join jsonl sample files (e.g. shards) in index order, or directories of per-sample PNGs into -o DIR/,
    checking every index appears once and all came from one sampler, model and seed."""
    from lsdtool import console, imagefiles, merge

    dirs = [os.path.isdir(f) for f in files]
    if any(dirs) and not all(dirs):
        raise ValueError("give jsonl files or PNG directories to merge, not both")
    if all(dirs):
        n = imagefiles.merge_directories(list(files), output)
    else:
        if output and imagefiles.is_directory(output):
            raise ValueError(f"-o {output} is a directory; jsonl files merge into a file")
        n = merge.merge(list(files), output)
    console.log(f"merged {n} samples from {len(files)} files" + (f" into {output}" if output else ""))


cache_dir_option = click.option("--cache-dir", type=click.Path(file_okay=False), envvar="LSD_CACHE_DIR",
                                help="Artifact cache (default: LSD_CACHE_DIR, else the user cache dir).")


@main.command()
@click.option("--model", "model_name", required=True, help=MODEL_HELP)
@click.option("--steps", type=int, callback=bounds.steps_range, help="Student steps M.")
@click.option("--plus/--no-plus", default=None, help="LSD+: also learn the time schedule.")
@click.option("--base", type=click.Choice(steprules.DISTILLABLE), default=None, help="Step rule.")
@click.option("--mode", type=click.Choice(MODES), default=None, help="What Phi multiplies.")
@click.option("--objective", type=click.Choice(["teacher-path", "paper"]), default=None)
@click.option("--teacher-steps", type=int, callback=bounds.steps_range, help="Teacher steps N.")
@click.option("--samples", type=int, callback=bounds.in_range(1, bounds.INDEX_LIMIT), help="Teacher trajectories.")
@click.option("--iters", type=int, callback=bounds.in_range(0, bounds.ITERS_LIMIT), help="Optimiser iterations (0: untrained).")
@click.option("--batch", type=int, callback=bounds.batch_range, help="Trajectories per batch.")
@click.option("--lr", type=float, callback=bounds.positive_finite, help="Learning rate.")
@click.option("--seed", type=int, callback=bounds.seed_range, help="Seed of the teacher trajectories (0..2**64-1).")
@click.option("--recipe", "recipe_file", type=click.Path(), help="TOML recipe (default: the shipped one for the model).")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False, exists=True), help='Block decoding: jsonl of {"prompt": TEXT}, one per teacher trajectory (cycled).')
@click.option("--gen-length", type=int, callback=bounds.in_range(1, bounds.INDEX_LIMIT), help="Block decoding: tokens generated after each prompt.")
@click.option("--block-length", type=int, callback=bounds.in_range(1, bounds.INDEX_LIMIT), help="Block decoding: block length  [default: --gen-length].")
@click.option("--trust-remote-code", is_flag=True, help="Let a transformers model run the code it ships.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also copy the artifact here.")
@click.option("--refit", is_flag=True, help="Distil again even on a cache hit.")
@cache_dir_option
@device_option
@offline_option
def distill(model_name, steps, plus, base, mode, objective, teacher_steps, samples, iters, batch, lr, seed,
            recipe_file, prompts_path, gen_length, block_length, trust_remote_code, out, refit, cache_dir, device, offline):
    """Distil a few-step sampler; prints the artifact path as the last line of stdout."""
    from lsdtool import cache, console, distributed, fileio
    from lsdtool.console import log

    from lsdtool import api as lsd_api

    overrides = dict(steps=steps, plus=plus, base=base, mode=mode, objective=objective, teacher_steps=teacher_steps,
                     samples=samples, iters=iters, batch=batch, lr=lr, seed=seed)
    overrides.update(lsd_api.block_recipe(gen_length, block_length, prompts_path, base, teacher_steps, steps))
    if out:
        fileio.check_file(out)
    launch, fit = distributed.launch_from_env(os.environ), None
    path = None if refit or launch else cache.lookup(model_name, overrides, cache_dir=cache_dir, recipe_file=recipe_file, offline=offline)
    if launch:  # torchrun / srun: every rank rolls out a block, rank 0 fits and writes, all print its path
        path, fit = distributed.obtain(launch, model_name, overrides, cache_dir=cache_dir, recipe_file=recipe_file,
                                       refit=refit, device=device, offline=offline, out=out)
        out = None
    elif path is not None:  # answered without loading the model or torch
        log(f"cache hit: {path}")
    else:
        from lsdtool import api
        from lsdtool.locations import cache_root

        fileio.check_dir(cache_root(cache_dir))  # before the fit, not after it
        model = api.load_model(model_name, device=device, offline=offline, trust_remote_code=trust_remote_code)
        with console.Bars() as bars:
            sampler = api.distill(model, **overrides, cache_dir=cache_dir, recipe=recipe_file, refit=refit,
                                  device=model.device, progress=bars, log=log)
        path, fit = sampler.path, sampler.fit
    if fit and fit.get("loss_before") is not None:
        before, after = fit.get("loss_before") or [], fit.get("loss_after") or []
        log(f"fitted in {fit.get('seconds', 0):.1f}s on {fit.get('device')}: {fit.get('loss', 'loss')} "
            f"{sum(before):.4g} -> {sum(after):.4g}")
    if out:
        fileio.copy(path, out)
        path = out
    click.echo(str(path))


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON: metadata plus timesteps and coeffs.")
def inspect(artifact, as_json):
    """Show a sampler artifact: metadata, its grid, step sizes and coefficients."""
    import json

    from lsdtool.samplers import Sampler

    sampler = Sampler.load(artifact)
    meta = sampler.meta
    ts, cs = sampler.timesteps.tolist(), sampler.coeffs.tolist()
    if as_json:
        out = dict(meta)
        out["fit"] = sampler.fit
        out.update(timesteps=ts, coeffs=cs)
        click.echo(json.dumps(out))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    info = Table(show_header=False, box=None)
    for k in ("model", "model_fingerprint", "graph", "noise", "base", "mode", "steps", "denoise", "plus", "objective",
              "teacher_steps", "seed", "lsdtool_version", "created"):
        info.add_row(k, meta.get(k, ""))
    fit = sampler.fit
    if fit.get("loss_before"):
        info.add_row("loss before", f"{sum(fit['loss_before']):.5g}")
        info.add_row("loss after", f"{sum(fit['loss_after']):.5g}")
    info.add_row("fit", f"{fit.get('seconds', '?')} s on {fit.get('device', '?')}, {fit.get('iterations', '?')} iterations")
    console.print(info)
    steps = Table("k", "tau_k", "tau_k+1", "step", "Phi_k", "step size")
    sizes = [a - b for a, b in zip(ts[:-1], ts[1:])]
    width = 30
    for k, (size, c) in enumerate(zip(sizes, cs)):
        bar = "█" * max(1, round(width * size / max(sizes)))
        steps.add_row(str(k), f"{ts[k]:.5f}", f"{ts[k + 1]:.5f}", f"{size:.5f}", f"{c:.4f}", bar)
    console.print(steps)


@main.group("cache")
def cache_group():
    """List, locate or remove cached sampler artifacts."""


@cache_group.command("path")
@cache_dir_option
def cache_path(cache_dir):
    """Print the cache directory."""
    from lsdtool.locations import cache_root

    click.echo(str(cache_root(cache_dir)))


@cache_group.command("list")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def cache_list(cache_dir, as_json):
    """List cached artifacts."""
    import json

    from lsdtool import cache
    from lsdtool.locations import cache_root

    rows = cache.entries(cache_root(cache_dir))
    if as_json:
        click.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    columns = ("model", "sampler", "steps", "objective", "mode", "created", "path")
    cells = []
    for r in rows:
        if r.get("temp"):
            cells.append(("?", "stale temp file" if r["stale"] else "being written", "", "", "", "", r["path"]))
        elif "error" in r:
            cells.append(("?", "unreadable", "", "", "", "", r["path"]))
        else:
            cells.append((r["model"], "lsd+" if r["plus"] else "lsd", str(r["steps"]), r["objective"], r["mode"], r["created"], r["path"]))
    console = Console()
    if not console.is_terminal:  # a pipe or file: tab-separated lines with whole paths, never cut to the width
        for line in [columns, *cells]:
            click.echo("\t".join(line))
        return
    table = Table(*columns)
    for line in cells:
        table.add_row(*line)
    console.print(table)


@cache_group.command("rm")
@click.argument("paths", nargs=-1)
@click.option("--all", "remove_all", is_flag=True, help="Remove every cached artifact and stale temp file.")
@cache_dir_option
def cache_rm(paths, remove_all, cache_dir):
    """Remove cached artifacts (by path, or --all)."""
    from lsdtool import cache
    from lsdtool.locations import cache_root

    if not paths and not remove_all:
        raise click.UsageError("give artifact paths or --all")
    for p in cache.remove(paths, cache_root(cache_dir), remove_all):
        click.echo(str(p))


@cache_group.command("prune")
@cache_dir_option
def cache_prune(cache_dir):
    """Remove temp files left in the cache by interrupted writes (never one still being written)."""
    from lsdtool import cache
    from lsdtool.locations import cache_root

    for p in cache.prune(cache_root(cache_dir)):
        click.echo(str(p))


def _nfe_list(ctx, param, value):
    try:
        out = sorted({int(v) for v in str(value).split(",") if v.strip()})
    except ValueError:
        raise click.BadParameter("a comma-separated list of NFE values, e.g. 8,16,32") from None
    if not out or out[0] < 1 or out[-1] > bounds.STEPS_LIMIT:
        raise click.BadParameter(f"NFE values must be integers in 1..{bounds.STEPS_LIMIT}")
    return out


@main.command()
@click.option("--model", "model_name", required=True, help=MODEL_HELP)
@click.option("--steps", "nfes", default="8,16,32,64", show_default=True, callback=_nfe_list,
              help="NFE values (model calls per sample), comma-separated.")
@click.option("--samplers", default="euler,tweedie,lsd,lsd+", show_default=True,
              help="Comma-separated: euler, tweedie, count, theta-trapezoidal, confidence, entropy-bound, jys, euler-temp, "
                   "power, lsd, lsd+ (lsd/lsd+ take :paper, :teacher-path, :temperature, :score, :tweedie, :confidence suffixes).")
@click.option("-n", "num", type=int, default=256, show_default=True, callback=bounds.in_range(1, bounds.INDEX_LIMIT), help="Samples per row (indices 0..n-1).")
@click.option("--seed", type=int, default=0, show_default=True, callback=bounds.seed_range, help="0..2**64-1.")
@click.option("--teacher-steps", type=int, callback=bounds.steps_range, help="Teacher reference steps (default: the model's recipe); also passed to distillation.")
@click.option("--batch-size", default="64", show_default=True, callback=bounds.batch_size,
              help="Samples per batch, or auto: from the free memory, halved where a batch does not fit.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (protocol and rows) instead of the table.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the rows as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also plot metric vs NFE (PNG; needs matplotlib); image models: a grid of samples, samplers x NFE.")
@click.option("--data", type=click.Path(dir_okay=False), help="Clean data for jys (jsonl of token ids); countdown generates its own.")
@click.option("--eval-model", help="Causal LM for generative perplexity of text models  [default: gpt2-large]")
@click.option("--metric", "metrics", multiple=True, metavar="NAME|MODULE:FUNCTION",
              help="Score samples with countdown, gen-ppl or your function of the tokens (B, L) returning per-sample "
                   "values (B,) or a dict of them; repeatable, the first is the headline  [default: countdown for "
                   "countdown-task models, else gen-ppl]")
@click.option("--reference", help="fid, kid: a directory of PNG images, a statistics .npz (mu, sigma) or cifar10-train.")
@click.option("--inception-weights", type=click.Path(dir_okay=False),
              help="fid, kid: torch-fidelity's Inception-v3 weights file  [default: torch hub's cache]")
@click.option("--per-sample-ppl", is_flag=True, help="Show the per-sample perplexity (mean of exp(mean NLL)) in the table.")
@click.option("--tune-n", type=int, callback=bounds.in_range(1, bounds.INDEX_LIMIT), help="Held-out samples for tuning euler-temp and power  [default: min(n, 128)]")
@click.option("--no-teacher", is_flag=True, help="Leave out the teacher reference row.")
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False), help="TOML recipe for the lsd rows (default: the shipped one).")
@cache_dir_option
@device_option
@offline_option
def compare(model_name, nfes, samplers, num, seed, teacher_steps, batch_size, as_json, csv_path, plot_path, data,
            eval_model, metrics, reference, inception_weights, per_sample_ppl, tune_n, no_teacher, recipe_file, cache_dir,
            device, offline):
    """Compare samplers x NFE on one model from the same seeds; a table (or --json) on stdout."""
    import json

    from lsdtool import compare as cmp
    from lsdtool import console, fileio, generation, models
    from lsdtool.locations import cache_root

    names = cmp.parse_samplers(samplers)
    for target in (csv_path, plot_path):
        if target:
            fileio.check_file(target)
    if any(name.startswith("lsd") or name.startswith("jys") for name in names):
        fileio.check_dir(cache_root(cache_dir))
    dev = generation.pick_device(device)
    model = models.load(model_name, device=dev, offline=offline)
    if plot_path and getattr(model, "shape", None) is None:  # an image model's plot is a PNG grid of its own
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.ClickException("--plot needs matplotlib: pip install 'lsdtool[plot]'") from None
    local_only = True if offline else None
    evaluator = cmp.make_evaluator(model, eval_model, dev, local_files_only=local_only, metric=list(metrics) or None,
                                   reference=reference, inception_weights=inception_weights)
    with console.progress() as bar:
        task = bar.add_task("compare", total=1)

        def progress(description, total):
            bar.reset(task, total=total, description=description)
            return lambda k=1: bar.advance(task, k)

        result = cmp.run(model, names, nfes, n=num, seed=seed, teacher_steps=teacher_steps, batch_size=batch_size,
                         device=dev, evaluator=evaluator, cache_dir=cache_dir, data=data, teacher=not no_teacher,
                         tune_n=tune_n, recipe_file=recipe_file, progress=progress, log=console.log)
    if csv_path:
        _compare_csv(result, csv_path)
    if plot_path:
        _compare_plot(result, plot_path, per_sample_ppl)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        _compare_table(result, per_sample_ppl)


def _compare_key(result, per_sample_ppl):
    key = result.protocol["metric"]
    return "gen_ppl_per_sample" if per_sample_ppl and key == "gen_ppl" else key


def _compare_table(result, per_sample_ppl=False):
    from rich.console import Console
    from rich.table import Table

    from lsdtool.compare import se_text

    key = _compare_key(result, per_sample_ppl)
    p = result.protocol
    nfes = p["nfe"]
    teacher = [r for r in result.rows if r.sampler == "teacher"]
    label = {"error": "countdown error (JYS)", "gen_ppl": f"gen. perplexity ({p['eval_model']})",
             "gen_ppl_per_sample": f"per-sample gen. perplexity ({p['eval_model']})"}.get(key, key)
    se = " ± s.e." if any(f"{key}_se" in r.metrics for r in result.rows) else ""
    table = Table(title=f"{p['model']}: {label}{se} over n = {p['n']} samples, seed {p['seed']}; time per sample",
                  title_justify="left")
    table.add_column("sampler", no_wrap=True)
    for k in nfes:
        table.add_column(f"NFE {k}", justify="right")
    if teacher:
        table.add_column(f"teacher ({teacher[0].nfe})", justify="right")

    div = p.get("diversity", {"key": "entropy", "label": "H"})

    def cell(r):
        m = r.metrics
        text = se_text(m[key], m.get(f"{key}_se"))
        if div["key"] in m:
            text += f"\n{div['label']} {m[div['key']]:.3f}"
        for extra in p.get("headlines", [])[1:]:  # further --metric figures
            text += f"\n{extra} {se_text(m[extra], m.get(f'{extra}_se'))}"
        if r.nfe_mean is not None and r.nfe_mean != r.nfe:
            text += f"\nNFE {r.nfe_mean:.1f} (max {r.nfe_max})"
        ms = r.seconds_per_sample * 1000
        return text + (f"\n{ms:.1f} ms" if ms < 1000 else f"\n{ms / 1000:.2f} s")

    seen = []
    for r in result.rows:
        if r.sampler != "teacher" and r.sampler not in seen:
            seen.append(r.sampler)
    for name in seen:
        by_nfe = {r.nfe: r for r in result.rows if r.sampler == name}
        extra = [""] if teacher else []
        table.add_row(name, *[cell(by_nfe[k]) if k in by_nfe else "–" for k in nfes], *extra)
    if teacher:
        table.add_row(f"teacher ({p.get('teacher_sampler', 'euler')})", *["" for _ in nfes], cell(teacher[0]))
    console = Console()
    if not console.is_terminal:  # a file or pipe gets the whole table, never wrapped cells
        console = Console(width=max(100, 24 + 22 * (len(nfes) + 1)))
    console.print(table)
    for i, note in enumerate(result.notes, 1):
        console.print(f"[{i}] {note}", highlight=False, soft_wrap=True)
    tuned = [(r.sampler, r.nfe, r.details) for r in result.rows if any(k.startswith("tuned_") for k in r.details)]
    for name, k, d in tuned:
        value = next(v for kk, v in d.items() if kk.startswith("tuned_"))
        console.print(f"{name} NFE {k}: {next(kk for kk in d if kk.startswith('tuned_'))[6:]} = {value:g}", highlight=False)


def _compare_csv(result, path):
    import csv

    from lsdtool import fileio

    keys = []
    for r in result.rows:
        keys += [k for k in r.metrics if k not in keys]
    with fileio.atomic_write(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sampler", "steps", "nfe", "seconds_per_sample", *keys, "nfe_mean", "nfe_max"])
        for r in result.rows:
            w.writerow([r.sampler, r.steps, r.nfe, f"{r.seconds_per_sample:.6g}", *[r.metrics.get(k, "") for k in keys],
                        r.nfe_mean, r.nfe_max])


def _compare_plot(result, path, per_sample_ppl=False):
    if any(r.preview is not None for r in result.rows):
        return _compare_grid(result, path)
    import matplotlib

    from lsdtool import fileio

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = _compare_key(result, per_sample_ppl)
    p = result.protocol
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    names = []
    for r in result.rows:
        if r.sampler != "teacher" and r.sampler not in names:
            names.append(r.sampler)
    markers, styles = "osD^vP*Xh<>", ["-", "--", "-.", ":"]
    for i, name in enumerate(names):  # distinct marker and dash per sampler: coinciding rows stay visible
        rows = sorted((r for r in result.rows if r.sampler == name), key=lambda r: r.nfe)
        ax.errorbar([r.nfe_mean or r.nfe for r in rows], [r.metrics[key] for r in rows], yerr=[r.metrics.get(f"{key}_se", 0) for r in rows],
                    marker=markers[i % len(markers)], ls=styles[i % len(styles)], ms=5, capsize=3, label=name,
                    mfc="none" if i % 2 else None)
    for r in result.rows:
        if r.sampler == "teacher":
            ax.axhline(r.metrics[key], color="0.4", ls="--", lw=1, label=f"teacher ({r.nfe} steps)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(p["nfe"], [str(k) for k in p["nfe"]])
    ax.set_yscale("log")
    ax.set_xlabel("NFE (model calls per sample)")
    ax.set_ylabel({"error": "countdown error (JYS)", "gen_ppl": "generative perplexity",
                   "gen_ppl_per_sample": "per-sample generative perplexity"}.get(key, key))
    ax.set_title(f"{p['model']}, n = {p['n']}, seed {p['seed']} (± s.e.)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with fileio.atomic_write(path, "wb") as f:
        fig.savefig(f, format=os.path.splitext(path)[1][1:].lower() or "png")
    plt.close(fig)


def _compare_grid(result, path):
    """Image models: one PNG, a row per sampler and a column per NFE, each cell the first samples (same seeds),
    the teacher's below in the first column; images smaller than 32 pixels are enlarged to be seen."""
    from lsdtool import console, fileio, images

    names = [n for n in result.protocol["samplers"] if any(r.sampler == n for r in result.rows)]
    nfes = result.protocol["nfe"]
    cell = {(r.sampler, r.nfe): r.preview for r in result.rows}
    cells = [[cell.get((n, k)) for k in nfes] for n in names]
    teacher = next((r for r in result.rows if r.sampler == "teacher" and r.preview is not None), None)
    if teacher is not None:
        cells.append([teacher.preview] + [None] * (len(nfes) - 1))
        names = names + [f"teacher (NFE {teacher.nfe})"]
    fileio.write_bytes(path, images.encode(images.table(cells, least=32)))
    console.log(f"{path}: rows {', '.join(names)}; columns NFE {', '.join(map(str, nfes))}")


if __name__ == "__main__":
    main()
