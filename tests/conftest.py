import os

import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# what a launcher (torchrun, SLURM) sets; the test runner itself may run under one
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
                 "SLURM_ARRAY_TASK_STEP", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK")


def run_cli(*args, env=None, **kw):
    """``lsd ARGS`` in-process (arguments str()-ed), with stdout and stderr kept apart. Launcher variables are
    cleared so that a test runner started under SLURM or torchrun does not shard the command."""
    from lsdtool.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], env={**{k: None for k in LAUNCHER_VARS}, **(env or {})}, **kw)


@pytest.fixture(scope="session")
def countdown():
    from lsdtool.models import load

    return load("countdown")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("LSD_CACHE_DIR", str(d))
    return d
