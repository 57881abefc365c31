"""The CPU engine fixes glibc's malloc thresholds once (so row-chunk temporaries stay in the heap), unless the
user set their own."""

import os
import subprocess
import sys

import torch

from lsdtool import allocator
from lsdtool.samplers import Sampler, sample

PROBE = "from lsdtool import allocator; print(allocator.keep_temporaries(), allocator.keep_temporaries())"


def probe(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in allocator._USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_thresholds_are_set_once_on_glibc_and_never_over_the_users_own():
    glibc = bool(os.confstr("CS_GNU_LIBC_VERSION")) if hasattr(os, "confstr") else False
    assert probe() == ("True True" if glibc else "False False")
    assert probe(MALLOC_TRIM_THRESHOLD_="1048576") == "False False"
    assert probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1048576") == "False False"


def test_a_cpu_run_asks_for_them(monkeypatch):
    from test_adaptive import ContextModel

    calls = []
    monkeypatch.setattr(allocator, "keep_temporaries", lambda: calls.append(1) or True)
    with torch.no_grad():
        sample(ContextModel(), Sampler.plain(2, "euler"), torch.arange(2), 0)
    assert calls
