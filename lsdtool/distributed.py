"""One distillation across processes (DESIGN §6): the launcher's environment, the process group, and
the few collectives the teacher rollout needs.

Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or ``srun`` (SLURM_PROCID,
SLURM_STEP_NUM_TASKS, SLURM_LOCALID; the master is MASTER_ADDR/MASTER_PORT, else the first node of
the step and a port derived from the job id) every rank rolls out a contiguous block of the teacher
trajectories; rank 0 gathers the summaries, fits and writes the artifact, and tells the others its
path. Control messages go over Gloo, whose errors reach Python, so a rank that fails or exits makes
the others stop with one line; the summaries go over NCCL when every rank has a GPU of its own.
Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

from lsdtool.errors import LsdError, first_line
from lsdtool.sharding import _int

DEFAULT_TIMEOUT = 1800.0  # seconds a collective may wait for the other ranks (LSD_DIST_TIMEOUT overrides)
FIT_WAIT = 7 * 24 * 3600.0  # the other ranks wait this long for rank 0's fit; a rank that exits is noticed at once
_T = TypeVar("_T")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a launched job, read from the launcher's environment."""

    rank: int
    size: int
    local_rank: int
    addr: str
    port: int
    launcher: str  # "torchrun" or "srun"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[03-05,9],cpu1`` -> ``gpu03``, ``a[1-2]-b[07]`` -> ``a1-b07``."""
    head = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if not head:
        raise ValueError(f"cannot read the first host of the SLURM node list {nodelist!r}")
    return re.sub(r"\[([^\],\-]+)[^\]]*\]", r"\1", head.group(0))


def launch_from_env(env: Mapping[str, str]) -> Launch | None:
    """The job this process belongs to (torchrun, else an srun step), or None for a single process.

    An sbatch script run without srun sets SLURM_PROCID and SLURM_NTASKS but starts one process, so
    srun is recognised by SLURM_STEP_NUM_TASKS, which only srun sets; array tasks are separate jobs.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        launcher, addr, port = "torchrun", env.get("MASTER_ADDR"), env.get("MASTER_PORT")
        if size > 1 and not (addr and port):
            raise ValueError("RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not (use torchrun, or set both)")
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        rank, size = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher, addr, port = "srun", env.get("MASTER_ADDR"), env.get("MASTER_PORT")
        if not addr:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            addr = first_host(nodes) if nodes else "127.0.0.1"
        if not port:  # one port per job, so two jobs sharing a node do not meet
            port = str(15000 + _int(env, "SLURM_JOB_ID") % 20000) if "SLURM_JOB_ID" in env else "29500"
    else:
        return None
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"{launcher}: rank {rank} of {size} processes is out of range")
    if size == 1:
        return None
    try:
        port_number = int(port)
    except ValueError:
        raise ValueError(f"MASTER_PORT={port!r} is not a port number") from None
    return Launch(rank, size, local, addr, port_number, launcher)


def timeout_seconds(env: Mapping[str, str]) -> float:
    """LSD_DIST_TIMEOUT (seconds) or :data:`DEFAULT_TIMEOUT`."""
    text = env.get("LSD_DIST_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"LSD_DIST_TIMEOUT={text!r} must be a positive number of seconds")
    return value


class World:
    """An initialised process group and the collectives of a distributed rollout."""

    def __init__(self, launch: Launch, device, timeout: float):
        import datetime

        import torch
        import torch.distributed as dist

        self.rank, self.size, self.launch, self.device, self.timeout = launch.rank, launch.size, launch, device, timeout
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        try:
            # torchrun's agent already serves the rendezvous store at MASTER_ADDR:MASTER_PORT; env:// joins it
            where = "env://" if launch.launcher == "torchrun" else f"tcp://{_url_host(launch.addr)}:{launch.port}"
            dist.init_process_group(backend, init_method=where, rank=launch.rank, world_size=launch.size,
                                    timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as exc:
            raise LsdError(f"rank {self.rank}: could not join the other {self.size - 1} ranks at "
                           f"{launch.addr}:{launch.port} within {timeout:g}s ({first_line(exc)})") from None
        self._wait = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=FIT_WAIT))
        # the summaries travel over NCCL only when every rank holds a GPU of its own (NCCL cannot share one)
        places = self._all_text(f"{socket.gethostname()}/{device}", "starting")
        own_gpu = device.type == "cuda" and len(set(places)) == self.size and all("/cuda" in p for p in places)
        self.data_device = device if own_gpu else torch.device("cpu")
        self.backend = "nccl" if own_gpu else "gloo"
        self.told = False  # whether the ranks already know of a failure (agree() shared it)
        self.broken = False  # whether a collective failed: a peer is gone

    # -- control messages (Gloo, on the CPU) -------------------------------------------------------

    def _collective(self, what: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except RuntimeError as exc:
            self.broken = True
            raise LsdError(f"rank {self.rank}: lost contact with the other ranks while {what} "
                           f"(a rank exited, or did not answer for {self.timeout:g}s): {first_line(exc)}") from None

    def _all_text(self, text: str, what: str, group=None) -> list[str]:
        import torch
        import torch.distributed as dist

        data = torch.tensor(list(text.encode()), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.size)]
        self._collective(what, lambda: dist.all_gather(sizes, torch.tensor([data.numel()]), group=group))
        width = max(int(s) for s in sizes)
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[: data.numel()] = data
        out = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.size)]
        self._collective(what, lambda: dist.all_gather(out, padded, group=group))
        return [bytes(o[: int(s)].tolist()).decode() for o, s in zip(out, sizes)]

    def agree(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on every rank, then compare notes: a rank whose ``fn`` raised re-raises its own
        error; the others stop with one line naming it."""
        try:
            out = fn()
        except Exception as exc:
            self.told = True
            self._all_text(f"error:{first_line(exc)}", what)
            raise
        failed = [(r, t) for r, t in enumerate(self._all_text("ok", what)) if t != "ok"]
        if failed:
            self.told = True
            rank, text = failed[0]
            raise LsdError(f"rank {rank} failed while {what}: {text[len('error:'):]}")
        return out

    def root_says(self, text: str | None, what: str, wait: bool = False) -> str:
        """Rank 0's ``text``, on every rank (``wait``: for as long as rank 0's fit takes)."""
        return self._all_text((text or "") if self.rank == 0 else "", what, self._wait if wait else None)[0]

    # -- the summaries ------------------------------------------------------------------------------

    def gather_rows(self, part, dim: int, counts: list[int]):
        """Concatenate every rank's ``part`` along ``dim`` (rank r holds ``counts[r]`` rows) on rank 0,
        in rank order; None elsewhere."""
        import torch
        import torch.distributed as dist

        width = max(counts)
        shape = list(part.shape)
        shape[dim] = width
        buf = torch.zeros(shape, dtype=part.dtype, device=self.data_device)
        buf.narrow(dim, 0, part.shape[dim]).copy_(part)
        out = [torch.empty_like(buf) for _ in range(self.size)] if self.rank == 0 else None
        self._collective("gathering the teacher summaries", lambda: dist.gather(buf, out, dst=0))
        if self.rank != 0:
            return None
        return torch.cat([o.narrow(dim, 0, c).cpu() for o, c in zip(out, counts)], dim)

    def close(self, failed: bool = False) -> None:
        """Leave the group. After a peer is gone, Gloo may abort the process while tearing its
        connections down (in destroy_process_group or at interpreter exit), which would replace the
        one-line error and exit 1 by SIGABRT: then the group is left as it is and the process ends
        with os._exit once Python's own exit handling (the error line, flushed streams) is done."""
        import atexit

        import torch.distributed as dist

        if self.broken:
            code = 1 if failed else 0
            atexit.register(_exit_now, code)
        elif dist.is_initialized():
            dist.destroy_process_group()


