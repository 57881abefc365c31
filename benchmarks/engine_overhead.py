"""What the sampler engine adds to the network: lsd sampling wall time / wall time of NFE bare forwards.

Builds a random-weight checkpoint of the SEDD-small architecture (V = 50258, hidden 768, 12 blocks,
12 heads, cond 128, loglinear; absorb with scale_by_sigma, and a uniform-graph variant), loads it
through ``lsdtool.models.load`` and times, interleaved and repeated, NFE back-to-back bare forwards
(``model.log_score`` at the batch size) and then a full ``samplers.sample`` run for each rule: plain
euler, plain tweedie, an LSD+-style sampler (non-uniform grid, Phi != 1) and, on absorb, the
confidence rule. Both sides of the ratio are sums of NFE forwards, so a machine whose speed wanders
does not favour either (the minimum of single forwards would be a luckier draw than the minimum of
NFE-forward runs). Reports min and median; ratio of minima = min lsd wall / min NFE-forward wall, per rule.

``--memory`` instead measures peak memory: of one bare forward, of sampling with each rule and of an
LSD+ distillation (teacher rollout and fit, ``--samples`` = B trajectories), each at batch B in a fresh
process that loads the model, releases what loading left behind, resets the peak and runs the one
thing. CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU: the kernel's peak
resident set (VmHWM, reset through /proc/self/clear_refs after loading and malloc_trim; where that
reset is refused, ru_maxrss of the fresh process, which then includes the load). Both the peak and the
growth above the loaded model are reported, as ratios to the bare forward's. On a CPU every process, the
bare forward's included, runs under the malloc thresholds lsd sets for its runs (lsdtool.allocator).

``--json [FILE]`` prints the result in the results-page schema (benchmarks/render_results.py) and
writes it to FILE (benchmarks/results/ID.json renders into docs/results.md and docs/performance.md).

    python benchmarks/engine_overhead.py                        # CPU, 2 threads, the full table
    python benchmarks/engine_overhead.py --device cuda --json   # on a GPU
    python benchmarks/engine_overhead.py --quick                # seconds-long smoke run (tiny network)
    python benchmarks/engine_overhead.py --memory --quick       # peak memory, B = 1, 16, 64, L = 1024
    python benchmarks/engine_overhead.py --distill              # LSD+ teacher rollout / fit split (L = 256)
    python benchmarks/engine_overhead.py --model countdown-net  # a registered model instead (its own graph and L)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from render_results import emit

RULES = ("euler", "tweedie", "lsd+", "confidence")
LABELS = {"lsd+": "LSD+-shaped"}


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


def samplers(steps: int, graph: str, names=RULES):
    """The rules timed: plain euler and tweedie, an LSD+-like sampler (power grid, Phi varying) and, on an
    absorbing graph, the confidence rule; on an ordinal (gaussian) graph, tau-leaping and an LSD+-like
    tau-leaping sampler (its grid, Phi varying). Those of ``names``, and the first always (its run is the warm-up)."""
    from lsdtool.samplers import Sampler, power_grid

    phi = torch.linspace(0.9, 1.15, steps, dtype=torch.float64)
    if graph == "gaussian":
        plain = Sampler.plain(steps, "tau-leaping")
        every = {"tau-leaping": plain, "lsd+": Sampler(plain.timesteps, phi, "tau-leaping", "score",
                                                       meta={"kind": "benchmark LSD+-shaped sampler"})}
    else:
        plus = Sampler(power_grid(steps, 1.6), phi, "euler", "score", meta={"kind": "benchmark LSD+-shaped sampler"})
        every = {"euler": Sampler.plain(steps, "euler"), "tweedie": Sampler.plain(steps, "tweedie"), "lsd+": plus}
        if graph == "absorb":
            every["confidence"] = Sampler.plain(steps, "confidence")
    first = next(iter(every))
    return {k: v for k, v in every.items() if k in names or k == first}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def clock(fn, dev: torch.device) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def clock_in_run(fn, model, dev: torch.device) -> tuple[float, float | None]:
    """Wall time of fn() and, on a CPU, the part of it spent inside ``model.log_score`` (None on a GPU, where
    timing each call would add a synchronisation per step to what is measured)."""
    if dev.type != "cpu":
        return clock(fn, dev), None
    spent, call = [0.0], model.log_score

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    model.log_score = timed
    try:
        return clock(fn, dev), spent[0]
    finally:
        del model.log_score


def measure(model, dev, batch: int, rules: dict, repeats: int, seed: int = 0) -> list[dict]:
    """Interleaved: each repeat times, per rule, NFE back-to-back bare forwards and then one lsd run."""
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
    sample(model, next(iter(rules.values())), index, seed)
    fwd = {name: [] for name in rules}
    lsd = {name: [] for name in rules}
    in_run = {name: [] for name in rules}  # lsd wall / its own model calls' wall (CPU)
    for r in range(repeats):
        for name, sampler in rules.items():
            fwd[name].append(clock(lambda: [forward() for _ in range(sampler.nfe)], dev))
            wall, calls = clock_in_run(lambda: sample(model, sampler, index, seed + r), model, dev)
            lsd[name].append(wall)
            if calls:
                in_run[name].append(wall / calls)
            print(f"  {model.graph} B={batch} {name}: {sampler.nfe} forwards {fwd[name][-1]:.3f}s, lsd {wall:.3f}s"
                  + (f" ({wall / calls:.3f}x its model calls)" if calls else ""), file=sys.stderr, flush=True)
    rows = []
    per_call = [v / sampler.nfe for name, sampler in rules.items() for v in fwd[name]]
    for name, sampler in rules.items():
        rows.append({"graph": str(model.graph), "batch": batch, "rule": name, "nfe": sampler.nfe,
                     "forward_min_s": round(min(per_call), 4), "forward_median_s": round(statistics.median(per_call), 4),
                     "forwards_min_s": round(min(fwd[name]), 4), "forwards_median_s": round(statistics.median(fwd[name]), 4),
                     "lsd_min_s": round(min(lsd[name]), 4), "lsd_median_s": round(statistics.median(lsd[name]), 4),
                     "ratio_min": round(min(lsd[name]) / min(fwd[name]), 3),
                     "ratio_median": round(statistics.median(lsd[name]) / statistics.median(fwd[name]), 3),
                     "in_run_median": round(statistics.median(in_run[name]), 3) if in_run[name] else None})
    return rows


def measure_batches(model, dev, args) -> list[dict]:
    """:func:`measure` at every batch size of ``--batches`` for the rules of ``--rules`` on the model's graph."""
    rules = samplers(args.steps, str(model.graph), args.rules.split(","))
    return [row for batch in (int(b) for b in args.batches.split(",")) for row in measure(model, dev, batch, rules, args.repeats)]


