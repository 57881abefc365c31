"""Peak memory of one sampler step of a transformers masked diffusion LM at a large vocabulary (CPU).

A random-weight model in the LLaDA layout (the shipped tiny modeling file, hidden 32, one layer) with
V = 126464 (LLaDA's vocabulary, mask 126336) at L = 1024: the peak resident memory of the model's forward
alone, and of one confidence step of the block sampler (forward, in-place log score, candidates, scores),
each in a fresh process, against the size of the logits.

    python benchmarks/dllm_step_memory.py [--batch 1] [--length 1024]

Prints JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(directory: str, what: str, batch: int, length: int) -> None:
    import torch

    from lsdtool import api
    from lsdtool.samplers import Sampler, iterate

    torch.set_num_threads(2)
    model = api.load_model(directory, trust_remote_code=True)
    model.seq_len = length
    x = torch.full((batch, length), model.mask_id)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if what == "forward":
        with torch.no_grad():
            logits = model.net(input_ids=x).logits
        del logits
    else:
        sampler = Sampler.plain(2, "confidence", options={"gen_length": length, "block_length": length // 2, "greedy": True})
        with torch.no_grad():
            for step in iterate(model, sampler, torch.arange(batch), 0):
                break
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_mb": base / 1024, "peak_mb": peak / 1024}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.batch, args.length)
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    from dllm_tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        d = make_tiny(Path(tmp) / "big", vocab=126464, mask_id=126336, hidden=32, layers=1, context=args.length)
        out = {}
        for what in ("forward", "step"):
            r = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--length", str(args.length),
                                "--child", str(d), what], capture_output=True, text=True, check=True)
            out[what] = json.loads(r.stdout.strip().splitlines()[-1])
    logits_mb = args.batch * args.length * 126464 * 4 / 2**20
    print(json.dumps({"vocab": 126464, "length": args.length, "batch": args.batch, "logits_mb": round(logits_mb, 1),
                      "forward_peak_over_base_mb": round(out["forward"]["peak_mb"] - out["forward"]["base_mb"], 1),
                      "step_peak_over_base_mb": round(out["step"]["peak_mb"] - out["step"]["base_mb"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
