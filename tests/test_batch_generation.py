import json
import os

import pytest
import torch

from lsdtool import metrics
from conftest import run_cli
from lsdtool.sharding import launcher_device, parse_shard, shard_from_env, shard_path, shard_range

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
BASE = ["sample", "--model", "countdown", "--steps", "2", "--format", "jsonl"]
run = run_cli


def ok(*args, env=None):
    r = run(*args, env=env)
    assert r.exit_code == 0, r.output
    return r


def fails(*args, env=None, match=""):
    r = run(*args, env=env)
    assert r.exit_code in (1, 2), r.output
    assert r.stdout == "" and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and match in lines[0], r.stderr
    return lines[0]


def rows(text):
    return [json.loads(line) for line in text.splitlines()]


# --- shards ------------------------------------------------------------------------------------


def test_shard_range_blocks():
    assert [list(shard_range(7, i, 3)) for i in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [len(shard_range(2, i, 4)) for i in range(4)] == [1, 1, 0, 0]
    for n in range(12):
        for num in range(1, 6):
            blocks = [shard_range(n, i, num) for i in range(num)]
            assert [j for b in blocks for j in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_parse_shard():
    assert parse_shard("2/5") == (2, 5) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("5/5", "0/0", "-1/3", "1/-2", "x", "1/", "1.0/2", ""):
        with pytest.raises(ValueError):
            parse_shard(bad)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8)),
        ({"RANK": "3"}, None),
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5"}, (2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
          "SLURM_ARRAY_TASK_STEP": "2"}, (3, 4)),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (1, 2)),
        # an array task launched with srun: the array decides
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (1, 3)),
        ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "6"}, (0, 2)),
    ],
)
def test_shard_from_env(env, expected):
    assert shard_from_env(env) == expected