def distill_recipe(model, args, samples: int) -> dict:
    """The LSD+ recipe the distillation measurements run: ``samples`` trajectories in one batch."""
    from lsdtool import recipes

    return recipes.effective("sedd-small", graph=model.graph,
                             overrides=dict(steps=args.steps, teacher_steps=args.teacher_steps, samples=samples,
                                            batch=samples, candidates=args.candidates, iters=args.iters))


def measure_distill(model, dev, args) -> dict:
    """The teacher rollout and the fit of an LSD+ distillation, timed apart, and one bare forward at the
    rollout batch: rollout / (teacher NFE x bare forward) is what the engine adds to the teacher."""
    from lsdtool import distillation

    recipe = distill_recipe(model, args, args.samples)
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


def _release_and_reset_peak() -> str:
    """Return what loading freed to the OS and reset the peak resident set; the method the peak is read by."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def _rss_mib(field: str) -> float:
    if field == "ru_maxrss":  # KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def memory_child(spec: dict) -> dict:
    """One memory configuration in this (fresh) process: load, reset the peak, run ``spec['what']`` once."""
    from lsdtool.models import load
    from lsdtool.samplers import sample

    torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    if dev.type == "cpu":  # the allocator a CPU run of lsd works under, for the bare forward too
        from lsdtool import allocator

        allocator.keep_temporaries()
    model = load(spec["checkpoint"], device=dev)
    batch, args = spec["batch"], argparse.Namespace(**spec["args"])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        method, base = "max_memory_allocated", torch.cuda.memory_allocated(dev) / 2**20
    else:
        method = _release_and_reset_peak()
        base = _rss_mib("VmRSS" if method == "VmHWM" else "ru_maxrss")
    what = spec["what"]
    if what == "forward":
        x = torch.full((batch, model.seq_len), model.vocab_size - 1, device=dev)
        if model.graph != "absorb":
            x = torch.randint(0, model.vocab_size, (batch, model.seq_len), generator=torch.Generator().manual_seed(0)).to(dev)
        with torch.no_grad():
            model.log_score(x, torch.full((batch,), 0.5, device=dev))
    elif what == "distill":  # an LSD+ teacher rollout of B trajectories and the fit on them
        from lsdtool import distillation

        recipe = distill_recipe(model, args, batch)
        distillation.fit_teacher_path(distillation.TeacherRollout(model, recipe, dev), recipe)
    else:
        sample(model, samplers(args.steps, model.graph, (what,))[what], torch.arange(batch, device=dev), 0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = _rss_mib(method)
    return {"method": method, "loaded_mib": round(base, 1), "peak_mib": round(peak, 1)}


def measure_memory(checkpoint: Path, graph: str, dims: dict, dev, args) -> list[dict]:
    """Peak memory of a bare forward, of each rule's sampling and of a distillation at each batch size,
    each in a fresh process; growth = peak - the loaded model, factor = growth / (B L V 4 bytes)."""
    rows = []
    names = ["forward", *samplers(args.steps, graph, args.rules.split(",")), *(["distill"] if args.distill_memory else [])]
    for batch in (int(b) for b in args.batches.split(",")):
        spec = {"checkpoint": str(checkpoint), "device": str(dev), "threads": args.threads, "batch": batch,
                "args": {k: getattr(args, k) for k in ("steps", "teacher_steps", "candidates", "iters")}}
        got = {}
        for what in names:
            r = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps({**spec, "what": what})],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{graph} B={batch} {what} failed:\n{r.stderr[-3000:]}")
            got[what] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"  {graph} B={batch} {what}: {got[what]}", file=sys.stderr, flush=True)
        fwd = got["forward"]
        scores = batch * dims["length"] * (dims["tokens"] + 1) * 4 / 2**20  # the (B, L, V) float32 scores
        for what, m in got.items():
            growth = m["peak_mib"] - m["loaded_mib"]
            rows.append({"graph": graph, "batch": batch, "what": what, "method": m["method"],
                         "loaded_mib": m["loaded_mib"], "peak_mib": m["peak_mib"], "growth_mib": round(growth, 1),
                         "peak_over_forward": round(m["peak_mib"] / fwd["peak_mib"], 3),
                         "growth_over_forward": round(growth / max(fwd["peak_mib"] - fwd["loaded_mib"], 1e-9), 3),
                         "growth_over_scores": round(growth / scores, 2)})
    return rows


def protocol(dev: torch.device, args) -> dict:
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
            "seq_len": args.length, "repeats": args.repeats, "quick": args.quick,
            "load_average_start": [round(v, 2) for v in os.getloadavg()]}


def _label(rule: str) -> str:
    return LABELS.get(rule, rule)


def network(args, model=None) -> str:
    """What the rows were measured on, in words."""
    if model is not None:
        params = sum(p.numel() for p in model.net.parameters()) if getattr(model, "net", None) is not None else 0
        return f"{args.model} ({model.graph}, V = {model.vocab_size}" + (f", {params / 1e6:.2f}M parameters)" if params else ")")
    return "tiny network (V = 1001, 2 blocks, width 64)" if args.quick else "SEDD-small architecture (V = 50258, 12 blocks, width 768)"


def result(args, argv, proto: dict, rows: list[dict], net: str) -> dict:
    """The run in the results-page schema (benchmarks/render_results.py), raw rows and protocol kept."""
    load = f"load average {proto['load_average_start'][0]} -> {proto['load_average_end'][0]}"
    machine = f"{proto['device']}, torch {proto['torch']}, {proto['threads']} threads, {load}"
    kind = "memory" if args.memory else "overhead"
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    if args.memory:
        method = rows[0]["method"] if rows else "?"
        table = {"columns": ["graph", "B", "run", "peak MiB", "growth MiB", "peak / forward's", "growth / forward's",
                             "growth / scores"],
                 "rows": [[r["graph"], str(r["batch"]), "bare forward" if r["what"] == "forward" else
                           "distillation" if r["what"] == "distill" else "sampling, " + _label(r["what"]),
                           f"{r['peak_mib']:.0f}", f"{r['growth_mib']:.0f}", f"{r['peak_over_forward']:.2f}",
                           f"{r['growth_over_forward']:.2f}", f"{r['growth_over_scores']:.2f}"] for r in rows]}
        title = f"Peak memory of sampling against bare forwards ({device.upper() if device == 'cuda' else 'CPU'}, {net.split(' (')[0]})"
        summary = (f"{net}, L = {args.length}, {args.steps} steps; each run in a fresh process. Peak read by {method}; "
                   "growth = peak - memory after loading the model; scores = the (B, L, V) float32 log scores of one forward.")
        notes = ["peak / forward's: the run's peak over the bare forward's at the same B (the model's weights included)",
                 "growth / scores: the step factor of lsdtool.memory (what --batch-size auto plans with)"]
    else:
        in_run = any(r.get("in_run_median") for r in rows)
        table = {"columns": ["graph", "B", "rule", "NFE", "NFE forwards min / median (s)", "lsd min / median (s)",
                             "ratio of minima", "ratio of medians"] + (["lsd / its model calls"] if in_run else []),
                 "rows": [[r["graph"], str(r["batch"]), _label(r["rule"]), str(r["nfe"]),
                           f"{r['forwards_min_s']:.4g} / {r['forwards_median_s']:.4g}", f"{r['lsd_min_s']:.4g} / {r['lsd_median_s']:.4g}",
                           f"{r['ratio_min']:.2f}", f"{r['ratio_median']:.2f}"]
                          + ([f"{r['in_run_median']:.2f}" if r.get("in_run_median") else "-"] if in_run else []) for r in rows]}
        title = f"Engine overhead ({device.upper() if device == 'cuda' else 'CPU'}, {net.split(' (')[0]})"
        summary = (f"{net}, L = {args.length}, {args.steps} steps, {args.repeats} interleaved repeats; "
                   "ratio = lsd wall / wall of NFE back-to-back bare forwards at the same B, timed just before it.")
        notes = ["lsd / its model calls (CPU): the median over repeats of each run's wall over the time spent inside "
                 "its own model calls; it needs no second measurement, so a machine whose speed wanders between "
                 "runs moves it least"] if in_run else []
    name = Path(args.json).stem if args.json else f"engine-{kind}-{device}" + ("-quick" if args.quick else "") \
        + (f"-{args.model}" if args.model else "")
    return {"id": name, "title": title, "command": "python benchmarks/engine_overhead.py " + " ".join(argv),
            "machine": machine, "date": date.today().isoformat(), "source": "measured: written by benchmarks/engine_overhead.py",
            "summary": summary, "tables": [table], "notes": notes, "protocol": proto, "rows": rows}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--length", type=int, help="sequence length L (default 256; --memory: 1024)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,16; --memory: 1,16,64)")
    ap.add_argument("--graphs", default="absorb,uniform")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a tiny network (V = 1001, 2 blocks), for a smoke run")
    ap.add_argument("--model", help="time a registered model (lsd models) instead, at its own graph and length")
    ap.add_argument("--json", nargs="?", const="", metavar="FILE",
                    help="print the result as JSON (the results-page schema) and write it to FILE when given")
    ap.add_argument("--memory", action="store_true", help="instead: peak memory of forwards, sampling and distillation")
    ap.add_argument("--no-distill-memory", dest="distill_memory", action="store_false",
                    help="--memory without the distillation runs")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--distill", action="store_true",
                    help="instead: time an LSD+ teacher rollout and fit (absorb) against bare forwards")
    ap.add_argument("--teacher-steps", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8, help="distillation samples (one rollout batch)")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    args.length = args.length or (1024 if args.memory else 256)
    args.batches = args.batches or ("1,16,64" if args.memory else "1,16")
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dims = dict(tokens=50257, hidden=768, blocks=12, heads=12, cond=128, length=args.length)
    if args.quick:
        dims.update(tokens=1000, hidden=64, blocks=2, heads=4, cond=32)
    from lsdtool.models import load

    proto = protocol(dev, args)
    rows = []
    net = network(args)
    if args.model:
        if args.memory or args.distill:
            raise SystemExit("--model times sampling only (not --memory or --distill)")
        model = load(args.model, device=dev)
        args.length = int(model.seq_len)
        proto["seq_len"], net = args.length, network(args, model)
        rows += measure_batches(model, dev, args)
    elif args.distill:
        with tempfile.TemporaryDirectory(prefix="lsd-engine-overhead-") as tmp:
            result_ = measure_distill(load(str(build_checkpoint(Path(tmp), "absorb", dims)), device=dev), dev, args)
        proto["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        print(json.dumps({"protocol": proto, "distill": result_}, indent=1 if args.json is not None else None))
        return 0
    else:
        with tempfile.TemporaryDirectory(prefix="lsd-engine-overhead-") as tmp:
            for graph in args.graphs.split(","):
                path = build_checkpoint(Path(tmp), graph, dims)
                if args.memory:
                    rows += measure_memory(path, graph, dims, dev, args)
                    continue
                rows += measure_batches(load(str(path), device=dev), dev, args)
    proto["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out = result(args, argv, proto, rows, net)
    if args.json is not None:
        return emit(out, Path(args.json) if args.json else None)
    print(f"# {out['title']}; {out['machine']}\n# {out['summary']}")
    table = out["tables"][0]
    print(" | ".join(table["columns"]))
    for row in table["rows"]:
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
