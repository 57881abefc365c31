"""Teacher-rollout wall time of `lsd distill` with 1 and 2 ranks for the SEDD-small architecture
(random weights, same FLOPs: 12 blocks, width 768, L = 1024, V = 50258), through the same code as
`torchrun -m lsdtool distill` (lsdtool.distributed.World + distillation.TeacherRollout), ranks started
with torch.multiprocessing. Also times rank 0's fit, and checks that both runs give the same
sampler bit for bit.

    python benchmarks/distill_ranks.py            # on a CUDA machine (ranks share the GPUs when there are fewer)
    python benchmarks/distill_ranks.py --quick    # a seconds-long CPU smoke run of the same code

Protocol: every rank builds the model from torch.manual_seed(0), runs one warm-up forward, and the
ranks start the rollout together; the rollout time is rank 0's wall time from the start to the
moment every rank's summaries are gathered on it. Ranks on one GPU gather over Gloo (NCCL cannot
share a GPU between ranks); with a GPU per rank, over NCCL.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

from lsdtool import distillation, distributed, recipes
from lsdtool.models.ddit import freeze
from lsdtool.models.sedd import SEDD


def build(quick: bool, dev):
    width, blocks, heads, length, tokens = (64, 2, 4, 64, 500) if quick else (768, 12, 12, 1024, 50257)
    config = {"tokens": tokens, "graph": {"type": "absorb"}, "noise": {"type": "loglinear"},
              "model": {"hidden_size": width, "n_heads": heads, "n_blocks": blocks, "cond_dim": 128,
                        "scale_by_sigma": True, "length": length}}
    torch.manual_seed(0)
    model = SEDD(config, name="sedd-small", fingerprint="random:sedd-small-architecture")
    torch.nn.init.normal_(model.net.vocab_embed.embedding, std=0.02)  # torch.empty until a checkpoint fills it
    freeze(model.net)
    return model.to(dev)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def rank_main(rank: int, size: int, cfg: dict, results):
    torch.set_num_threads(cfg["threads"])
    launch = distributed.Launch(rank, size, rank, "127.0.0.1", cfg["port"], "spawn")
    dev = distributed.pick_device("cpu" if cfg["quick"] else "auto", launch)
    model = build(cfg["quick"], dev)
    recipe = cfg["recipe"]
    world = distributed.World(launch, dev, timeout=600) if size > 1 else None
    try:
        x = torch.full((recipe["batch"], model.seq_len), model.vocab_size - 1, device=dev)
        t = torch.full((recipe["batch"],), 0.5, device=dev)
        with torch.no_grad():
            model.log_score(x, t)  # warm-up
            sync(dev)
            f0 = time.perf_counter()
            model.log_score(x, t)
            sync(dev)
        if rank == 0:
            print(f"{size} rank(s): one forward of {recipe['batch']} x {model.seq_len} on {dev}: "
                  f"{1000 * (time.perf_counter() - f0):.1f} ms", file=sys.stderr, flush=True)
        if world is not None:
            world.agree("warming up", lambda: None)  # start together
        t0 = time.perf_counter()
        rollout = distillation.TeacherRollout(model, recipe, dev, world=world)
        sync(dev)
        rollout_s = time.perf_counter() - t0
        if rank == 0:
            t1 = time.perf_counter()
            fit = distillation.fit_teacher_path(rollout, recipe)
            sync(dev)
            results.put({"ranks": size, "rollout_seconds": round(rollout_s, 3), "fit_seconds": round(time.perf_counter() - t1, 3),
                         "backend": world.backend if world else None, "device": str(dev),
                         "timesteps": fit.sampler.timesteps.tolist(), "coeffs": fit.sampler.coeffs.tolist()})
    finally:
        if world is not None:
            world.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny dimensions on the CPU (a smoke run)")
    ap.add_argument("--teacher-steps", type=int, default=256)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts to time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args()
    overrides = dict(steps=8, plus=True, teacher_steps=args.teacher_steps, samples=args.samples, batch=args.batch)
    if args.quick:
        overrides.update(teacher_steps=32, samples=8, batch=2, candidates=16, iters=3)
    recipe = recipes.effective("sedd-small", overrides=overrides)
    ctx = mp.get_context("spawn")
    rows = []
    for size in [int(v) for v in args.ranks.split(",")]:
        cfg = {"quick": args.quick, "threads": args.threads, "port": free_port(), "recipe": recipe}
        results = ctx.SimpleQueue()
        mp.spawn(rank_main, args=(size, cfg, results), nprocs=size, join=True)  # a fresh process: GPU memory freed
        rows.append(results.get())
        print(f"{size} rank(s): rollout {rows[-1]['rollout_seconds']:.2f} s, fit {rows[-1]['fit_seconds']:.2f} s", file=sys.stderr)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.quick else "cpu"
    report = {
        "protocol": {"model": "SEDD-small architecture, random weights" + (" (quick: tiny dims)" if args.quick else ""),
                     "device": gpu, "gpus": torch.cuda.device_count() if not args.quick else 0, "torch": torch.__version__,
                     "threads_per_rank": args.threads,
                     "recipe": {k: recipe[k] for k in ("steps", "plus", "teacher_steps", "samples", "batch", "candidates", "iters")},
                     "rollout_seconds": "rank 0 wall time, start to all summaries gathered on rank 0"},
        "runs": [{k: v for k, v in r.items() if k not in ("timesteps", "coeffs")} for r in rows],
        "same_sampler_bit_for_bit": all(r["timesteps"] == rows[0]["timesteps"] and r["coeffs"] == rows[0]["coeffs"] for r in rows),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
