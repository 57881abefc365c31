import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from lsdtool import artifacts
from lsdtool.samplers import Sampler
from conftest import run_cli

FAST = ["--teacher-steps", "32", "--samples", "8", "--batch", "8", "--iters", "2"]


def run(*args):
    return run_cli(*args)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    r = run("distill", "--model", "countdown", "--steps", "4", "--plus", "--cache-dir", cache, *FAST)
    assert r.exit_code == 0, r.output
    path = r.stdout.strip().splitlines()[-1]
    assert os.path.isfile(path) and path.startswith(str(cache))
    return path, cache


def test_distill_prints_path_and_repeat_is_a_cache_hit(artifact):
    path, cache = artifact
    r = run("distill", "--model", "countdown", "--steps", "4", "--plus", "--cache-dir", cache, *FAST)
    assert r.exit_code == 0 and r.stdout.strip().splitlines()[-1] == path
    assert "cache hit" in r.stderr
    listed = json.loads(run("cache", "list", "--cache-dir", cache, "--json").stdout)
    assert [e["path"] for e in listed] == [path]
    assert run("cache", "path", "--cache-dir", cache).stdout.strip() == str(cache)


@pytest.mark.parametrize("device", ["cdua", "CUDA", "cuda:x", "cuda:01", " cpu"])
def test_a_misspelt_device_is_refused_on_a_cache_hit_too(artifact, device):
    path, cache = artifact
    r = run("distill", "--model", "countdown", "--steps", "4", "--plus", "--cache-dir", cache, *FAST, "--device", device)
    assert r.exit_code == 2 and "not a device name" in r.output and path not in r.stdout
    ok = run("distill", "--model", "countdown", "--steps", "4", "--plus", "--cache-dir", cache, *FAST, "--device", "cpu:0")
    assert ok.exit_code == 0 and ok.stdout.strip().splitlines()[-1] == path


def test_artifact_metadata_is_complete(artifact):
    sampler = Sampler.load(artifact[0])
    meta = sampler.meta
    for key in artifacts.REQUIRED:
        assert key in meta
    assert meta["format"] == "lsd.sampler" and meta["model"] == "countdown" and meta["plus"] == "true"
    assert sampler.timesteps.dtype == torch.float64 and sampler.timesteps.shape == (5,)
    fit = json.loads(meta["fit"])
    assert len(fit["loss_before"]) == 4 and fit["device"] == "cpu"
    assert "teacher_steps = 32" in meta["recipe"]


def test_inspect_json_and_table(artifact):
    r = run("inspect", artifact[0], "--json")
    data = json.loads(r.stdout)
    assert len(data["timesteps"]) == 5 and len(data["coeffs"]) == 4 and data["model"] == "countdown"
    table = run("inspect", artifact[0])
    assert table.exit_code == 0 and "Phi_k" in table.stdout and "█" in table.stdout


def test_sample_with_sampler_uses_its_model(artifact):
    r = run("sample", "--sampler", artifact[0], "-n", "3", "--format", "jsonl")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 3


def test_untrained_artifact_samples_like_its_base(tmp_path):
    r = run("distill", "--model", "countdown", "--steps", "4", "--iters", "0", "--cache-dir", tmp_path, "--out", tmp_path / "u.safetensors")
    assert r.exit_code == 0, r.output
    a = run("sample", "--sampler", tmp_path / "u.safetensors", "-n", "6", "--seed", "2", "--format", "jsonl")
    b = run("sample", "--model", "countdown", "--steps", "4", "-n", "6", "--seed", "2", "--format", "jsonl")
    assert a.stdout == b.stdout and a.stdout


def test_refit_and_cache_rm(tmp_path):
    args = ["distill", "--model", "countdown", "--steps", "2", "--cache-dir", tmp_path, *FAST]
    first = run(*args).stdout.strip()
    created = Sampler.load(first).meta["created"]
    assert run(*args, "--refit").stdout.strip() == first
    assert run("cache", "rm", "--cache-dir", tmp_path, first).exit_code == 0
    assert not os.path.exists(first)
    assert created


