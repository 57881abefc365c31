"""What the sampler engine adds to the network: lsd sampling wall time / (NFE x one bare forward).

Builds a random-weight checkpoint of the SEDD-small architecture (V = 50258, hidden 768, 12 blocks,
12 heads, cond 128, loglinear; absorb with scale_by_sigma, and a uniform-graph variant), loads it
through ``lsdtool.models.load`` and times, interleaved and repeated, one bare forward
(``model.log_score`` at the batch size) and a full ``samplers.sample`` run for each rule: plain
euler, plain tweedie and an LSD+-style sampler (non-uniform grid, Phi != 1). Reports min and
median; ratio = min lsd wall / (NFE x min bare forward).

    python benchmarks/engine_overhead.py                        # CPU, 2 threads, the full table
    python benchmarks/engine_overhead.py --device cuda --json   # on a GPU
    python benchmarks/engine_overhead.py --quick                # seconds-long smoke run (tiny network)
    python benchmarks/engine_overhead.py --distill              # LSD+ teacher rollout / fit split (L = 256)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RULES = ("euler", "tweedie", "lsd+")


def build_checkpoint(directory: Path, graph: str, dims: dict, seed: int = 0) -> Path:
    """A random-weight SEDD checkpoint (config.json + model.safetensors) of the given dimensions."""
    from safetensors.torch import save

    from lsdtool import fileio
    from lsdtool.models.sedd import SEDD

    config = {"tokens": dims["tokens"], "graph": {"type": graph},
              "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
              "model": {"name": "small", "type": "ddit", "hidden_size": dims["hidden"], "cond_dim": dims["cond"],
                        "length": dims["length"], "n_blocks": dims["blocks"], "n_heads": dims["heads"],
                        "scale_by_sigma": graph == "absorb", "dropout": 0.1}}
    torch.manual_seed(seed)
    net = SEDD(config, name="bench", fingerprint="random").net
    with torch.no_grad():
        for name, p in net.named_parameters():  # no zero-initialised layers: scores vary over the vocabulary
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    out = directory / f"sedd-small-{graph}"
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_text(out / "config.json", json.dumps(config, indent=1))
    state = {k: v.contiguous() for k, v in net.state_dict().items() if "inv_freq" not in k}
    fileio.write_bytes(out / "model.safetensors", save(state))
    return out


def samplers(steps: int):
    """The rules timed: plain euler and tweedie, and an LSD+-like sampler (power grid, Phi varying)."""
    from lsdtool.samplers import Sampler, power_grid

    plus = Sampler(power_grid(steps, 1.6), torch.linspace(0.9, 1.15, steps, dtype=torch.float64), "euler", "score",
                   meta={"kind": "benchmark LSD+-shaped sampler"})
    return {"euler": Sampler.plain(steps, "euler"), "tweedie": Sampler.plain(steps, "tweedie"), "lsd+": plus}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def clock(fn, dev: torch.device) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def measure(model, dev, batch: int, rules: dict, repeats: int, seed: int = 0) -> list[dict]:
    """Interleaved: each repeat times one bare forward then one lsd run per rule."""
    from lsdtool.samplers import sample

    index = torch.arange(batch, device=dev)
    if model.graph == "absorb":
        x = torch.full((batch, model.seq_len), model.vocab_size - 1, device=dev)
    else:
        x = torch.randint(0, model.vocab_size, (batch, model.seq_len), generator=torch.Generator().manual_seed(seed)).to(dev)
    t = torch.full((batch,), 0.5, device=dev)

    def forward():
        with torch.no_grad():
            model.log_score(x, t)

    forward()  # warm-up (allocator, autocast caches, cuDNN/SDPA choice)
    sample(model, rules["euler"], index, seed)
    fwd = {name: [] for name in rules}
    lsd = {name: [] for name in rules}
    for r in range(repeats):
        for name, sampler in rules.items():
            fwd[name].append(clock(forward, dev))
            lsd[name].append(clock(lambda: sample(model, sampler, index, seed + r), dev))
            print(f"  {model.graph} B={batch} {name}: forward {fwd[name][-1]:.3f}s, lsd {lsd[name][-1]:.3f}s",
                  file=sys.stderr, flush=True)
    rows = []
    all_fwd = [v for times in fwd.values() for v in times]
    f_min, f_med = min(all_fwd), statistics.median(all_fwd)
    for name, sampler in rules.items():
        nfe = sampler.nfe
        rows.append({"graph": model.graph, "batch": batch, "rule": name, "nfe": nfe,
                     "forward_min_s": round(f_min, 4), "forward_median_s": round(f_med, 4),
                     "lsd_min_s": round(min(lsd[name]), 4), "lsd_median_s": round(statistics.median(lsd[name]), 4),
                     "ratio_min": round(min(lsd[name]) / (nfe * f_min), 3),
                     "ratio_median": round(statistics.median(lsd[name]) / (nfe * f_med), 3)})
    return rows


def measure_distill(model, dev, args) -> dict:
    """The teacher rollout and the fit of an LSD+ distillation, timed apart, and one bare forward at the
    rollout batch: rollout / (teacher NFE x bare forward) is what the engine adds to the teacher."""
    from lsdtool import distillation, recipes

    recipe = recipes.effective("sedd-small", overrides=dict(steps=args.steps, teacher_steps=args.teacher_steps,
                                                            samples=args.samples, batch=args.samples,
                                                            candidates=args.candidates, iters=args.iters))
    x = torch.full((args.samples, model.seq_len), model.vocab_size - 1, device=dev)
    t = torch.full((args.samples,), 0.5, device=dev)

    def forward():
        with torch.no_grad():
            model.log_score(x, t)

    forward()
    fwd = [clock(forward, dev) for _ in range(3)]
    t0 = time.perf_counter()
    rollout = distillation.TeacherRollout(model, recipe, dev)
    sync(dev)
    rollout_s = time.perf_counter() - t0
    fwd += [clock(forward, dev) for _ in range(3)]
    t0 = time.perf_counter()
    distillation.fit_teacher_path(rollout, recipe)
    sync(dev)
    fit_s = time.perf_counter() - t0
    nfe = rollout.teacher.nfe * -(-args.samples // recipe["batch"])
    return {"teacher_steps": args.teacher_steps, "samples": args.samples, "candidates": args.candidates,
            "iters": args.iters, "rollout_s": round(rollout_s, 3), "fit_s": round(fit_s, 3),
            "forward_min_s": round(min(fwd), 4), "forward_median_s": round(statistics.median(fwd), 4),
            "rollout_over_forwards": round(rollout_s / (nfe * min(fwd)), 3)}


def protocol(dev: torch.device, args) -> dict:
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
            "seq_len": args.length, "repeats": args.repeats, "quick": args.quick,
            "load_average_start": [round(v, 2) for v in os.getloadavg()]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--length", type=int, default=256, help="sequence length L (default 256)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    ap.add_argument("--graphs", default="absorb,uniform")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a tiny network (V = 1001, 2 blocks), for a smoke run")
    ap.add_argument("--json", action="store_true", help="print the rows and protocol as JSON")
    ap.add_argument("--distill", action="store_true",
                    help="instead: time an LSD+ teacher rollout and fit (absorb) against bare forwards")
    ap.add_argument("--teacher-steps", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8, help="distillation samples (one rollout batch)")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dims = dict(tokens=50257, hidden=768, blocks=12, heads=12, cond=128, length=args.length)
    if args.quick:
        dims.update(tokens=1000, hidden=64, blocks=2, heads=4, cond=32)
    from lsdtool.models import load

    proto = protocol(dev, args)
    rules = {k: v for k, v in samplers(args.steps).items() if k in args.rules.split(",")}
    rules.setdefault("euler", samplers(args.steps)["euler"])
    rows = []
    if args.distill:
        with tempfile.TemporaryDirectory(prefix="lsd-engine-overhead-") as tmp:
            result = measure_distill(load(str(build_checkpoint(Path(tmp), "absorb", dims)), device=dev), dev, args)
        proto["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        print(json.dumps({"protocol": proto, "distill": result}, indent=1 if args.json else None))
        return 0
    with tempfile.TemporaryDirectory(prefix="lsd-engine-overhead-") as tmp:
        for graph in args.graphs.split(","):
            path = build_checkpoint(Path(tmp), graph, dims)
            model = load(str(path), device=dev)
            for batch in (int(b) for b in args.batches.split(",")):
                rows += measure(model, dev, batch, rules, args.repeats)
            del model
    proto["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.json:
        print(json.dumps({"protocol": proto, "rows": rows}, indent=1))
        return 0
    print(f"# {proto['device']}, torch {proto['torch']}, {proto['threads']} threads, L = {args.length}, "
          f"{args.steps} steps, {args.repeats} interleaved repeats; load average "
          f"{proto['load_average_start']} -> {proto['load_average_end']}")
    print(f"{'graph':8} {'B':>3} {'rule':8} {'NFE':>3} {'forward min/med s':>18} {'lsd min/med s':>16} {'ratio min':>9} {'ratio med':>9}")
    for r in rows:
        print(f"{r['graph']:8} {r['batch']:>3} {r['rule']:8} {r['nfe']:>3} {r['forward_min_s']:>8.3f}/{r['forward_median_s']:<9.3f}"
              f" {r['lsd_min_s']:>7.3f}/{r['lsd_median_s']:<8.3f} {r['ratio_min']:>9.3f} {r['ratio_median']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
