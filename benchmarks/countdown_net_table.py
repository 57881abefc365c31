"""The countdown-net table: Euler, the teacher, LSD and LSD+ (the shipped recipe's teacher-path
objective and the paper objective) on the trained network, beside the exact countdown chain.

Every sampler is distilled with the model's shipped recipe (distillation seed = the recipe's seed)
and evaluated on held-out seeds: samples 0..n-1 of each evaluation seed, the JYS countdown error
(mean ± standard error over all n x seeds samples, and per seed).

    python benchmarks/countdown_net_table.py --device cuda --n 1024 --seeds 1000 1001 --json out.json
    python benchmarks/countdown_net_table.py --quick            # CPU smoke: n = 64, one seed, NFE 8, LSD+ vs Euler

Progress on stderr; the table (markdown) on stdout; ``--json FILE`` also writes every row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

LSD_ROWS = [("lsd", False, "teacher-path"), ("lsd+", True, "teacher-path"),
            ("lsd:paper", False, "paper"), ("lsd+:paper", True, "paper")]


def evaluate(model, sampler, n: int, seeds: list[int], device, batch: int) -> dict:
    """Countdown figures of samples 0..n-1 for each seed; mean ± s.e. over all samples, and per seed."""
    from lsdtool.generation import batches
    from lsdtool.metrics import countdown_error_rows, mean_se

    rows, per_seed = [], []
    start = time.perf_counter()
    for seed in seeds:
        x = torch.cat([x for _, x in batches(model, sampler, list(range(n)), seed, batch, device)])
        r = countdown_error_rows(x)
        rows.append(r)
        per_seed.append(r["error"].mean().item())
    seconds = time.perf_counter() - start
    out = {}
    for key in rows[0]:
        out[key], out[f"{key}_se"] = mean_se(torch.cat([r[key] for r in rows]))
    return out | {"error_per_seed": per_seed, "sample_seconds": round(seconds, 2)}


def run_model(name: str, args, device, log, on_row=lambda rows: None) -> list[dict]:
    from lsdtool import distillation, recipes
    from lsdtool.models import load
    from lsdtool.samplers import Sampler

    model = load(name, device=device, offline=True)
    base = recipes.effective(name)
    log(f"{name}: fingerprint {model.fingerprint}, recipe teacher_steps {base['teacher_steps']}, "
        f"samples {base['samples']}, candidates {base['candidates']}, iters {base['iters']}")
    out = []

    def add(row, sampler):
        res = evaluate(model, sampler, args.n, args.seeds, device, args.batch)
        out.append({"model": name, **row, **res})
        on_row(out)
        log(f"{name} {row['sampler']} NFE {row['nfe']}: error {res['error']:.4f} ± {res['error_se']:.4f} "
            f"(per seed {', '.join(f'{e:.4f}' for e in res['error_per_seed'])})")

    for nfe in args.euler_nfe:
        add({"sampler": "euler", "nfe": nfe}, Sampler.plain(nfe))
    if not args.no_teacher:
        add({"sampler": "teacher", "nfe": base["teacher_steps"]}, Sampler.plain(base["teacher_steps"]))
    for label, plus, objective in LSD_ROWS:
        if args.samplers and label not in args.samplers:
            continue
        for nfe in args.lsd_nfe:
            recipe = recipes.effective(name, overrides={"steps": nfe, "plus": plus, "objective": objective})
            start = time.perf_counter()
            fit = distillation.distill(model, recipe, device=device)
            seconds = time.perf_counter() - start
            add({"sampler": label, "nfe": nfe, "fit_seconds": round(seconds, 2),
                 "timesteps": [round(t, 5) for t in fit.sampler.timesteps.tolist()],
                 "coeffs": [round(c, 4) for c in fit.sampler.coeffs.tolist()]}, fit.sampler)
    return out


def table(rows: list[dict], models: list[str]) -> str:
    """Markdown: one row per sampler, one column per (model, NFE); the teacher sits in its model's first column."""
    cols = sorted({(r["model"], r["nfe"]) for r in rows if r["sampler"] != "teacher"}, key=lambda c: (models.index(c[0]), c[1]))
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    lines = ["| sampler | " + " | ".join(f"{m} NFE {k}" for m, k in cols) + " |", "|" + "---|" * (len(cols) + 1)]

    def cell(r):
        return f"{r['error']:.4f} ± {r['error_se']:.4f}" + (f" ({r['nfe']} steps)" if r["sampler"] == "teacher" else "")

    for name in names:
        cells = []
        for i, (m, k) in enumerate(cols):
            first = i == 0 or cols[i - 1][0] != m
            hit = [r for r in rows if r["model"] == m and r["sampler"] == name
                   and (r["nfe"] == k if name != "teacher" else first)]
            cells.append(cell(hit[0]) if hit else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, help="samples per evaluation seed  [default: 1024; 64 with --quick]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001], help="evaluation seeds (held out from distillation)")
    ap.add_argument("--models", nargs="+", default=["countdown-net", "countdown"])
    ap.add_argument("--euler-nfe", type=int, nargs="+", default=[4, 8, 16, 64])
    ap.add_argument("--lsd-nfe", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--samplers", nargs="*", help=f"LSD rows to run (default all: {', '.join(r[0] for r in LSD_ROWS)})")
    ap.add_argument("--no-teacher", action="store_true")
    ap.add_argument("--batch", type=int, default=1024, help="samples per sampling batch")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--json", help="also write every row (and the protocol) to this file")
    ap.add_argument("--quick", action="store_true", help="smoke run: one seed, NFE 8, lsd+ vs euler, no teacher, first model only")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.seeds, args.euler_nfe, args.lsd_nfe = args.n or 64, args.seeds[:1], [8], [8]
        args.samplers, args.no_teacher, args.models = args.samplers or ["lsd+"], True, args.models[:1]
    args.n = args.n or 1024
    torch.set_num_threads(args.threads)
    from lsdtool.generation import pick_device

    device = pick_device(args.device)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    rows = []

    def protocol_now():
        return {"n": args.n, "seeds": args.seeds, "device": str(device), "threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "wall_seconds": round(time.perf_counter() - start, 1), "load_average": os.getloadavg(), "torch": torch.__version__,
                "metric": "countdown error (JYS), mean ± s.e. over n x seeds samples",
                "recipes": "shipped (recipes/<model>.toml), objective/plus/steps overridden per row"}

    def write_json(done: list[dict]):  # after every row, so a run cut short keeps what it measured
        if args.json:
            from lsdtool.fileio import write_bytes

            write_bytes(args.json, (json.dumps({"protocol": protocol_now(), "rows": done}, indent=1) + "\n").encode())

    for name in args.models:
        rows += run_model(name, args, device, log, on_row=lambda out: write_json(rows + out))
    protocol = protocol_now()
    wall = protocol["wall_seconds"]
    print(f"n = {args.n} per seed, seeds {args.seeds}, device {device}"
          f"{' (' + protocol['gpu'] + ')' if protocol['gpu'] else ''}, {protocol['threads']} threads, "
          f"wall {wall:.0f} s, load average {' '.join(f'{v:.2f}' for v in protocol['load_average'])}\n")
    print(table(rows, args.models))
    write_json(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