def broken_artifacts(tmp_path, good):
    data = open(good, "rb").read()
    sampler = Sampler.load(good)
    meta = sampler.meta
    cases = {}
    cases["empty"] = tmp_path / "empty.safetensors"
    cases["empty"].write_bytes(b"")
    cases["truncated"] = tmp_path / "trunc.safetensors"
    cases["truncated"].write_bytes(data[: len(data) // 2])
    cases["random"] = tmp_path / "random.safetensors"
    cases["random"].write_bytes(os.urandom(300))
    cases["directory"] = tmp_path / "dir.safetensors"
    cases["directory"].mkdir()
    cases["missing"] = tmp_path / "nope.safetensors"

    def write(name, tensors, md):
        p = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(p), metadata=md)
        cases[name] = p

    ts, cs = sampler.timesteps, sampler.coeffs
    write("nan", {"timesteps": ts, "coeffs": torch.tensor([1.0, math.nan, 1.0, 1.0], dtype=torch.float64)}, meta)
    write("increasing", {"timesteps": ts.flip(0), "coeffs": cs}, meta)
    write("missing_tensor", {"timesteps": ts}, meta)
    write("foreign", {"weight": torch.zeros(3)}, {"format": "pt"})
    write("fingerprint", {"timesteps": ts, "coeffs": cs}, dict(meta, model_fingerprint="sedd:sha256:0000"))
    return cases


def test_every_broken_artifact_is_one_clean_line(artifact, tmp_path):
    for name, path in broken_artifacts(tmp_path, artifact[0]).items():
        for args in (["inspect", path], ["sample", "--sampler", path, "-n", "1"]):
            if name == "fingerprint" and args[0] == "inspect":
                continue
            r = run(*args)
            assert r.exit_code in (1, 2), (name, r.output)
            assert r.stdout == "", name
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in r.stderr, (name, r.stderr)
    forced = run("sample", "--sampler", tmp_path / "fingerprint.safetensors", "-n", "1", "--force")
    assert forced.exit_code == 0


@pytest.mark.parametrize(
    "text, needle",
    [
        ("steps = 4\nbogus = 1\n", "bogus"),
        ("steps = \"four\"\n", "steps"),
        ("steps = 4\nmode = 'sharp'\n", "mode"),
        ("steps = 4\n[oops\n", "line"),
        ("teacher_steps = 0\n", "teacher_steps"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, text, needle):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    r = run("distill", "--model", "countdown", "--recipe", recipe, "--cache-dir", tmp_path)
    assert r.exit_code in (1, 2) and r.stdout == "" and needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_interrupted_write_leaves_no_artifact(tmp_path, monkeypatch, artifact):
    from lsdtool import fileio

    sampler = Sampler.load(artifact[0])
    meta = sampler.meta

    def boom(fd):  # the temp file holds the bytes when the process is interrupted before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "fsync", boom)
    target = tmp_path / "c" / "x.safetensors"
    with pytest.raises(KeyboardInterrupt):
        artifacts.save(target, sampler, meta)
    assert list(target.parent.iterdir()) == []


def test_impossible_step_counts_are_refused(tmp_path):
    r = run("distill", "--model", "countdown", "--steps", "0", "--cache-dir", tmp_path)
    assert r.exit_code == 2 and r.stdout == ""
    r = run("distill", "--model", "countdown", "--steps", "64", "--teacher-steps", "32", "--cache-dir", tmp_path)
    assert r.exit_code == 1 and "teacher_steps" in r.stderr


@pytest.mark.parametrize("fixture", ["sedd-tiny-absorb", "sedd-tiny-uniform"])
def test_distill_and_sample_on_a_sedd_checkpoint_directory(tmp_path, fixture):
    model_dir = os.path.join(os.path.dirname(__file__), "fixtures", fixture)
    r = run("distill", "--model", model_dir, "--steps", "3", "--plus", "--teacher-steps", "12", "--samples", "4",
            "--batch", "4", "--iters", "3", "--cache-dir", tmp_path)
    assert r.exit_code == 0, r.output
    path = r.stdout.strip().splitlines()[-1]
    sampler = Sampler.load(path)
    meta = sampler.meta
    assert meta["model"] == fixture and meta["graph"] in ("absorb", "uniform") and sampler.steps == 3
    s = run("sample", "--sampler", path, "-n", "3", "--format", "jsonl")
    rows = [json.loads(line) for line in s.stdout.splitlines()]
    assert s.exit_code == 0 and len(rows) == 3 and all(len(row["tokens"]) == 24 for row in rows)
    if meta["graph"] == "absorb":
        assert all(max(row["tokens"]) < 64 for row in rows)
    other = run("sample", "--sampler", path, "--model", "countdown", "-n", "1")
    assert other.exit_code == 1 and "--force" in other.stderr
