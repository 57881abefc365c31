"""Countdown error of Euler vs LSD / LSD+ variants at several NFE, over evaluation seeds held out
from the distillation seed. Prints one JSON object per row (stdout) and a summary table (stderr).

    python benchmarks/countdown_table.py --nfe 4 8 16 --n 1024 --seeds 1000 1001
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from lsdtool import distillation, recipes
from lsdtool.metrics import countdown_errors
from lsdtool.models import load
from lsdtool.samplers import Sampler, sample


def variants():
    for plus in (False, True):
        for mode in ("score", "temperature"):
            yield f"{'lsd+' if plus else 'lsd'}:teacher-path:{mode}", dict(plus=plus, mode=mode, objective="teacher-path")
            yield f"{'lsd+' if plus else 'lsd'}:paper:{mode}", dict(plus=plus, mode=mode, objective="paper", relax=True)
            yield f"{'lsd+' if plus else 'lsd'}:paper-norelax:{mode}", dict(plus=plus, mode=mode, objective="paper", relax=False)
            yield f"{'lsd+' if plus else 'lsd'}:paper-uniformfill:{mode}", dict(plus=plus, mode=mode, objective="paper", fill="uniform")


def evaluate(model, sampler, n, seeds, batch=512):
    errs = []
    for seed in seeds:
        x = torch.cat([sample(model, sampler, torch.arange(b, min(n, b + batch)), seed) for b in range(0, n, batch)])
        errs.append(countdown_errors(x))
    return {k: statistics.mean(e[k] for e in errs) for k in errs[0]} | {"error_per_seed": [e["error"] for e in errs]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nfe", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001])
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--paper-iters", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load("countdown")
    # One teacher rollout (the shipped recipe's teacher) serves every variant: it does not depend
    # on M, the mode or the objective, and its candidate grid contains every uniform student grid.
    base = recipes.effective("countdown", overrides=dict(steps=max(args.nfe)))
    t0 = time.time()
    rollout = distillation.TeacherRollout(model, base, torch.device("cpu"), collect_mass=True)
    print(f"protocol: countdown, n={args.n}, eval seeds={args.seeds}, distill seed=0, teacher {base['teacher_steps']} steps x "
          f"{base['samples']} samples (rollout {time.time() - t0:.1f}s, shared), cpu threads={torch.get_num_threads()}", file=sys.stderr)
    for nfe in args.nfe:
        res = evaluate(model, Sampler.plain(nfe), args.n, args.seeds)
        print(json.dumps({"sampler": "euler", "nfe": nfe, **res}), flush=True)
        for name, over in variants():
            if args.only and name not in args.only:
                continue
            extra = {"iters": args.paper_iters} if over["objective"] == "paper" else {}
            r = recipes.effective("countdown", overrides=dict(over, steps=nfe, **extra))
            t0 = time.time()
            fit = distillation.fit_teacher_path(rollout, r) if r["objective"] == "teacher-path" else distillation.fit_paper(rollout, r)
            wall = time.time() - t0
            rollout._scores.clear()
            rollout._score_bytes = 0
            res = evaluate(model, fit.sampler, args.n, args.seeds)
            row = {"sampler": name, "nfe": nfe, **res, "fit_seconds": round(wall, 1),
                   "loss_before": sum(fit.fit.get("loss_before") or [0]), "loss_after": sum(fit.fit.get("loss_after") or [0]),
                   "timesteps": [round(t, 5) for t in fit.sampler.timesteps.tolist()],
                   "coeffs": [round(c, 4) for c in fit.sampler.coeffs.tolist()]}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
