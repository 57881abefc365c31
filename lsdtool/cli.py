"""The ``lsd`` command line: parsing and rendering only (DESIGN §8). Heavy imports stay lazy."""

from __future__ import annotations

import sys

import click


class LsdGroup(click.Group):
    """Turns expected failures into one line on stderr and exit 1; Ctrl-C into exit 130."""

    def invoke(self, ctx):
        from lsdtool.errors import LsdError

        try:
            return super().invoke(ctx)
        except (LsdError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        except OSError as exc:  # disk full, read-only cache, ...
            raise click.ClickException(f"{exc.strerror or exc} ({exc.filename or 'I/O error'})") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter("must be at least 1")
    return value


def non_negative(ctx, param, value):
    if value is not None and value < 0:
        raise click.BadParameter("must not be negative")
    return value


@click.group(cls=LsdGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "LSD"})
@click.version_option(package_name="lsdtool")
def main():
    """Distil, sample, inspect and compare few-step samplers for discrete diffusion models."""


device_option = click.option("--device", default="auto", show_default=True, help="torch device (auto: CUDA when present).")
offline_option = click.option("--offline", is_flag=True, default=None, help="Never touch the network (also HF_HUB_OFFLINE=1).")


@main.command()
@click.option("--model", "model_name", help="Model: registry name, hub id or local directory.")
@click.option("--sampler", "sampler_path", type=click.Path(dir_okay=True), help="Distilled sampler artifact (.safetensors); it names the model.")
@click.option("--steps", type=int, callback=positive, help="Number of steps of a plain sampler.")
@click.option("--base", type=click.Choice(["euler", "tweedie"]), default="euler", show_default=True)
@click.option("--denoise", is_flag=True, help="Add SEDD's final denoise step (one more NFE).")
@click.option("-n", "num", type=int, default=16, show_default=True, callback=non_negative, help="Number of samples.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, callback=positive)
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl", "tokens"]), default="text", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write samples here instead of stdout.")
@click.option("--force", is_flag=True, help="Use an artifact even if it was distilled for another model.")
@device_option
@offline_option
def sample(model_name, sampler_path, steps, base, denoise, num, seed, batch_size, fmt, output, force, device, offline):
    """Draw samples; one per line on stdout (or -o FILE)."""
    from lsdtool import generation, models
    from lsdtool.samplers import Sampler

    dev = generation.pick_device(device)
    if sampler_path:
        from lsdtool import artifacts

        sampler, meta = artifacts.load(sampler_path)
        model = models.load(model_name or meta["model"], device=dev, offline=offline)
        artifacts.check_model(meta, model, sampler_path, force)
    else:
        if not model_name or steps is None:
            raise click.UsageError("give --model and --steps, or --sampler ARTIFACT")
        model = models.load(model_name, device=dev, offline=offline)
        sampler = Sampler.plain(steps, base=base, denoise=denoise)
    _write_samples(model, sampler, list(range(num)), seed, batch_size, dev, fmt, output)


def _write_samples(model, sampler, indices, seed, batch_size, dev, fmt, output):
    from lsdtool import console, generation

    out = open(output, "w", encoding="utf-8") if output else sys.stdout
    try:
        with console.progress() as bar:
            task = bar.add_task("sampling", total=len(indices) * sampler.nfe)
            on_step = lambda step: bar.advance(task, step.x.shape[0])  # noqa: E731
            for chunk, x in generation.batches(model, sampler, indices, seed, batch_size, dev, on_step):
                for i, row in zip(chunk, x):
                    out.write(generation.record(model, i, row, fmt) + "\n")
                out.flush()
    finally:
        if output:
            out.close()


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_cmd(as_json):
    """List the known models and whether each is usable offline now."""
    import json

    from lsdtool import models

    rows = []
    for name in models.REGISTRY:
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


if __name__ == "__main__":
    main()
