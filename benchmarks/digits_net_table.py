"""The digits-net table: tau-leaping, its predictor-corrector, the teacher, LSD and LSD+ on the shipped image
model, scored by ``fd-digits`` / ``kid-digits`` against the held-out digits, with the class entropy beside.

Every distilled row uses the model's shipped recipe (``recipes/digits-net.toml``, distillation seed = its
seed); the row ``lsd+ (defaults)`` uses the defaults that a τLDR folder no recipe names would get. Samples
0..n-1 of each held-out evaluation seed are scored per seed (FD is biased in n, so compare at equal n):
FD and the class entropy as mean ± s.e. over the seeds, KID pooled over all samples with its jackknife s.e.
A PNG grid of the first 64 samples of the first seed is written per row (``--grids DIR``).

    python benchmarks/digits_net_table.py --n 2048 --seeds 1000 1001 --json benchmarks/results/digits-net-table.json \
        --grids docs/img/digits
    python benchmarks/digits_net_table.py --quick          # CPU smoke: n = 128, one seed, NFE 8

Progress on stderr; the table (markdown) on stdout; the JSON (when asked) is rewritten after every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
MODEL = "digits-net"


def evaluate(model, sampler, metric, n: int, seeds: list[int], device, batch: int) -> tuple[dict, torch.Tensor]:
    """fd-digits per seed (mean ± s.e. over seeds), class entropy likewise, KID of all samples; first seed's samples."""
    from lsdtool.generation import batches
    from lsdtool.images import levels_tensor
    from lsdtool.metrics import mean_se
    from lsdtool.metrics_image import kid

    per_seed, first, feats = [], None, []
    start = time.perf_counter()
    for seed in seeds:
        x = torch.cat([x for _, x in batches(model, sampler, range(n), seed, batch, device)])
        first = x if first is None else first
        feats.append(metric.features(levels_tensor(model, x).reshape(-1, 8, 8)))
        per_seed.append(metric.figures(feats[-1]))
    seconds = time.perf_counter() - start
    fd, fd_se = mean_se(torch.tensor([r["fd-digits"] for r in per_seed], dtype=torch.float64))
    h, h_se = mean_se(torch.tensor([r["class_entropy"] for r in per_seed], dtype=torch.float64))
    pooled = kid(torch.cat(feats), metric.reference, subsets=50)
    out = {"fd": fd, "fd_se": fd_se if len(seeds) > 1 else None, "fd_per_seed": [r["fd-digits"] for r in per_seed],
           "kid": pooled["kid"], "kid_se": pooled["kid_se"], "class_entropy": h,
           "class_entropy_se": h_se if len(seeds) > 1 else None, "sample_seconds": round(seconds, 2)}
    return out, first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, help="samples per evaluation seed [default: 2048; 128 with --quick]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001], help="evaluation seeds (held out from distillation)")
    ap.add_argument("--tau-nfe", type=int, nargs="+", default=[4, 8, 16, 64])
    ap.add_argument("--pc-steps", type=int, nargs="*", default=[7, 15], help="steps of the tau-leaping-pc rows")
    ap.add_argument("--lsd-nfe", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--defaults-nfe", type=int, nargs="*", default=[8], help="NFE of the lsd+ (defaults) rows")
    ap.add_argument("--no-teacher", action="store_true")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the result (results-page schema) here after every row")
    ap.add_argument("--grids", type=Path, help="write one PNG grid of 64 samples per row into this directory")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.seeds, args.tau_nfe, args.lsd_nfe = args.n or 128, args.seeds[:1], [8], [8]
        args.pc_steps, args.defaults_nfe, args.no_teacher = [], [], True
    args.n = args.n or 2048
    torch.set_num_threads(args.threads)
    from lsdtool import distillation, fileio, images, recipes, steprules
    from lsdtool.generation import pick_device
    from lsdtool.metrics_digits import DigitsEval
    from lsdtool.models import load
    from lsdtool.samplers import Sampler
    from render_results import emit

    device = pick_device(args.device)
    model = load(MODEL, device=device, offline=True)
    metric = DigitsEval("fd-digits", model)
    shipped = recipes.effective(MODEL, graph=model.graph.name)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"{MODEL}: fingerprint {model.fingerprint}; classifier held-out accuracy "
        f"{metric.protocol['classifier_heldout_accuracy']}; recipe {json.dumps(shipped)}")
    start, rows = time.perf_counter(), []
    if args.grids:
        args.grids.mkdir(parents=True, exist_ok=True)

    def result() -> dict:
        cols = ["sampler", "NFE", "fd-digits (mean ± s.e. over seeds)", "fd per seed", "kid-digits ± s.e.",
                "class entropy (nats)", "fit (s)", "samples"]
        body = [[r["sampler"], r["nfe"], f"{r['fd']:.3f}" + (f" ± {r['fd_se']:.3f}" if r["fd_se"] is not None else ""),
                 ", ".join(f"{v:.3f}" for v in r["fd_per_seed"]), f"{r['kid']:.4f} ± {r['kid_se']:.4f}",
                 f"{r['class_entropy']:.3f}" + (f" ± {r['class_entropy_se']:.3f}" if r["class_entropy_se"] is not None else ""),
                 r.get("fit_seconds", ""), f"![{r['sampler']} {r['nfe']}](img/digits/{r['grid']})" if r.get("grid") else ""]
                for r in rows]
        return {"id": "digits-net-table", "title": "digits-net: tau-leaping, the teacher, LSD and LSD+ (fd-digits)",
                "command": "python benchmarks/digits_net_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads" if device.type == "cpu"
                else torch.cuda.get_device_name(device),
                "date": datetime.date.today().isoformat(), "source": "measured",
                "summary": (f"n = {args.n} samples per held-out seed, seeds {args.seeds}, device {device}; the distilled "
                            f"rows use recipes/digits-net.toml; fd-digits and kid-digits: the digits classifier's features "
                            f"(held-out accuracy {metric.protocol['classifier_heldout_accuracy']}) against the "
                            f"{metric.protocol['reference_n']} held-out digits. Not FID."),
                "tables": [{"columns": cols, "rows": body}],
                "notes": [f"wall {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f} at the end"],
                "rows": rows}

    def add(row: dict, sampler) -> None:
        res, first = evaluate(model, sampler, metric, args.n, args.seeds, device, args.batch)
        row |= res
        if args.grids:
            name = f"{row['sampler'].replace(' ', '-').replace('(', '').replace(')', '')}-{row['nfe']}.png"
            fileio.write_bytes(args.grids / name, images.encode(images.grid(images.samples_to_images(model, first[:64]), 16)))
            row["grid"] = name
        rows.append(row)
        if args.json:
            fileio.write_text(args.json, json.dumps(result(), indent=1) + "\n")
        log(f"{row['sampler']} NFE {row['nfe']}: fd {row['fd']:.3f} (per seed {row['fd_per_seed']}), kid "
            f"{row['kid']:.4f} ± {row['kid_se']:.4f}, class entropy {row['class_entropy']:.3f} "
            f"[{row['sample_seconds']:.0f} s sampling]")

    tau = steprules.rule("tau-leaping")
    for nfe in args.tau_nfe:
        add({"sampler": "tau-leaping", "nfe": nfe}, Sampler.plain(tau.steps_for(nfe), "tau-leaping"))
    if not args.no_teacher:
        add({"sampler": "teacher", "nfe": tau.nfe(Sampler.plain(shipped["teacher_steps"], "tau-leaping"))},
            Sampler.plain(shipped["teacher_steps"], "tau-leaping"))
    for steps in args.pc_steps:
        pc = Sampler.plain(steps, "tau-leaping-pc")
        add({"sampler": "tau-leaping-pc", "nfe": steprules.rule("tau-leaping-pc").nfe(pc)}, pc)
    fits = [(label, plus, nfe, None) for label, plus in (("lsd", False), ("lsd+", True)) for nfe in args.lsd_nfe]
    fits += [("lsd+ (defaults)", True, nfe, "defaults") for nfe in args.defaults_nfe]
    for label, plus, nfe, which in fits:
        overrides = {"steps": tau.steps_for(nfe), "plus": plus}
        named = "a-tauldr-folder" if which else MODEL  # no shipped recipe names the first: the defaults apply
        recipe = recipes.effective(named, overrides=overrides, graph=model.graph.name)
        t0 = time.perf_counter()
        fit = distillation.distill(model, recipe, device=device)
        add({"sampler": label, "nfe": nfe, "fit_seconds": round(time.perf_counter() - t0, 1),
             "teacher_steps": recipe["teacher_steps"], "timesteps": [round(t, 5) for t in fit.sampler.timesteps.tolist()],
             "coeffs": [round(c, 4) for c in fit.sampler.coeffs.tolist()]}, fit.sampler)
    out = result()
    if args.json:
        return emit(out, args.json)
    from render_results import _table

    print("\n".join(_table(out["tables"][0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
