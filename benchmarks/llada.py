"""`lsd sample` against LLaDA's own ``generate()`` at the same settings: tokens/s, peak memory, model calls (NFE)
and whether the tokens agree (they must at temperature 0).

For a machine with a GPU and the real model; LLaDA's ``generate.py`` is imported from the user's checkout of
github.com/ML-GSAI/LLaDA (``--generate-py``), never copied here.

    python benchmarks/llada.py --model GSAI-ML/LLaDA-8B-Instruct --generate-py ~/LLaDA/generate.py \\
        --prompt "Lily can run 12 kilometers per hour for 4 hours. How far does she run?" --chat \\
        --gen-length 128 --block-length 32 --steps 128 --batch 4

Prints JSON on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import torch


def load_generate(path: str):
    spec = importlib.util.spec_from_file_location("llada_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate


def measure(fn, device) -> tuple[object, float, float]:
    """(result, seconds, peak memory in GiB) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return out, time.perf_counter() - start, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--generate-py", required=True, help="generate.py of a LLaDA checkout")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=0.0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    from lsdtool import api
    from lsdtool.samplers import Sampler

    model = api.load_model(args.model, device=args.device, trust_remote_code=True)
    device = model.device
    options = {"gen_length": args.gen_length, "block_length": args.block_length, "greedy": True}
    if args.cfg:
        options["cfg"] = args.cfg
    sampler = Sampler.plain(args.steps, "confidence", options=options)
    sampler.check()
    calls = {"n": 0}
    model.net.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))

    ours, ours_s, ours_mem = measure(lambda: api.sample(model, sampler, args.batch, prompt=args.prompt, chat=args.chat,
                                                        batch_size=args.batch), device)
    ours_calls, calls["n"] = calls["n"], 0
    prompt_len = model.seq_len - args.gen_length
    prompt = ours[:, :prompt_len].to(device)
    generate = load_generate(args.generate_py)
    ref, ref_s, ref_mem = measure(lambda: generate(model.net, prompt, steps=args.steps, gen_length=args.gen_length,
                                                   block_length=args.block_length, temperature=0.0,
                                                   cfg_scale=args.cfg, remasking="low_confidence",
                                                   mask_id=model.mask_id), device)
    tokens = args.batch * args.gen_length
    print(json.dumps({
        "model": args.model, "device": str(device), "batch": args.batch, "gen_length": args.gen_length,
        "block_length": args.block_length, "steps": args.steps,
        "lsd": {"tokens_per_s": round(tokens / ours_s, 2), "peak_gib": round(ours_mem, 2), "nfe": ours_calls},
        "llada_generate": {"tokens_per_s": round(tokens / ref_s, 2), "peak_gib": round(ref_mem, 2), "nfe": calls["n"]},
        "same_tokens": bool(torch.equal(ours.cpu(), ref.cpu())),
        "differing_positions": int((ours.cpu() != ref.cpu()).sum()),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
