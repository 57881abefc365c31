"""The teacher rollout over torch.distributed: 2 Gloo ranks on the CPU give the single-process artifact."""

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lsdtool import cache, distillation, distributed, recipes
from lsdtool.models import load

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                 "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
COUNTDOWN = dict(steps=4, plus=True, teacher_steps=32, samples=12, batch=8, iters=2)  # 2 batches of 8 and 4
SEDD = dict(steps=3, plus=True, teacher_steps=16, samples=8, batch=2, iters=2)  # 4 batches: 2 per rank


def flags(overrides):
    out = []
    for k, v in overrides.items():
        out += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", LSD_DIST_TIMEOUT="60", **extra)
    return env


@contextlib.contextmanager
def one_thread():
    """The ranks' setting (OMP_NUM_THREADS=1), for the single-process references."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def single_process(model_name, overrides, cache_dir):
    """The reference: the same recipe distilled in this process."""
    with one_thread():
        return cache.load_or_distill(load(model_name), overrides, cache_dir=cache_dir).path


def launch_ranks(args, cache_dir, style="torchrun", programs=None):
    """Start 2 ranks of ``python -m lsdtool ARGS`` with a launcher's variables; (returncode, stdout, stderr) each."""
    port, procs = free_port(), []
    for rank in range(2):
        if style == "torchrun":
            extra = dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        else:
            extra = dict(SLURM_PROCID=str(rank), SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                         SLURM_STEP_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        program = (programs or {}).get(rank)
        head = [sys.executable, "-c", program] if program else [sys.executable, "-m", "lsdtool"]
        procs.append(subprocess.Popen([*head, *args, "--cache-dir", str(cache_dir)], env=clean_env(**extra),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        out.append((p.returncode, stdout, stderr))
    return out


def same_artifact(a, b):
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return all(torch.equal(ta[k], tb[k]) for k in ("timesteps", "coeffs"))


# ---------------------------------------------------------------------------------------------
# the launcher's environment


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"},
     distributed.Launch(1, 4, 1, "n1", 29500, "torchrun")),
    ({"RANK": "0", "WORLD_SIZE": "1"}, None),  # one process: nothing to set up
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
      "SLURM_STEP_NODELIST": "gpu[07-08,11],cpu3"}, distributed.Launch(5, 8, 1, "gpu07", 15000 + 123456 % 20000, "srun")),
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "head", "MASTER_PORT": "1234",
      "SLURM_STEP_NODELIST": "x[1-2]"}, distributed.Launch(1, 2, 0, "head", 1234, "srun")),
    # an sbatch script run without srun is one process even though SLURM_NTASKS says 4
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, None),
])
def test_launch_from_env(env, expected):
    assert distributed.launch_from_env(env) == expected


