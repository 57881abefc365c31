"""Time `lsd distill --model countdown --steps 8 --plus` (the shipped recipe) on this tree and, with
--against DIR, on another checkout of lsd, interleaved in one run; write the result as JSON.

Each run is a fresh process (``python -c``) with ``PYTHONPATH`` pointing at its tree and an empty
cache, so imports, the rollout and the fit are all counted; wall time and the process's CPU time
(user + system: the steadier figure when other work shares the cores) are recorded with the load
averages before and after. The artifact's grid is recorded too, so a faster fit that learnt
something else shows.

    python benchmarks/distill_time.py --against /tmp/old --repeats 3 --json benchmarks/results/distill-time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from render_results import emit

ROOT = Path(__file__).resolve().parent.parent
RUN = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(os.environ["THREADS"]))
import lsdtool, lsdtool.recipes as R
from lsdtool import models
if os.path.exists(os.path.join(lsdtool.__path__[0], "distillation.py")):
    from lsdtool.distillation import distill; kw = {}
else:  # checkouts before the module was renamed
    from lsdtool.distill import distill; kw = {"quiet": True}
model = models.load("countdown")
fit = distill(model, R.effective("countdown", None, {"steps": 8, "plus": True}), device="cpu", **kw)
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
                  "timesteps": [round(float(t), 4) for t in fit.sampler.timesteps]}))
"""


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def once(tree: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPATH": str(tree), "LSD_CACHE_DIR": cache, "THREADS": str(threads)}
        before = loadavg()
        r = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, cwd=cache)
        if r.returncode:
            raise SystemExit(f"{tree}: {r.stderr[-2000:]}")
        return {**json.loads(r.stdout.splitlines()[-1]), "load_before": before, "load_after": loadavg()}


def git_head(tree: Path) -> str:
    r = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, help="another checkout of lsd to time in the same run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the result here (the results-page schema)")
    args = ap.parse_args(argv)
    trees = [("this tree", ROOT)] + ([("against", args.against)] if args.against else [])
    runs = {name: [] for name, _ in trees}
    for _ in range(args.repeats):
        for name, tree in trees:
            runs[name].append(once(tree, args.threads))
            print(name, runs[name][-1], file=sys.stderr)
    rows = []
    for name, tree in trees:
        walls, cpus = [r["wall_s"] for r in runs[name]], [r["cpu_s"] for r in runs[name]]
        rows.append([f"{name} ({git_head(tree)})", " / ".join(f"{w:g}" for w in walls), " / ".join(f"{c:g}" for c in cpus),
                     " / ".join(f"{r['load_before'][0]:g}" for r in runs[name])])
    notes = []
    if args.against:
        a, b = runs["this tree"], runs["against"]
        notes.append(f"ratio this / against: wall min {min(r['wall_s'] for r in a) / min(r['wall_s'] for r in b):.2f}, "
                     f"CPU time min {min(r['cpu_s'] for r in a) / min(r['cpu_s'] for r in b):.2f}")
    result = {"id": "distill-time", "title": "Distillation time of countdown LSD+ NFE 8 (shipped recipe)",
              "command": "python benchmarks/distill_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} torch threads, shared",
              "date": date.today().isoformat(), "source": "measured: written by benchmarks/distill_time.py",
              "summary": "Fresh process and empty cache per run, runs interleaved; wall and CPU (user + system) seconds per "
                         "repeat, and the 1-minute load average before each.",
              "tables": [{"columns": ["tree", "wall s", "CPU s", "load before"], "rows": rows}],
              "notes": notes, "runs": runs}
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
