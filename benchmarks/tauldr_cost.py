"""Cost of one tauLDR log_score call against one UNet forward (x0 logits), on CPU.

log_score = the UNet forward + the gaussian graph's score: q_{t|0} (B, S, S) from the stored
eigendecomposition and the float64 contraction (B, D, S) @ (B, S, S). Two models: the tiny test fixture
(its own batch, B = 3) and a CIFAR-sized UNet with random weights (the authors' config: 3x32x32,
ch 128, ch_mult [1, 2, 2, 2], two res blocks, S = 256) at B = 16.

    python benchmarks/tauldr_cost.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import yaml

from lsdtool.models import load
from lsdtool.models.tauldr import TauLDR

FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tauldr-tiny"


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(model, batch: int, repeats: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.vocab_size, (batch, model.seq_len), generator=gen)  # random levels
    t = torch.rand(batch, generator=gen) * 0.98 + 0.01
    with torch.no_grad():
        p0 = model.x0_log_probs(x, t).double().exp()
        forward = timed(lambda: model.x0_logits(x, t), repeats)
        log_score = timed(lambda: model.log_score(x, t), repeats)
        graph = timed(lambda: model.graph.log_score(p0, x, t), repeats)
    med = {k: statistics.median(v) for k, v in (("forward", forward), ("log_score", log_score), ("graph", graph))}
    return {"B": batch, "D": model.seq_len, "S": model.vocab_size,
            "params": sum(p.numel() for p in model.net.parameters()),
            "forward_s": forward, "log_score_s": log_score, "graph_log_score_s": graph,
            "median_s": med, "log_score_over_forward": med["log_score"] / med["forward"]}


def cifar_model() -> TauLDR:
    config = yaml.safe_load((FIX / "config.yaml").read_text())
    config = copy.deepcopy(config)
    config["data"].update(S=256, shape=[3, 32, 32])
    config["model"].update(ch=128, ch_mult=[1, 2, 2, 2], num_scales=4, num_res_blocks=2, time_embed_dim=128,
                           scale_count_to_put_attn=1)
    torch.manual_seed(0)
    model = TauLDR(config, name="cifar-random", fingerprint="random")
    model.net.eval()
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "loadavg_before": os.getloadavg()}
    result["tiny"] = measure(load(str(FIX)), 3, args.repeats)
    result["cifar"] = measure(cifar_model(), 16, args.repeats)
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