@pytest.mark.parametrize("env", [{"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "a", "WORLD_SIZE": "2"},
                                 {"SLURM_PROCID": "0", "SLURM_NTASKS": "0"},
                                 {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "3"}])
def test_shard_from_env_rejects_inconsistent_launchers(env):
    with pytest.raises(ValueError):
        shard_from_env(env)


def test_local_rank_picks_the_gpu_only_for_auto(monkeypatch):
    assert launcher_device("auto", {"LOCAL_RANK": "1"}) in ("auto", "cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launcher_device("auto", {"LOCAL_RANK": "1", "RANK": "5"}) == "cuda:1"
    assert launcher_device(None, {"LOCAL_RANK": "0"}) == "cuda:0"
    assert launcher_device("cpu", {"LOCAL_RANK": "1"}) == "cpu"
    assert launcher_device("auto", {}) == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launcher_device("auto", {"LOCAL_RANK": "1"}) == "auto"


def test_shard_path():
    assert shard_path("out.jsonl", 0, 1) == "out.jsonl"
    assert shard_path("d/out.jsonl", 3, 12) == "d/out.shard-00003-of-00012.jsonl"
    assert shard_path("out", 1, 2) == "out.shard-00001-of-00002"
    assert shard_path("s-{shard}-{num_shards}.jsonl", 2, 4) == "s-00002-00004.jsonl"
    assert shard_path("s{shard:d}.jsonl", 2, 4) == "s2.jsonl"


@pytest.mark.parametrize("n, num_shards", [(7, 3), (5, 1), (6, 2), (2, 5), (0, 2)])
def test_shards_reassemble_the_unsharded_run(tmp_path, n, num_shards):
    full = ok(*BASE, "-n", n, "--seed", 5, "--batch-size", 3).stdout
    parts = [ok(*BASE, "-n", n, "--seed", 5, "--shard", f"{i}/{num_shards}").stdout for i in range(num_shards)]
    assert "".join(parts) == full
    out = tmp_path / "s.jsonl"
    for i in range(num_shards):
        assert ok(*BASE, "-n", n, "--seed", 5, "--shard", f"{i}/{num_shards}", "-o", out).stdout == ""
    names = [shard_path(str(out), i, num_shards) for i in range(num_shards)]
    assert "".join(open(p).read() for p in names) == full  # empty shards still leave an (empty) file
    ok("merge", *names, "-o", tmp_path / "merged.jsonl")
    assert (tmp_path / "merged.jsonl").read_text() == full
    assert ok("merge", *reversed(names)).stdout == full


def test_launcher_env_equals_shard_flag():
    for i in range(3):
        flag = ok(*BASE, "-n", 8, "--shard", f"{i}/3").stdout
        assert ok(*BASE, "-n", 8, env={"RANK": str(i), "WORLD_SIZE": "3"}).stdout == flag
        assert ok(*BASE, "-n", 8, env={"SLURM_ARRAY_TASK_ID": str(i + 1), "SLURM_ARRAY_TASK_MIN": "1",
                                       "SLURM_ARRAY_TASK_COUNT": "3"}).stdout == flag
    # the flag wins over the environment
    assert ok(*BASE, "-n", 8, "--shard", "0/1", env={"RANK": "1", "WORLD_SIZE": "3"}).stdout == ok(*BASE, "-n", 8).stdout


# --- resume ------------------------------------------------------------------------------------


def test_resume_after_a_killed_run_equals_an_uninterrupted_one(tmp_path):
    full = tmp_path / "full.jsonl"
    ok(*BASE, "-n", 9, "--seed", 2, "-o", full)
    data = full.read_bytes()
    lines = data.splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    for torn in (lines[4][:37], lines[4][:-1], b""):  # mid-record, newline missing, clean stop
        out.write_bytes(b"".join(lines[:4]) + torn)
        ok(*BASE, "-n", 9, "--seed", 2, "--batch-size", 2, "-o", out, "--resume")
        assert out.read_bytes() == data
    ok(*BASE, "-n", 9, "--seed", 2, "-o", out, "--resume")  # complete: nothing to do
    assert out.read_bytes() == data
    out.unlink()
    ok(*BASE, "-n", 9, "--seed", 2, "-o", out, "--resume")  # no file yet: a fresh run
    assert out.read_bytes() == data


def test_resume_of_a_shard(tmp_path):
    out = tmp_path / "o.jsonl"
    ok(*BASE, "-n", 7, "--shard", "1/2", "-o", out)
    shard = tmp_path / "o.shard-00001-of-00002.jsonl"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    ok(*BASE, "-n", 7, "-o", out, "--resume", env={"RANK": "1", "WORLD_SIZE": "2"})
    assert shard.read_bytes() == data


def test_resume_refuses_a_different_run(tmp_path):
    out = tmp_path / "o.jsonl"
    ok(*BASE, "-n", 4, "--seed", 1, "-o", out)
    fails(*BASE, "-n", 4, "--seed", 2, "-o", out, "--resume", match="was sampled with seed 1, this run uses seed 2")
    fails(*BASE, "-n", 4, "--seed", 1, "--steps", 3, "-o", out, "--resume", match="sampler euler-2")
    fails(*BASE, "-n", 2, "--seed", 1, "-o", out, "--resume", match="more samples")
    fails(*BASE, "-n", 4, "--resume", match="--resume needs -o")
    fails("sample", "--model", "countdown", "--steps", 2, "-n", 4, "-o", out, "--resume", match="--format jsonl")
    out.write_text('{"index":0}\nnot json\n{"index":2}\n')
    fails(*BASE, "-n", 4, "-o", out, "--resume", match="line 2 is not valid JSON")


# --- merge -------------------------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path):
    """Three shards of a 7-sample run (seed 1, euler-2) and one more sample from another run."""
    out = tmp_path / "s.jsonl"
    for i in range(3):
        ok(*BASE, "-n", 7, "--seed", 1, "--shard", f"{i}/3", "-o", out)
    paths = [tmp_path / f"s.shard-0000{i}-of-00003.jsonl" for i in range(3)]
    return [str(p) for p in paths]


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_merge_catches_gaps_duplicates_and_mixes(tmp_path, shards):
    a, b, c = shards
    fails("merge", a, c, match="shard 1 of 3 is missing")
    lines = open(b).read().splitlines()  # indices 3, 4
    fails("merge", a, _write(tmp_path / "b.jsonl", lines[1:]), c, match="index 3 is missing")
    fails("merge", a, b, _write(tmp_path / "dup.jsonl", lines[1:]), c, match=f"index 4 appears in {b} and {tmp_path / 'dup.jsonl'}")
    fails("merge", a, _write(tmp_path / "twice.jsonl", lines + lines[:1]), c, match="index 3 appears twice in")
    other = tmp_path / "other"
    other.mkdir()
    for args, what in ((["--seed", 2], "seed 2"), (["--steps", 3, "--seed", 1], "sampler euler-3"),
                       (["--steps", 2, "--seed", 1, "--base", "tweedie"], "sampler tweedie-2")):
        ok(*BASE, "-n", 7, *args, "--shard", "1/3", "-o", other / "s.jsonl", "--force")  # replaces the last one
        mixed = str(other / "s.shard-00001-of-00003.jsonl")
        fails("merge", a, mixed, c, match=f"{mixed} line 1 was sampled with {what}, {a} with")
    record = json.loads(lines[0])
    record["model"], record["model_fingerprint"] = "sedd-small", "hub:louaaron/sedd-small@x"
    fails("merge", a, _write(tmp_path / "m.jsonl", [json.dumps(record), lines[1]]), c, match="sampled with model sedd-small")


def test_merge_rejects_torn_and_foreign_files(tmp_path, shards):
    a, b, c = shards
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(open(b, "rb").read()[:-5])
    fails("merge", a, str(torn), c, match=f"{torn} line 2 is incomplete")
    fails("merge", a, _write(tmp_path / "t.txt", ["1 2 3"]), match="t.txt line 1 is not valid JSON")
    fails("merge", a, _write(tmp_path / "o.jsonl", ['{"a": 1}']), match="o.jsonl line 1 is not a sample record")
    fails("merge", a, str(tmp_path / "nope.jsonl"), match="nope.jsonl")
    out = tmp_path / "m.jsonl"
    first = _write(tmp_path / "first.jsonl", open(a).read().splitlines())
    fails("merge", first, c, "-o", out, match="index 3 is missing (2 indices missing in all)")
    assert not out.exists()


# --- conditioning ------------------------------------------------------------------------------


def test_records_carry_provenance_and_given_spans():
    plain = rows(ok(*BASE, "-n", 2, "--seed", 4).stdout)
    assert list(plain[0]) == ["index", "tokens", "text", "seed", "sampler", "model", "model_fingerprint"]
    assert plain[0]["seed"] == 4 and plain[0]["sampler"] == "euler-2" and plain[0]["model"] == "countdown"
    cond = rows(ok(*BASE, "-n", 2, "--prefix", "9 8 7", "--suffix", "1 0").stdout)
    assert all(r["given"] == [[0, 3], [254, 256]] for r in cond)
    assert all(r["tokens"][:3] == [9, 8, 7] and r["tokens"][-2:] == [1, 0] for r in cond)


def test_countdown_prefix_is_kept_and_continued_without_raising_the_error():
    n, steps, seed = 256, 8, 0
    args = ["sample", "--model", "countdown", "--steps", steps, "-n", n, "--seed", seed, "--batch-size", 128, "--format", "tokens"]
    uncond = torch.tensor([[int(v) for v in line.split()] for line in ok(*args).stdout.splitlines()])
    cond = torch.tensor([[int(v) for v in line.split()] for line in ok(*args, "--prefix", "9 8 7").stdout.splitlines()])
    assert cond.shape == uncond.shape == (n, 256)
    assert (cond[:, :3] == torch.tensor([9, 8, 7])).all()
    # the exact model puts 6, 5 after 9 8 7 with probability ~1; the first step decodes them independently
    assert ((cond[:64, 3] == 6) & (cond[:64, 4] == 5)).double().mean() >= 0.9
    e_cond, e_uncond = metrics.countdown_errors(cond)["error"], metrics.countdown_errors(uncond)["error"]
    # measured 0.083 vs 0.086 with a standard error of the difference of about 0.0017: allow 3 of them
    assert e_cond <= e_uncond + 0.005, (e_cond, e_uncond)


def test_distilled_artifacts_condition_and_name_themselves(tmp_path, countdown):
    from lsdtool import artifacts
    from lsdtool.samplers import Sampler

    plain = Sampler.plain(3)
    learned = Sampler(torch.tensor([1.0, 0.4, 0.1, 1e-5], dtype=torch.float64), torch.tensor([1.0, 0.9, 1.1], dtype=torch.float64))
    paths = []
    for name, sampler in (("plain", plain), ("learned", learned)):
        paths.append(tmp_path / f"{name}.safetensors")
        artifacts.save(paths[-1], sampler, artifacts.metadata(countdown, sampler, {"steps": 3}, "", {}))
    args = ["sample", "--format", "jsonl", "-n", 3, "--prefix", "9 8 7"]
    untrained, fitted = (rows(ok(*args, "--sampler", p).stdout) for p in paths)
    assert untrained == rows(ok(*args, "--model", "countdown", "--steps", 3).stdout)  # Phi = 1 on the plain grid
    assert fitted[0]["sampler"].startswith("euler-3-") and all(r["tokens"][:3] == [9, 8, 7] for r in fitted)


def test_infill_and_suffix_from_input_file(tmp_path):
    free = [None] * 256
    infill = free[:]
    infill[10:13] = [2, 1, 0]
    infill[200] = 31
    lines = [{"tokens": infill}, {}, {"suffix": "2 1 0"}, {"prefix": [5, 4]}]
    inp = _write(tmp_path / "in.jsonl", map(json.dumps, lines))
    got = rows(ok(*BASE, "--input", inp, "--seed", 3).stdout)  # n defaults to the number of lines
    assert [r["index"] for r in got] == [0, 1, 2, 3]
    assert got[0]["tokens"][10:13] == [2, 1, 0] and got[0]["tokens"][200] == 31
    assert got[0]["given"] == [[10, 13], [200, 201]] and got[1]["given"] == []
    assert got[2]["tokens"][-3:] == [2, 1, 0] and got[2]["given"] == [[253, 256]]
    assert got[3]["tokens"][:2] == [5, 4]
    # an unconditioned line is the plain sample: conditioning never touches another sample's randomness
    plain = rows(ok(*BASE, "-n", 4, "--seed", 3).stdout)
    assert got[1]["tokens"] == plain[1]["tokens"]
    assert [r["index"] for r in rows(ok(*BASE, "--input", inp, "-n", 2).stdout)] == [0, 1]
    assert ok(*BASE, "--input", inp, "--shard", "1/2").stdout.splitlines() == ok(*BASE, "--input", inp).stdout.splitlines()[2:]


def test_uniform_model_keeps_given_positions(tmp_path):
    model = os.path.join(FIXTURES, "sedd-tiny-uniform")  # V = 64, L = 24
    given = [None] * 24
    given[0:4], given[20] = [1, 2, 3, 4], 63
    inp = _write(tmp_path / "in.jsonl", [json.dumps({"tokens": given}), "{}"] * 2)
    args = ["sample", "--model", model, "--steps", 3, "--format", "jsonl", "--seed", 1]
    got = rows(ok(*args, "--input", inp).stdout)
    plain = rows(ok(*args, "-n", 4).stdout)
    for r in got[::2]:
        assert r["tokens"][:4] == [1, 2, 3, 4] and r["tokens"][20] == 63 and r["given"] == [[0, 4], [20, 21]]
    assert [r["tokens"] for r in got[1::2]] == [r["tokens"] for r in plain[1::2]]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--prefix", " ".join(["1"] * 257)], "prefix has 257 tokens but samples are 256 long"),
        (["--prefix", " ".join(["1"] * 200), "--suffix", " ".join(["1"] * 57)], "overlap"),
        (["--prefix", "3 40"], "0..31"),
        (["--prefix", "a b"], "integers"),
        (["--prefix", "1", "--input", "x.jsonl"], "not both"),
        (["--input", "no-such.jsonl"], "no-such.jsonl"),
        (["--shard", "2/2"], "0..1"),
        (["--shard", "1/0"], "at least 1"),
        (["--shard", "half"], "I/N"),
    ],
)
def test_bad_conditioning_and_shards_fail_in_one_line(args, match):
    fails(*BASE, "-n", 2, *args, match=match)


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"tokens": [1, 2]}', "line 2: tokens must be a list of 256"),
        ('{"tokens": [' + ",".join(["32"] * 256) + "]}", "token id 32"),
        ('{"prefix": "1", "tokens": null}', "not both"),
        ('{"prefx": "1"}', "unknown key 'prefx'"),
        ("[1, 2]", "expected an object"),
        ("", "line 2: not valid JSON"),
        ('{"prefix": 3}', "string or a list"),
    ],
)
def test_bad_input_lines_fail_in_one_line(tmp_path, line, match):
    inp = _write(tmp_path / "in.jsonl", ["{}", line, "{}"])
    fails(*BASE, "--input", inp, match=match)
    fails(*BASE, "--input", _write(tmp_path / "ok.jsonl", ["{}"]), "-n", 2, match="more samples than")