@pytest.mark.parametrize("env", [
    {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
    {"RANK": "x", "WORLD_SIZE": "2"},
    {"RANK": "0", "WORLD_SIZE": "2"},  # no master
    {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "http"},
])
def test_launch_from_env_rejects_bad_values(env):
    with pytest.raises(ValueError):
        distributed.launch_from_env(env)


@pytest.mark.parametrize("nodelist, host", [("node1", "node1"), ("gpu[03-05,9],cpu1", "gpu03"),
                                            ("a,b", "a"), ("r[1-2]-n[007-009]", "r1-n007"), ("x[10]", "x10")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert distributed.first_host(nodelist) == host


def test_timeout_from_env():
    assert distributed.timeout_seconds({}) == distributed.DEFAULT_TIMEOUT
    assert distributed.timeout_seconds({"LSD_DIST_TIMEOUT": "2.5"}) == 2.5
    with pytest.raises(ValueError):
        distributed.timeout_seconds({"LSD_DIST_TIMEOUT": "0"})


@pytest.mark.parametrize("n, batch, size", [(12, 8, 2), (8, 2, 2), (10, 2, 3), (7, 2, 8), (128, 128, 2), (5, 1, 5)])
def test_rollout_rows_cover_every_trajectory_once(n, batch, size):
    blocks = [distillation.rollout_rows(n, batch, r, size) for r in range(size)]
    assert [i for b in blocks for i in b] == list(range(n))
    if -(-n // batch) >= size:  # whole batches of the single-process run: the model sees the same rows
        assert all(b.start % batch == 0 for b in blocks if len(b))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= batch
    else:
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


# ---------------------------------------------------------------------------------------------
# two Gloo ranks on the CPU


def test_torchrun_countdown_matches_one_process(tmp_path):
    reference = single_process("countdown", COUNTDOWN, tmp_path / "one")
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                        "--master-port", str(port), "-m", "lsdtool", "distill", "--model", "countdown", *flags(COUNTDOWN),
                        "--cache-dir", str(tmp_path / "two")], env=clean_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    path = Path(lines[-1])
    assert lines == [str(path)] * 2  # every rank prints the path
    assert path.relative_to(tmp_path / "two") == reference.relative_to(tmp_path / "one")  # the same cache key
    assert same_artifact(path, reference)  # bit for bit


KEEPS_ROLLOUT = textwrap.dedent("""
    import sys
    from safetensors.torch import save_file
    from lsdtool import distillation
    from lsdtool.cli import main
    real = distillation.fit_teacher_path
    def fit(rollout, recipe):
        save_file({{k: getattr(rollout, k).contiguous() for k in {names!r}}}, {path!r})
        return real(rollout, recipe)
    distillation.fit_teacher_path = fit
    main(sys.argv[1:], prog_name="lsd")
""")
SUMMARIES = ("states", "reveal_step", "reveal_logp")


def test_srun_sedd_fixture_matches_one_process_and_hits_the_cache(tmp_path):
    from safetensors.torch import load_file

    model = str(FIXTURES / "sedd-tiny-absorb")
    reference = single_process(model, SEDD, tmp_path / "one")
    args = ["distill", "--model", model, *flags(SEDD)]
    kept = tmp_path / "rollout.safetensors"  # what rank 0 fits on
    ranks = launch_ranks(args, tmp_path / "two", style="srun",
                         programs={0: KEEPS_ROLLOUT.format(names=SUMMARIES, path=str(kept))})
    assert [code for code, _, _ in ranks] == [0, 0], ranks[0][2] + ranks[1][2]
    sedd = load(model)
    with one_thread():
        one = distillation.TeacherRollout(sedd, recipes.effective(sedd.name, overrides=SEDD), torch.device("cpu"))
    gathered = load_file(str(kept))
    assert all(torch.equal(gathered[k], getattr(one, k)) for k in SUMMARIES)  # every trajectory in its place
    path = Path(ranks[0][1].splitlines()[-1])
    assert all(out.splitlines()[-1] == str(path) for _, out, _ in ranks)
    assert path.relative_to(tmp_path / "two") == reference.relative_to(tmp_path / "one")
    assert same_artifact(path, reference)
    written = path.stat().st_mtime_ns
    again = launch_ranks(args, tmp_path / "two", style="srun")  # a hit: answered on every rank, no rollout
    assert [(code, out.splitlines()[-1]) for code, out, _ in again] == [(0, str(path))] * 2
    assert "cache hit" in again[0][2] and "ranks" not in again[0][2] and path.stat().st_mtime_ns == written


FAULTY = textwrap.dedent("""
    import os, sys
    from lsdtool import distillation
    from lsdtool.cli import main
    real_iterate, real_fit = distillation.iterate, distillation.fit_teacher_path
    def iterate(*args, **kw):  # the fault strikes mid-rollout
        for n, step in enumerate(real_iterate(*args, **kw)):
            if n == 3 and {in_rollout}:
                {fault}
            yield step
    def fit(*args, **kw):
        if not {in_rollout}:
            {fault}
        return real_fit(*args, **kw)
    distillation.iterate, distillation.fit_teacher_path = iterate, fit
    main(sys.argv[1:], prog_name="lsd")
""")


@pytest.mark.parametrize("faulty, in_rollout, fault, reason", [
    (1, True, "os._exit(3)", "lost contact with the other ranks while rolling out the teacher"),
    (1, True, "raise MemoryError('out of memory on rank 1')", "rank 1 failed while rolling out the teacher: out of memory on rank 1"),
    (0, False, "raise distillation.LsdError('no room for the fit')", "rank 0 failed to fit the sampler: no room for the fit"),
])
def test_a_rank_that_fails_stops_the_others_with_one_line_and_no_artifact(tmp_path, faulty, in_rollout, fault, reason):
    args = ["distill", "--model", "countdown", *flags(COUNTDOWN)]
    ranks = launch_ranks(args, tmp_path, programs={faulty: FAULTY.format(in_rollout=in_rollout, fault=fault)})
    (code, out, err), other = ranks[faulty], ranks[1 - faulty]
    assert code != 0 and other[0] == 1 and other[1] == ""
    errors = [line for line in other[2].splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and other[2].splitlines()[-1] == errors[0] and reason in errors[0], other[2]
    assert "Traceback" not in other[2]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing written, not even a temp file
