"""The artifact format: every kind of sampler survives save -> load -> save; version 1 files still read."""

import json

import pytest
import torch

from lsdtool import artifacts, cache, jys, steprules
from lsdtool.errors import LsdError
from lsdtool.grids import MODES
from lsdtool.samplers import Sampler, power_grid


def round_trip(sampler: Sampler, tmp_path) -> tuple[Sampler, dict, dict]:
    """(loaded, metadata of the first file, metadata of the second) for save -> load -> save."""
    first = sampler.save(tmp_path / "a.safetensors")
    loaded = Sampler.load(first)
    second = loaded.save(tmp_path / "b.safetensors")
    again = Sampler.load(second)
    assert torch.equal(again.timesteps, sampler.timesteps.double()) and torch.equal(again.coeffs, sampler.coeffs.double())
    assert (again.base, again.mode, again.denoise, again.steps, again.nfe) == \
        (sampler.base, sampler.mode, sampler.denoise, sampler.steps, sampler.nfe)
    a, b = artifacts.read(first)[0], artifacts.read(second)[0]
    a.pop("created"), b.pop("created")
    assert a == b
    return again, a, b


@pytest.mark.parametrize("base", steprules.NAMES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("denoise", [False, True])
def test_every_plain_sampler_round_trips(tmp_path, base, mode, denoise):
    coeffs = torch.tensor([0.9, 1.1, 1.3], dtype=torch.float64)
    sampler = Sampler(power_grid(3, 1.7), coeffs, base, mode, denoise)
    loaded, meta, _ = round_trip(sampler, tmp_path)
    assert meta["denoise"] == ("true" if denoise else "false") and meta["base"] == base and meta["mode"] == mode
    assert "model" not in meta  # a plain sampler is made for no model
    rule = steprules.rule(base)
    extra = 0 if not rule.extra_calls else int(steprules._resolve(rule.extra_calls)(loaded))
    assert loaded.nfe == sampler.nfe == 3 * rule.calls + rule.final_calls + extra + int(denoise)


def test_the_denoise_step_survives_the_round_trip(tmp_path):
    sampler = Sampler.plain(4, denoise=True)
    assert Sampler.load(sampler.save(tmp_path / "d.safetensors")).nfe == 5 == sampler.nfe


@pytest.mark.parametrize("plus", [False, True])
def test_distilled_samplers_round_trip(countdown, tmp_path, plus):
    sampler = cache.load_or_distill(countdown, {"steps": 3, "plus": plus, "teacher_steps": 12, "samples": 4, "batch": 4,
                                                "iters": 2}, cache_dir=tmp_path / "cache")
    _, meta, _ = round_trip(sampler, tmp_path)
    assert meta["plus"] == ("true" if plus else "false") and meta["model_fingerprint"] == countdown.fingerprint
    assert json.loads(meta["fit"]) == sampler.fit and sampler.fit["iterations"] >= 1


def test_jys_grids_round_trip(countdown, tmp_path):
    (path, sampler), = jys.load_or_search(countdown, [2], cache_dir=tmp_path / "cache", n=8, src_steps=16, batch_size=8).values()
    loaded, meta, _ = round_trip(sampler, tmp_path)
    assert meta["objective"] == "jys" and loaded.fit["indices"] == Sampler.load(path).fit["indices"]


def test_version_1_files_are_still_read(tmp_path):
    from safetensors.torch import save_file

    meta = {"format": "lsd.sampler", "format_version": "1", "model": "countdown", "model_fingerprint": "f", "graph": "absorb",
            "noise": "loglinear", "base": "euler", "mode": "score", "steps": "2", "plus": "false", "teacher_steps": "8",
            "seed": "0", "recipe": "", "fit": "{}", "lsdtool_version": "0.1.0", "created": "2026-01-01T00:00:00+00:00"}
    path = tmp_path / "v1.safetensors"
    save_file({"timesteps": torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64),
               "coeffs": torch.tensor([1.0, 2.0], dtype=torch.float64)}, str(path), metadata=meta)
    sampler = Sampler.load(path)
    assert sampler.steps == 2 and not sampler.denoise and sampler.meta["model"] == "countdown"
    del meta["plus"]
    save_file({"timesteps": sampler.timesteps, "coeffs": sampler.coeffs}, str(path), metadata=meta)
    with pytest.raises(LsdError, match="lacks plus"):
        Sampler.load(path)


def test_a_plain_artifact_fits_any_model_its_rule_runs_on(countdown, tmp_path):
    path = Sampler.plain(2, base="count").save(tmp_path / "count.safetensors")
    assert Sampler.load(path, model=countdown).base == "count"

    class Uniform:
        name, graph, fingerprint = "u", "uniform", "x"

    with pytest.raises(LsdError, match="absorbing"):
        Sampler.load(path, model=Uniform())
