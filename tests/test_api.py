"""The Python API, and each call's equivalence to the command line."""

import re
from pathlib import Path

import pytest
import torch

import lsdtool
from conftest import run_cli
from lsdtool import cache
from lsdtool.errors import LsdError
from lsdtool.samplers import Sampler

TINY = {"teacher_steps": 16, "samples": 4, "batch": 4, "iters": 2}
TINY_FLAGS = ["--teacher-steps", "16", "--samples", "4", "--batch", "4", "--iters", "2"]
README = Path(__file__).resolve().parent.parent / "README.md"


def tokens(x: torch.Tensor) -> str:
    return "".join(" ".join(map(str, row)) + "\n" for row in x.tolist())


def test_distill_is_cached_exactly_like_lsd_distill(countdown, tmp_path):
    r = run_cli("distill", "--model", "countdown", "--steps", "3", "--plus", *TINY_FLAGS, "--cache-dir", tmp_path / "a")
    assert r.exit_code == 0, r.output
    cli_path = Path(r.stdout.strip().splitlines()[-1])
    stamp = cli_path.stat().st_mtime_ns
    hit = lsdtool.distill(countdown, steps=3, plus=True, **TINY, cache_dir=tmp_path / "a")
    assert hit.path == cli_path and cli_path.stat().st_mtime_ns == stamp  # the same file, not fitted again
    fresh = lsdtool.distill(countdown, steps=3, plus=True, **TINY, cache_dir=tmp_path / "b")  # distilled by the API
    assert fresh.path.relative_to(tmp_path / "b") == cli_path.relative_to(tmp_path / "a")
    cli = Sampler.load(cli_path)
    assert torch.equal(fresh.timesteps, cli.timesteps) and torch.equal(fresh.coeffs, cli.coeffs)
    meta_api, meta_cli = dict(fresh.meta), dict(cli.meta)
    for m in (meta_api, meta_cli):
        m.pop("created")
        m["fit"] = re.sub(r'"\w*seconds": [0-9.]+', "", m["fit"])  # wall times differ between runs
    assert meta_api == meta_cli
    assert fresh.fit["iterations"] >= 1 and fresh.fit == Sampler.load(fresh.path).fit


def test_distill_takes_a_recipe_dict_or_file_and_skips_the_cache_on_request(countdown, tmp_path):
    by_dict = lsdtool.distill(countdown, steps=2, recipe=dict(TINY, plus=True), cache_dir=tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text("".join(f"{k} = {v}\n" for k, v in TINY.items()) + "plus = true\n")
    by_file = lsdtool.distill(countdown, steps=2, recipe=recipe, cache_dir=tmp_path)
    assert by_dict.path == by_file.path
    uncached = lsdtool.distill(countdown, steps=2, plus=True, **TINY, cache=False, cache_dir=tmp_path / "none")
    assert uncached.path is None and not (tmp_path / "none").exists()
    assert torch.equal(uncached.coeffs, by_dict.coeffs) and uncached.meta["model_fingerprint"] == countdown.fingerprint
    saved = uncached.save(tmp_path / "u.safetensors")
    assert Sampler.load(saved, model=countdown).meta["recipe"] == by_dict.meta["recipe"]


def test_the_fitting_function_fills_in_recipe_defaults(countdown):
    from lsdtool import distillation

    fit = distillation.distill(countdown, {"steps": 2, "plus": True, **TINY})  # no objective, base, mode, ...
    assert fit.sampler.steps == 2 and fit.fit["objective"] == "teacher-path"


@pytest.mark.parametrize("base", ["euler", "count", "theta-trapezoidal"])
def test_sample_is_byte_identical_to_lsd_sample(countdown, base):
    x = lsdtool.sample(countdown, Sampler.plain(4, base=base), n=5, seed=3, batch_size=2)
    assert x.shape == (5, countdown.seq_len) and x.dtype == torch.long
    r = run_cli("sample", "--model", "countdown", "--steps", 4, "--base", base, "-n", 5, "--seed", 3,
                "--format", "tokens", "--device", "cpu")
    assert r.exit_code == 0 and r.stdout == tokens(x)


def test_sample_with_an_artifact_and_conditioning_matches_the_cli(countdown, tmp_path):
    sampler = lsdtool.distill(countdown, steps=3, **TINY, cache_dir=tmp_path)
    prefix = "4 3 2"
    x = lsdtool.sample(countdown, sampler, 4, 0, prefix=prefix)  # positional n and seed
    r = run_cli("sample", "--sampler", sampler.path, "-n", 4, "--prefix", prefix, "--format", "tokens", "--device", "cpu")
    assert r.exit_code == 0 and r.stdout == tokens(x)
    assert torch.equal(lsdtool.sample(countdown, sampler.path, 4, 0, prefix=prefix), x)  # a path works too
    assert (x[:, :3] == torch.tensor([4, 3, 2])).all()


def test_sample_batches_streams_and_reports_progress_without_printing(countdown, capfd):
    seen = []
    sampler = Sampler.plain(3)
    batches = list(lsdtool.sample_batches(countdown, sampler, 7, 1, batch_size=3,
                                          progress=lambda d, done, total: seen.append((d, done, total))))
    assert [ids for ids, _ in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert torch.equal(torch.cat([x for _, x in batches]), lsdtool.sample(countdown, sampler, 7, 1))
    assert seen[-1] == ("sampling", 7 * 3, 7 * 3) and all(a[1] <= b[1] for a, b in zip(seen, seen[1:]))
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""


def test_distill_reports_progress_to_the_callback_and_prints_nothing(countdown, tmp_path, capfd):
    seen = set()
    lsdtool.distill(countdown, steps=2, **TINY, cache_dir=tmp_path, progress=lambda d, done, total: seen.add(d))
    assert "teacher rollout" in seen
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""


def test_load_checks_the_model(countdown, tmp_path):
    sampler = lsdtool.distill(countdown, steps=2, **TINY, cache_dir=tmp_path)
    countdown_other = lsdtool.load_model("countdown", device="cpu")
    countdown_other.fingerprint = "other"
    with pytest.raises(LsdError, match="force"):
        lsdtool.Sampler.load(sampler.path, model=countdown_other)
    assert lsdtool.Sampler.load(sampler.path, model=countdown_other, force=True).steps == 2


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_is_the_api(countdown, tmp_path, monkeypatch):
    """The README example with a small recipe (the example as written is the slow test below)."""
    code = readme_example()
    assert "lsdtool.distill(model, steps=8, plus=True)" in code
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LSD_CACHE_DIR", str(tmp_path / "cache"))
    small = ", ".join(f"{k}={v}" for k, v in TINY.items())
    scope: dict = {}
    exec(compile(code.replace("plus=True)", f"plus=True, {small})"), "README.md", "exec"), scope)
    assert scope["x"].shape == (16, 256) and scope["s2"].nfe == scope["sampler"].nfe == 8
    assert torch.equal(scope["s2"].coeffs, scope["sampler"].coeffs)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LSD_CACHE_DIR", str(tmp_path / "cache"))
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    r = run_cli("sample", "--sampler", scope["sampler"].path, "-n", 16, "--seed", 0, "--format", "tokens")
    assert r.stdout == tokens(scope["x"])
    r = run_cli("distill", "--model", "countdown", "--steps", 8, "--plus")
    cached = cache.lookup("countdown", {"steps": 8, "plus": True})  # the API's distillation, found by the CLI
    assert Path(r.stdout.strip()) == cached and scope["sampler"].path == Path("lsd8.safetensors")
    assert torch.equal(Sampler.load(cached).coeffs, scope["sampler"].coeffs)
