"""GPU benchmark: distil an LSD+ NFE-8 sampler for the SEDD-small architecture (random weights,
same FLOPs: 12 blocks, width 768, L = 1024, V = 50258) with a 1024-step teacher, then sample
64 x 1024 tokens. Reports wall times, peak memory and sampling time / (NFE x one bare forward).

    python benchmarks/gpu_sedd.py                 # on a CUDA machine
    python benchmarks/gpu_sedd.py --tiny          # a seconds-long smoke run of the same code on CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from distill_ranks import build, sync  # the same random SEDD-small (embedding initialised) as the rank benchmark
from lsdtool import distillation, recipes
from lsdtool.samplers import sample


def timed(fn, dev, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="small dimensions, for a CPU smoke run")
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args.tiny, dev)
    length = model.seq_len
    overrides = dict(steps=8, plus=True)
    if args.tiny:
        overrides.update(teacher_steps=64, samples=4, batch=4, candidates=32, iters=3)
    recipe = recipes.effective("sedd-small", overrides=overrides)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    fit = distillation.distill(model, recipe, device=str(dev))
    sync(dev)
    distill_s = time.perf_counter() - t0
    distill_peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None

    n, batch = args.samples, args.samples
    x = torch.full((batch, length), model.vocab_size - 1, device=dev)
    t = torch.full((batch,), 0.5, device=dev)
    with torch.no_grad():
        forward_s = timed(lambda: model.log_score(x, t), dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    index = torch.arange(n, device=dev)
    sample_s = timed(lambda: sample(model, fit.sampler, index, seed=0), dev, repeats=3)
    sample_peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    report = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "recipe": {k: recipe[k] for k in ("steps", "plus", "teacher_steps", "samples", "batch", "candidates", "iters")},
        "distill_seconds": round(distill_s, 2), "distill_peak_gib": distill_peak,
        "forward_seconds_batch": round(forward_s, 4), "sample_seconds": round(sample_s, 4), "sample_peak_gib": sample_peak,
        "samples": n, "nfe": fit.sampler.nfe,
        "sampling_over_bare_forwards": round(sample_s / (fit.sampler.nfe * forward_s), 3),
        "timesteps": [round(v, 5) for v in fit.sampler.timesteps.tolist()],
    }
    print(json.dumps(report, indent=1))
    print(f"sampling costs {report['sampling_over_bare_forwards']:.3f} x NFE bare forwards", file=sys.stderr)


if __name__ == "__main__":
    main()
