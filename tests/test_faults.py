"""Faults and hostile input: every failure is one `Error:` line (exit 1 or 2), nothing on stdout, no
temp file left, no good file shrunk; interrupted runs resume byte for byte; a closed pipe stops quietly.

Full and read-only file systems are small tmpfs mounts (root with mount(8)); elsewhere a read-only
directory is a chmod and a full one is skipped with the reason.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lsdtool import artifacts, bounds, fileio, rng
from lsdtool.cli import main
from lsdtool.errors import describe
from lsdtool.samplers import Sampler

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ["sample", "--model", "countdown", "--steps", "2", "--format", "jsonl"]
CLEAN_ENV = {k: None for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_PROCID",
                               "SLURM_NTASKS", "LOCAL_RANK")}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env=CLEAN_ENV)


def one_error_line(r) -> str:
    assert r.exit_code in (1, 2), (r.exit_code, r.output)
    assert r.stdout == "", r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def lsd_process(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for k in CLEAN_ENV:
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "lsdtool.cli", *map(str, args)], env=env, **kw)


def wait_for_line(path: Path, proc: subprocess.Popen) -> None:
    """Poll until ``path`` holds a complete line (the first flushed batch); no sleeps as timing."""
    for _ in range(6000):
        if path.exists() and b"\n" in path.read_bytes():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path} never got a line")


# --- file systems ----------------------------------------------------------------------------------


@pytest.fixture
def mounts(tmp_path):
    """make(name, size, ro=False, fill=False): a tmpfs mounted at tmp_path/name (root only)."""
    made = []

    def make(name, size="64k", fill=False, files=None, ro=False):
        d = tmp_path / name
        d.mkdir()
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("a full or read-only file system needs root and mount(8) to make a tmpfs")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        made.append(d)
        for rel, data in (files or {}).items():
            (d / rel).write_bytes(data)
        if fill:
            with contextlib.suppress(OSError), open(d / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        if ro:
            subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        return d

    yield make
    for d in made:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def read_only(tmp_path, mounts):
    """make(name, files): a directory nothing can be written in (a read-only tmpfs as root, else chmod 555)."""
    chmodded = []

    def make(name, files=None):
        if os.geteuid() == 0:
            return mounts(name, files=files, ro=True)
        d = tmp_path / name
        d.mkdir()
        for rel, data in (files or {}).items():
            (d / rel).write_bytes(data)
        d.chmod(0o555)
        chmodded.append(d)
        return d

    yield make
    for d in chmodded:
        d.chmod(0o755)


# --- shared inputs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_samples():
    r = run(*SAMPLE, "-n", 3, "--seed", 1)
    assert r.exit_code == 0
    return r.stdout.encode()


def write_artifact(path: Path, countdown, ts=None, cs=None, **meta_changes) -> Path:
    sampler = Sampler.plain(4)
    meta = artifacts.metadata(countdown, sampler, {"plus": False, "objective": "teacher-path", "teacher_steps": 8, "seed": 0},
                              "", {"iterations": 0})
    meta = {**artifacts.describe(sampler, meta), **meta_changes}
    tensors = {"timesteps": sampler.timesteps if ts is None else torch.tensor(ts, dtype=torch.float64),
               "coeffs": sampler.coeffs if cs is None else torch.tensor(cs, dtype=torch.float64)}
    save_file(tensors, str(path), metadata=meta)
    return path


def sparse(path: Path, head: bytes, size: int = 2 * 10**9) -> Path:
    """A file of ``size`` bytes that starts with ``head`` and occupies almost no disk."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def huge_tensor_header() -> bytes:
    """A safetensors header whose coeffs claim nearly all of a 2 GB file."""
    n = (2 * 10**9 - 4096) // 8
    header = json.dumps({"__metadata__": {"format": "lsd.sampler", "format_version": "1"},
                         "timesteps": {"dtype": "F64", "shape": [n + 1], "data_offsets": [0, 8 * (n + 1)]},
                         "coeffs": {"dtype": "F64", "shape": [n], "data_offsets": [0, 8 * n]}}).encode()
    return struct.pack("<Q", len(header)) + header