def _exit_now(code: int) -> None:
    """End the process without C++ teardown (see World.close)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def pick_device(name: str | None, launch: Launch):
    """``auto``: the GPU ``LOCAL_RANK`` modulo the GPUs present (ranks share GPUs when there are more
    ranks than GPUs), else the CPU; an explicit device is used as given."""
    import torch

    from lsdtool.generation import pick_device as plain

    if name in (None, "", "auto") and torch.cuda.is_available():
        return torch.device("cuda", launch.local_rank % torch.cuda.device_count())
    return plain(name)


def obtain(launch: Launch, model_name: str, overrides: dict, *, cache_dir=None, recipe_file=None, refit=False,
           device=None, offline=None, out=None) -> tuple[str, dict | None]:
    """``lsd distill`` as one rank of a launched job: (the path every rank prints, the fit report where
    this rank fitted, else None).

    Rank 0's cache lookup decides for all ranks; on a miss every rank loads the model and rolls out
    its block, rank 0 fits and writes the artifact (and ``out``), then sends its path to the others.
    """
    from lsdtool import cache, fileio, models
    from lsdtool.console import log
    from lsdtool.locations import cache_root

    world = World(launch, pick_device(device, launch), timeout_seconds(os.environ))
    failed = True
    try:
        def lookup():  # rank 0 writes: its cache must take the artifact, checked before any rollout
            fileio.check_dir(cache_root(cache_dir))
            return None if refit else cache.lookup(model_name, overrides, cache_dir=cache_dir, recipe_file=recipe_file,
                                                   offline=offline)

        hit = world.agree("looking up the cache", lambda: lookup() if world.rank == 0 else None)
        answer = world.root_says(str(hit) if hit else "", "looking up the cache")
        if answer:
            if world.rank == 0:
                log(f"cache hit: {answer}")
            failed = False
            return out or answer, None
        if world.rank == 0:
            log(f"{launch.launcher}: {world.size} ranks, summaries gathered over {world.backend}")
        model = world.agree("loading the model", lambda: models.load(model_name, device=world.device, offline=offline))
        path, fit = _fit(world, model, overrides, cache_dir, recipe_file, out)
        failed = False
        return out or path, fit
    finally:
        world.close(failed)


def _fit(world: World, model, overrides, cache_dir, recipe_file, out) -> tuple[str, dict | None]:
    """Every rank's share of a distillation once the model is loaded: (artifact path, rank 0's fit report)."""
    from lsdtool import cache, fileio
    from lsdtool.console import log

    if world.rank != 0:  # roll out this rank's block, then wait for rank 0's fit
        cache.load_or_distill(model, overrides, cache_dir=cache_dir, refit=True, device=world.device,
                              recipe_file=recipe_file, world=world)
        answer = world.root_says(None, "waiting for rank 0's fit", wait=True)
        if not answer.startswith("ok:"):
            raise LsdError(f"rank 0 failed to fit the sampler: {answer[len('error:'):]}")
        return answer[len("ok:"):], None
    try:
        sampler = cache.load_or_distill(model, overrides, cache_dir=cache_dir, refit=True, device=world.device,
                                        recipe_file=recipe_file, log=log, world=world)
        if out:
            fileio.copy(sampler.path, out)
    except Exception as exc:
        if not world.told:  # the others wait for the fit
            with contextlib.suppress(LsdError):
                world.root_says(f"error:{first_line(exc)}", "reporting the fit", wait=True)
        raise
    try:
        world.root_says(f"ok:{sampler.path}", "reporting the fit", wait=True)
    except LsdError as exc:  # a rank that left after its rollout does not undo a complete artifact
        log(str(exc))
    return str(sampler.path), sampler.fit
