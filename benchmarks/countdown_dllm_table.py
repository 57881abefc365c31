"""The countdown-dllm table: LSD+ block schedules against LLaDA's default at the same number of model calls.

Each sample is a 64-token prompt (the start of a held-out countdown sequence) followed by 192 generated
tokens in blocks of 32 (6 blocks). Rows: LLaDA's default (``confidence``, the same number of tokens at
every step of a block, low-confidence remasking), LSD+ distilled on other prompts and that teacher itself (one
token per step), at each number of calls. Figures per held-out seed: the countdown error of the whole
sequence (mean and standard error over samples) and the diversity of the generated part (entropy across
samples, averaged over positions). Both samplers draw candidates at temperature 1.

    python benchmarks/countdown_dllm_table.py --n 1024 --seeds 0 1 --calls 24 48

Progress on stderr, the table (JSON) on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT, GEN, BLOCK = 64, 192, 32


def write_prompts(path: Path, n: int, seed: int) -> None:
    from lsdtool.models.countdown import generate

    x = generate(n, PROMPT + GEN, torch.Generator().manual_seed(seed))
    path.write_text("".join(json.dumps({"prompt": " ".join(map(str, row[:PROMPT].tolist()))}) + "\n" for row in x))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="countdown-dllm")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--calls", type=int, nargs="+", default=[24, 48])
    ap.add_argument("--samples", type=int, default=256, help="teacher trajectories for distillation")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-teacher", dest="teacher", action="store_false",
                    help="skip the teacher row (one token per call, GEN calls)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lsdtool import api, metrics
    from lsdtool.samplers import Sampler

    model = api.load_model(args.model, trust_remote_code=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.jsonl"
        write_prompts(train, args.samples, 10_000)
        for calls in args.calls:
            start = time.time()
            keys = api.block_recipe(GEN, BLOCK, train, "confidence", steps=calls)
            lsd_plus = api.distill(model, calls, True, cache=False, samples=args.samples, batch=args.batch_size,
                                   candidates=GEN, iters=20, **keys)
            distil_s = time.time() - start
            plain = Sampler.plain(calls, "confidence", options={"gen_length": GEN, "block_length": BLOCK})
            teacher = Sampler.plain(GEN, "confidence", options={"gen_length": GEN, "block_length": BLOCK})
            runs = [("teacher", teacher)] if args.teacher and calls == args.calls[0] else []
            for name, sampler in runs + [("llada-default", plain), ("lsd+", lsd_plus)]:
                for seed in args.seeds:
                    held = Path(tmp) / f"held{seed}.jsonl"
                    write_prompts(held, args.n, 20_000 + seed)
                    x = api.sample(model, sampler, args.n, seed, prompts=held, batch_size=args.batch_size)
                    err = metrics.countdown_error_rows(x)["error"]
                    mean, se = metrics.mean_se(err)
                    rows.append({"sampler": name, "calls": sampler.nfe, "seed": seed, "n": args.n, "error": mean, "error_se": se,
                                 "diversity": metrics.position_entropy(x[:, PROMPT:]),
                                 **({"distil_seconds": round(distil_s, 1)} if name == "lsd+" else {})})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"model": args.model, "prompt": PROMPT, "gen_length": GEN, "block_length": BLOCK, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
