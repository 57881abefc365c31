"""Every file-writing flag treats a missing directory alike: one line naming the path, exit 1, nothing
created (docs/faults.md, "Missing directories"); and the friendly faces of objects and listings."""

import json

import pytest
from click.testing import CliRunner

from lsdtool import fileio
from lsdtool.cli import main
from lsdtool.errors import LsdError
from lsdtool.samplers import Sampler

ENV = {k: None for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_PROCID",
                         "SLURM_NTASKS", "LOCAL_RANK")}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env=ENV)


def _shard(path, lines):
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


WRITERS = {
    "sample -o": lambda tmp, out: ["sample", "--model", "countdown", "--steps", "2", "-n", "2", "--format", "jsonl", "-o", out],
    "distill --out": lambda tmp, out: ["distill", "--model", "countdown", "--steps", "2", "--teacher-steps", "4", "--samples", "2",
                                       "--batch", "2", "--iters", "1", "--cache-dir", tmp / "cache", "--out", out],
    "compare --csv": lambda tmp, out: ["compare", "--model", "countdown", "--steps", "2", "-n", "2", "--samplers", "euler",
                                       "--no-teacher", "--cache-dir", tmp / "cache", "--csv", out],
    "compare --plot": lambda tmp, out: ["compare", "--model", "countdown", "--steps", "2", "-n", "2", "--samplers", "euler",
                                        "--no-teacher", "--cache-dir", tmp / "cache", "--plot", out],
    "merge -o": lambda tmp, out: ["merge", _shard(tmp / "a.jsonl", []), "-o", out],
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_missing_directory_is_refused_by_every_writer(writer, tmp_path):
    out = tmp_path / "missing" / "dir" / "out.file"
    r = run(*WRITERS[writer](tmp_path, out))
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "does not exist" in lines[0] and "mkdir -p" in lines[0]
    assert not (tmp_path / "missing").exists() and r.stdout == ""


def test_check_file_refuses_a_missing_directory_but_check_dir_allows_the_cache(tmp_path):
    with pytest.raises(LsdError, match="does not exist"):
        fileio.check_file(tmp_path / "nope" / "x.json")
    fileio.check_file(tmp_path / "x.json")  # an existing directory is fine
    fileio.check_dir(tmp_path / "cache" / "deep")  # the cache is lsd's own: created when first written
    assert not (tmp_path / "nope").exists()


def test_sample_into_an_existing_directory_still_writes(tmp_path):
    (tmp_path / "d").mkdir()
    r = run("sample", "--model", "countdown", "--steps", "2", "-n", "2", "--format", "jsonl", "-o", tmp_path / "d" / "o.jsonl")
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "d" / "o.jsonl").read_text().splitlines()) == 2


def test_sampler_repr_is_one_line_without_the_metadata(tmp_path):
    plain = Sampler.plain(8, "theta-trapezoidal")
    assert repr(plain) == "Sampler(plain, theta-trapezoidal, steps=8, nfe=16)"
    s = Sampler.plain(4)
    s.meta = {"model": "countdown", "model_fingerprint": "x", "graph": "absorb", "noise": "loglinear", "plus": "true",
              "fit": json.dumps({"loss_before": [1.0], "loss_after": [0.5]}), "recipe": "steps = 4\n"}
    path = s.save(tmp_path / "a.safetensors")
    loaded = Sampler.load(path)
    text = repr(loaded)
    assert "\n" not in text and text == f"Sampler(lsd+, euler, steps=4, nfe=4, model=countdown, path={str(path)!r})"
    assert "loss_before" not in text and "recipe" not in text
    assert loaded.fit == {"loss_before": [1.0], "loss_after": [0.5]}  # kept once, in meta["fit"]


def test_cache_list_prints_whole_paths_into_a_pipe(tmp_path):
    cache = tmp_path / ("a-very-long-directory-name-" * 6) / "cache"
    s = Sampler.plain(2)
    s.meta = {"model": "countdown", "model_fingerprint": "x", "graph": "absorb", "noise": "loglinear", "plus": "false",
              "fit": "{}"}
    path = s.save(cache / "countdown" / "countdown-lsd-2-0123456789abcdef.safetensors")
    r = run("cache", "list", "--cache-dir", cache)  # CliRunner's stdout is not a terminal
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split("\t")[-1] == "path" and lines[1].split("\t")[-1] == str(path) and "…" not in r.stdout