# --- the corpus ------------------------------------------------------------------------------------


class Setup:
    def __init__(self, tmp: Path, good: bytes, countdown, mounts, read_only):
        self.tmp, self.good, self.countdown, self.mounts, self.read_only = tmp, good, countdown, mounts, read_only

    def samples(self, name="good.jsonl", where=None) -> Path:
        p = (where or self.tmp) / name
        p.write_bytes(self.good)
        return p

    def artifact(self, name="a.safetensors", **kw) -> Path:
        return write_artifact(self.tmp / name, self.countdown, **kw)


def _locked(s: Setup):
    p = s.samples()
    fd = os.open(p, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by this test process: lsd must not wait or write
    s.held = fd
    return [*SAMPLE, "-n", 5, "--seed", 1, "-o", p, "--resume"], "another lsd is writing"


CORPUS = {
    # out-of-range flags
    "seed-negative": lambda s: ([*SAMPLE, "--seed", -1], "--seed"),
    "seed-2**64": lambda s: ([*SAMPLE, "--seed", 2**64], "--seed"),
    "n-huge": lambda s: ([*SAMPLE, "-n", 99999999999999999999], "-n"),
    "n-negative": lambda s: ([*SAMPLE, "-n", -1], "-n"),
    "batch-zero": lambda s: ([*SAMPLE, "--batch-size", 0], "--batch-size"),
    "steps-huge": lambda s: (["sample", "--model", "countdown", "--steps", 10**12], "--steps"),
    "distill-seed": lambda s: (["distill", "--model", "countdown", "--seed", 2**64, "--cache-dir", s.tmp / "c"], "--seed"),
    "distill-lr-nan": lambda s: (["distill", "--model", "countdown", "--lr", "nan", "--cache-dir", s.tmp / "c"], "--lr"),
    "compare-nfe": lambda s: (["compare", "--model", "countdown", "--steps", "8,99999999999"], "NFE"),
    # devices
    "device-cuda:x": lambda s: ([*SAMPLE, "--device", "cuda:x"], "cuda:x"),
    "device-cuda:-1": lambda s: ([*SAMPLE, "--device", "cuda:-1"], "cuda:-1"),
    "device-bogus": lambda s: ([*SAMPLE, "--device", "bogus"], "bogus"),
    "device-meta": lambda s: ([*SAMPLE, "--device", "meta"], "meta"),
    "device-xpu": lambda s: ([*SAMPLE, "--device", "xpu"], "xpu"),
    "device-mps": lambda s: ([*SAMPLE, "--device", "mps"], "mps"),
    "device-cuda:99": lambda s: ([*SAMPLE, "--device", "cuda:99"], "cuda:99"),
    # sample -o as a transaction
    "rerun-over-output": lambda s: ([*SAMPLE, "-n", 5, "--seed", 1, "-o", s.samples()], "--resume"),
    "resume-over-text": lambda s: ([*SAMPLE, "-n", 5, "-o", s.tmp / "t.jsonl", "--resume"]
                                   if (s.tmp / "t.jsonl").write_text("my notes\n") else None, "line 1"),
    "resume-over-torn-text": lambda s: ([*SAMPLE, "-n", 5, "-o", s.tmp / "t.jsonl", "--resume"]
                                        if (s.tmp / "t.jsonl").write_text("my notes") else None, "refusing"),
    "output-is-input": lambda s: ([*SAMPLE, "-n", 1, "--input", s.samples("in.jsonl"), "-o", s.tmp / "in.jsonl",
                                   "--force"], "--input"),
    "output-is-directory": lambda s: ([*SAMPLE, "-n", 1, "-o", s.tmp], "directory"),
    "output-below-a-file": lambda s: ([*SAMPLE, "-n", 1, "-o", s.samples() / "x.jsonl"], "not a directory"),
    "second-writer": _locked,
    "output-read-only": lambda s: ([*SAMPLE, "-n", 5, "--seed", 1, "--resume", "-o",
                                    s.read_only("ro", {"good.jsonl": s.good}) / "good.jsonl"], "good.jsonl"),
    "output-full": lambda s: ([*SAMPLE, "-n", 40, "--seed", 1, "--resume", "-o",
                               s.mounts("full", fill=True, files={"good.jsonl": s.good}) / "good.jsonl"], "no space"),
    # other writers
    "merge-full": lambda s: (["merge", s.samples(), "-o", s.mounts("full", fill=True) / "m.jsonl"], "no space"),
    "merge-read-only": lambda s: (["merge", s.samples(), "-o", s.read_only("ro") / "m.jsonl"], "m.jsonl"),
    "merge-foreign": lambda s: (["merge", s.artifact()], "a.safetensors"),
    "distill-cache-read-only": lambda s: (["distill", "--model", "countdown", "--cache-dir", s.read_only("ro") / "c"], "/ro/c"),
    "distill-cache-full": lambda s: (["distill", "--model", "countdown", "--cache-dir", s.mounts("full", fill=True)], "no space"),
    "distill-cache-below-a-file": lambda s: (["distill", "--model", "countdown", "--cache-dir", s.samples() / "c"],
                                             "not a directory"),
    "distill-out-directory": lambda s: (["distill", "--model", "countdown", "--out", s.tmp, "--cache-dir", s.tmp / "c"],
                                        "directory"),
    "compare-csv-read-only": lambda s: (["compare", "--model", "countdown", "--samplers", "euler", "--csv",
                                         s.read_only("ro") / "t.csv"], "t.csv"),
    "compare-plot-directory": lambda s: (["compare", "--model", "countdown", "--samplers", "euler", "--plot", s.tmp],
                                         "directory"),
    # hostile artifacts
    "artifact-random": lambda s: (["inspect", s.tmp / "r.safetensors"]
                                  if (s.tmp / "r.safetensors").write_bytes(os.urandom(64)) else None, "r.safetensors"),
    "artifact-sparse-2GB": lambda s: (["inspect", sparse(s.tmp / "big.safetensors", huge_tensor_header())], "big"),
    "artifact-header-2GB": lambda s: (["sample", "--sampler", sparse(s.tmp / "h.safetensors", struct.pack("<Q", 2 * 10**9 - 100))],
                                      "header"),
    "artifact-phi-1e300": lambda s: (["sample", "--sampler", s.artifact(cs=[1.0, 1e300, 1.0, 1.0]), "-n", 1], "Phi"),
    "artifact-grid-below-1": lambda s: (["inspect", s.artifact(ts=[0.5, 0.3, 0.2, 0.1, 1e-5])], "tau_0"),
    "artifact-negative-phi": lambda s: (["inspect", s.artifact(cs=[1.0, -1.0, 1.0, 1.0], mode="temperature")], "Phi"),
}


def snapshot(root: Path) -> dict[Path, bytes | tuple]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            out[p] = p.read_bytes() if p.stat().st_size < 1 << 20 else (p.stat().st_size, p.stat().st_mtime_ns)
    return out


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_fault_corpus(case, tmp_path, good_samples, countdown, mounts, read_only):
    s = Setup(tmp_path, good_samples, countdown, mounts, read_only)
    s.held = None
    args, needle = CORPUS[case](s)
    before = snapshot(tmp_path)
    try:
        r = run(*args)
    finally:
        if s.held is not None:
            os.close(s.held)
    line = one_error_line(r)
    assert needle in line, line
    after = snapshot(tmp_path)
    assert not [p for p in after if fileio.is_temp(p)], "a temp file was left behind"
    assert set(after) == set(before), f"new files: {set(after) - set(before)}"
    for p, old in before.items():  # a good file never shrinks (a failed append may leave a torn tail)
        new = after[p]
        assert new[: len(old)] == old if isinstance(old, bytes) else new == old, p


# --- each class on its own -------------------------------------------------------------------------


def test_the_bounds_are_what_the_generator_honours():
    index = torch.tensor([0, 1, bounds.INDEX_LIMIT - 1, bounds.INDEX_LIMIT])
    u = rng.uniforms(7, rng.STREAM_STEP, index, 0, 4)
    assert torch.equal(u[3], u[0]) and not torch.equal(u[2], u[0])  # index 2**32 would repeat index 0
    top = rng.uniforms(bounds.SEED_LIMIT - 1, 0, index, 0, 4)
    assert torch.equal(rng.uniforms(bounds.SEED_LIMIT, 0, index, 0, 4), rng.uniforms(0, 0, index, 0, 4))
    assert not torch.equal(top, rng.uniforms(0, 0, index, 0, 4))
    assert run(*SAMPLE, "-n", 1, "--seed", bounds.SEED_LIMIT - 1).exit_code == 0
    assert run(*SAMPLE, "-n", 0).exit_code == 0


def test_rerun_refuses_and_force_replaces(tmp_path, good_samples):
    out = tmp_path / "o.jsonl"
    out.write_bytes(good_samples)
    line = one_error_line(run(*SAMPLE, "-n", 2, "--seed", 5, "-o", out))
    assert "--resume" in line and "--force" in line and out.read_bytes() == good_samples
    assert run(*SAMPLE, "-n", 2, "--seed", 5, "-o", out, "--force").exit_code == 0
    assert out.read_bytes() == run(*SAMPLE, "-n", 2, "--seed", 5).stdout.encode()
    empty = tmp_path / "e.jsonl"
    empty.touch()  # an empty file holds nothing to lose
    assert run(*SAMPLE, "-n", 1, "-o", empty).exit_code == 0 and empty.stat().st_size > 0


def test_a_failed_run_leaves_no_empty_output_behind(tmp_path):
    out = tmp_path / "o.jsonl"
    with pytest.raises(KeyboardInterrupt), fileio.locked_append(out):
        raise KeyboardInterrupt  # e.g. Ctrl-C during the first batch
    assert not out.exists()
    out.write_bytes(b"kept\n")
    with pytest.raises(KeyboardInterrupt), fileio.locked_append(out):
        raise KeyboardInterrupt
    assert out.read_bytes() == b"kept\n"  # a file it did not create is never removed


def test_full_disk_mid_run_then_resume_is_byte_identical(tmp_path, mounts):
    small = mounts("small", size="16k")
    out = small / "o.jsonl"
    args = [*SAMPLE, "-n", 24, "--seed", 3, "--batch-size", 4]
    line = one_error_line(run(*args, "-o", out))
    assert "no space left" in line and str(out) in line
    assert 0 < out.stat().st_size and not [p for p in small.iterdir() if fileio.is_temp(p)]
    moved = tmp_path / "o.jsonl"
    shutil.copyfile(out, moved)
    assert run(*args, "-o", moved, "--resume").exit_code == 0
    assert moved.read_bytes() == run(*args).stdout.encode()


def test_full_disk_during_an_atomic_write_names_the_target_and_cleans_up(mounts):
    full = mounts("full", fill=True, files={"keep.csv": b"old,data\n"})
    with pytest.raises(OSError) as info:
        fileio.write_text(full / "keep.csv", "new,data\n" * 5000)
    assert info.value.errno == errno.ENOSPC and describe(info.value) == f"cannot use {full / 'keep.csv'}: no space left on the device"
    assert sorted(p.name for p in full.iterdir()) == ["filler", "keep.csv"] and (full / "keep.csv").read_bytes() == b"old,data\n"


def test_killed_run_resumes_byte_identically_and_a_second_writer_is_refused(tmp_path):
    out = tmp_path / "o.jsonl"
    args = [*SAMPLE, "--seed", 4, "--batch-size", 2]
    proc = lsd_process(*args, "-n", 1_000_000, "-o", out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_line(out, proc)
        line = one_error_line(run(*args, "-n", 10**6, "-o", out, "--resume"))  # while the first one still runs
        assert "another lsd is writing" in line
    finally:
        proc.kill()
        proc.communicate()
    done = out.read_bytes().count(b"\n")
    n = done + 3
    assert run(*args, "-n", n, "-o", out, "--resume").exit_code == 0
    assert out.read_bytes() == run(*args, "-n", n).stdout.encode()


def test_sigterm_unwinds_with_143_and_complete_lines(tmp_path):
    out = tmp_path / "o.jsonl"
    proc = lsd_process(*SAMPLE, "--batch-size", 2, "-n", 1_000_000, "-o", out, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(out, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 143 and stdout == b"" and b"Traceback" not in stderr, stderr
    lines = out.read_bytes().split(b"\n")[:-1]  # complete lines; a resume would cut any torn tail
    assert lines and all(json.loads(line)["index"] == i for i, line in enumerate(lines))


def test_broken_pipe_stops_quietly_under_pipefail():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = f"set -o pipefail; {sys.executable} -m lsdtool.cli sample --model countdown --steps 2 -n 100000 --batch-size 4 | head -1"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, env=env)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert len(r.stdout.splitlines()) == 1


def test_artifacts_are_read_by_their_header_with_bounded_memory(tmp_path, countdown):
    good = write_artifact(tmp_path / "g.safetensors", countdown)
    padded = tmp_path / "padded.safetensors"
    sparse(padded, good.read_bytes())  # a valid artifact followed by 2 GB of zeros
    hostile = sparse(tmp_path / "big.safetensors", huge_tensor_header())
    tracemalloc.start()
    try:
        meta, ts, cs = artifacts.read(padded)
        with pytest.raises(artifacts.LsdError, match="at most"):
            artifacts.read(hostile)
        r = run("cache", "list", "--json", "--cache-dir", tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ts == Sampler.plain(4).timesteps.tolist() and meta["model"] == "countdown"
    assert r.exit_code == 0 and {Path(row["path"]).name for row in json.loads(r.stdout)} >= {"big.safetensors", "padded.safetensors"}
    assert peak < 50 * 2**20, peak  # the files are 2 GB each


def test_cache_lists_and_prunes_stale_temp_files_but_not_live_ones(tmp_path):
    cache = tmp_path / "cache"
    (cache / "countdown").mkdir(parents=True)
    stale = cache / "countdown" / f".x.safetensors.abc{fileio.TEMP_SUFFIX}"
    stale.write_bytes(b"half")
    with fileio.atomic_write(cache / "countdown" / "y.safetensors") as f:  # a writer still at work
        live = Path(next(p for p in (cache / "countdown").iterdir() if fileio.is_temp(p) and p != stale))
        rows = json.loads(run("cache", "list", "--json", "--cache-dir", cache).stdout)
        assert {(Path(r["path"]).name, r["stale"]) for r in rows if r.get("temp")} == {(stale.name, True), (live.name, False)}
        r = run("cache", "prune", "--cache-dir", cache)
        assert r.exit_code == 0 and r.stdout.split() == [str(stale)]
        assert live.exists() and not stale.exists()
        f.write(b"done")
    stale.write_bytes(b"half")
    r = run("cache", "rm", "--all", "--cache-dir", cache)
    assert r.exit_code == 0 and not list(cache.rglob("*.*"))


def test_artifacts_respect_the_umask(tmp_path, countdown):
    old = os.umask(0o002)
    try:
        write = Sampler.plain(2)
        meta = artifacts.metadata(countdown, write, {"plus": False}, "", {})
        path = artifacts.save(tmp_path / "s.safetensors", write, meta)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o664


def test_atomic_writes_follow_symlinks_and_leave_devices_alone(tmp_path):
    (tmp_path / "real.csv").write_text("old\n")
    (tmp_path / "link.csv").symlink_to("real.csv")
    fileio.write_text(tmp_path / "link.csv", "new\n")
    assert (tmp_path / "link.csv").is_symlink() and (tmp_path / "real.csv").read_text() == "new\n"
    fileio.write_text(os.devnull, "discarded\n")  # written in place, never replaced by a regular file
    assert Path(os.devnull).is_char_device()
    assert run(*SAMPLE, "-n", 2, "-o", os.devnull).exit_code == 0 and Path(os.devnull).is_char_device()


def test_a_cuda_index_past_the_devices_is_refused(monkeypatch):
    from lsdtool.generation import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine, seen from a CPU test
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0") and pick_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        pick_device("cuda:1")
