"""Train ``digits-net``: a tauLDR image model (UNet, discretised-logistic x0 head, the ordinal ``gaussian``
graph on 17 levels) on scikit-learn's handwritten digits (8×8, levels 0..16), with tauLDR's continuous-time
ELBO (``GenericAux``, one forward pass, DESIGN §12), and the small classifier that ``fd-digits`` and
``kid-digits`` use. scikit-learn is needed here only (``pip install scikit-learn``), never at run time.

The 1797 digits are split once by a fixed permutation (``--split-seed``): 450 held out, never seen by
either network, shipped as the metrics' reference; 1347 train both networks.

Written to ``--out`` (the embedded model's folder, loaded offline by the one ``tauldr`` adapter):
- ``config.yaml``: tauLDR's config layout (data.S, data.shape, model.*) with ``task: digits``;
- ``ckpt_<steps>.safetensors``: the UNet's EMA weights under tauLDR's ``net.`` names (safetensors, not a
  pickle; the adapter reads it as it reads the EMA shadow list of a tauLDR ``ckpt_*.pt``);
- ``classifier.safetensors`` and ``heldout.safetensors`` (the classifier's held-out accuracy and digest in the config).

Reproducibility: every random draw (split, initialisation, batches, times, forward noise, augmentation)
comes from generators seeded by ``--seed``; at ``--threads 1`` two runs write identical files (tested).
With more threads the convolutions' parallel reductions round differently, so the losses agree and the
weights differ in their last bits.

    python benchmarks/train_digits_net.py --out lsdtool/models/embedded/digits-net

Progress goes to stderr, the summary (JSON) to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HELDOUT = 450
GRAPH = {"rate_sigma": 2.0, "Q_sigma": 34.0, "time_base": 1.0, "time_exponential": 100.0}
EPS_RATIO, MIN_TIME, NLL_WEIGHT = 1e-9, 0.01, 0.001  # tauLDR's GenericAux settings


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: levels (1797, 8, 8) long in 0..16 and labels (1797,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this script needs scikit-learn: pip install scikit-learn")
    d = load_digits()
    return torch.as_tensor(d.images).round().long(), torch.as_tensor(d.target).long()


def split(levels, labels, seed: int):
    """(train levels, train labels, held-out levels, held-out labels) by one seeded permutation."""
    perm = torch.randperm(levels.shape[0], generator=torch.Generator().manual_seed(seed))
    held, train = perm[:HELDOUT].sort().values, perm[HELDOUT:].sort().values
    return levels[train], labels[train], levels[held], labels[held]


def config_for(args) -> dict:
    """The tauLDR-layout config of the network (what the ``tauldr`` adapter reads)."""
    return {
        "task": "digits",
        "experiment_name": "digits-net",
        "data": {"name": "sklearn-digits", "S": 17, "shape": [1, 8, 8], "train": True, "heldout": HELDOUT,
                 "split_seed": args.split_seed, "batch_size": args.batch},
        "model": {"name": "GaussianTargetRateImageX0PredEMA", "ch": args.ch, "ch_mult": [1, 2], "num_scales": 2,
                  "num_res_blocks": args.res_blocks, "input_channels": 1, "scale_count_to_put_attn": 1,
                  "data_min_max": [0, 16], "dropout": 0.0, "skip_rescale": True, "time_embed_dim": args.ch,
                  "time_scale_factor": 1000, "fix_logistic": False, "ema_decay": args.ema, **GRAPH},
        "loss": {"name": "GenericAux", "eps_ratio": EPS_RATIO, "min_time": MIN_TIME, "nll_weight": NLL_WEIGHT,
                 "one_forward_pass": True},
        "optimizer": {"name": "Adam", "lr": args.lr},
        "training": {"n_iters": args.steps, "warmup": args.warmup, "clip_grad": True, "seed": args.seed},
    }


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image (B, 8, 8) moved by up to one pixel each way, zero-filled (the classifier's augmentation)."""
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=gen)
    rows = (dy[:, None] + torch.arange(8))[:, :, None].expand(-1, 8, 10)
    out = padded.gather(1, rows)
    cols = (dx[:, None] + torch.arange(8))[:, None, :].expand(-1, 8, 8)
    return out.gather(2, cols)


def train_classifier(train_x, train_y, held_x, held_y, args):
    """The metrics' classifier (Adam, ±1-pixel shifts), and its held-out accuracy."""
    from lsdtool.metrics_digits import DigitsClassifier

    torch.manual_seed(args.seed)
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(args.classifier_epochs):
        perm = torch.randperm(train_x.shape[0], generator=gen)
        for s in range(0, len(perm), 64):
            idx = perm[s : s + 64]
            loss = F.cross_entropy(net(shift(train_x[idx], gen)), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(held_x).argmax(-1) == held_y).double().mean().item()
    return net, accuracy


def elbo_loss(model, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """tauLDR's GenericAux loss for x0 (B, D) levels: t ~ U[0.01, 1], x_t ~ q_t(. | x0), x~ one forward jump
    of x_t (dimension by its total rate, value by its row), then :func:`negative_elbo` at (x~, t)."""
    graph, (B, D), S = model.graph, x0.shape, model.vocab_size
    ts = torch.rand(B, generator=gen, dtype=torch.float64) * (1 - MIN_TIME) + MIN_TIME
    qt0 = graph.transition(ts)
    rate = graph.beta(ts)[:, None, None] * graph.rate_matrix()
    x_t = torch.multinomial(qt0[torch.arange(B)[:, None], x0].reshape(B * D, S), 1, generator=gen).reshape(B, D)
    out_rates = rate[torch.arange(B)[:, None], x_t].clone()  # (B, D, S)
    out_rates.scatter_(2, x_t[..., None], 0.0)
    dim = torch.multinomial(out_rates.sum(-1), 1, generator=gen)[:, 0]  # (B,)
    new = torch.multinomial(out_rates[torch.arange(B), dim], 1, generator=gen)[:, 0]
    x_tilde = x_t.clone()
    x_tilde[torch.arange(B), dim] = new
    return negative_elbo(model, x0, ts, x_tilde)


def negative_elbo(model, x0: torch.Tensor, ts: torch.Tensor, x_tilde: torch.Tensor) -> torch.Tensor:
    """tauLDR's GenericAux (one forward pass) at the jumped state x~ (B, D), times ts (B,) float64:
    mean(reg) + mean(-sig / sig_norm) + 0.001 CE(p(x0 | x~), x0), in float64 but the network."""
    graph, (B, D), S = model.graph, x0.shape, model.vocab_size
    qt0 = graph.transition(ts)  # (B, S, S): q[b, a, y] = q_t(y | a)
    rate = graph.beta(ts)[:, None, None] * graph.rate_matrix()  # (B, S, S): rate[b, a, y] from a to y
    bidx = torch.arange(B)[:, None]
    logits = model.x0_logits(x_tilde, ts.float())  # (B, D, S) float32
    p0t = logits.double().softmax(-1)
    off = torch.ones(B, D, S, dtype=torch.float64).scatter_(2, x_tilde[..., None], 0.0)  # y != x_tilde
    rate_in = rate.transpose(1, 2)[bidx, x_tilde]  # (B, D, S): rate[b, y, x_tilde] (from y into x_tilde)
    q_into = qt0.transpose(1, 2)[bidx, x_tilde] + EPS_RATIO  # (B, D, S): q_t(x_tilde | a) over a
    # first term: sum_{y != x~} R_t(y, x~) sum_a p(a | x~) q_t(y | a) / q_t(x~ | a)
    reg = ((p0t / q_into) * ((off * rate_in) @ qt0.transpose(1, 2))).sum((1, 2))
    # second term: the signal, importance-weighted by the forward jump that made x~
    inner = torch.log((p0t / q_into) @ qt0 + EPS_RATIO)  # (B, D, S): log sum_a p(a|x~) q_t(y|a) / q_t(x~|a)
    q_from_x0 = qt0[bidx, x0]  # (B, D, S): q_t(y | x0)
    q_x0_to_tilde = q_from_x0.gather(2, x_tilde[..., None]) + EPS_RATIO  # (B, D, 1)
    weight = off * rate_in * q_from_x0 / q_x0_to_tilde
    outer = (weight * inner).sum((1, 2))
    row_sums = -torch.diagonal(rate, dim1=1, dim2=2)  # (B, S)
    at_tilde = row_sums[bidx, x_tilde]  # (B, D)
    z = at_tilde.sum(1)[:, None, None] - at_tilde[..., None] + row_sums[:, None, :]  # (B, D, S)
    norm = (weight / z).sum((1, 2))
    neg_elbo = (-outer / norm).mean() + reg.mean()
    nll = F.cross_entropy(logits.transpose(1, 2), x0)
    return neg_elbo + NLL_WEIGHT * nll.double()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ch", type=int, default=32)
    ap.add_argument("--res-blocks", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--classifier-epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="stop early (and save) after this long")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals on CPU cost orders of magnitude per op; they carry nothing here
    from safetensors.torch import save

    from lsdtool import fileio
    from lsdtool.models.tauldr import TauLDR

    start = time.time()
    train_x, train_y, held_x, held_y = split(*load_data(), args.split_seed)
    classifier, accuracy = train_classifier(train_x, train_y, held_x, held_y, args)
    print(f"classifier: held-out accuracy {accuracy:.4f} ({time.time() - start:.0f}s)", file=sys.stderr, flush=True)

    config = config_for(args)
    torch.manual_seed(args.seed)
    model = TauLDR(config, name="digits-net", fingerprint="training")
    net = model.net
    ema = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    data = train_x.reshape(train_x.shape[0], -1)
    done, t0, loss = 0, time.time(), torch.tensor(float("nan"))
    for step in range(args.steps):
        x0 = data[torch.randint(0, data.shape[0], (args.batch,), generator=gen)]
        loss = elbo_loss(model, x0, gen).float()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema, net.parameters()):
                e.mul_(args.ema).add_(p.detach(), alpha=1 - args.ema)
        done = step + 1
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if time.time() - start > args.max_seconds:
            break

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("ckpt_*.safetensors"):
        old.unlink()
    import yaml  # PyYAML, a dependency of huggingface_hub

    state = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    config["training"]["n_iters_done"] = done
    # the metrics' metadata lives in the config: safetensors writes its own metadata in no fixed order
    config["classifier"] = {"file": "classifier.safetensors", "heldout_accuracy": round(accuracy, 6),
                            "sha256": hashlib.sha256(save(state)).hexdigest()}
    config["heldout"] = {"file": "heldout.safetensors", "n": int(held_x.shape[0]),
                         "source": "scikit-learn load_digits (UCI optical recognition of handwritten digits)"}
    fileio.write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=True))
    names = [n for n, _ in net.named_parameters()]
    weights = {f"net.{n}": e.contiguous() for n, e in zip(names, ema)}
    weights |= {f"net.{n}": b.contiguous() for n, b in net.named_buffers()}
    fileio.write_bytes(out / f"ckpt_{done:010d}.safetensors", save(weights))
    fileio.write_bytes(out / "classifier.safetensors", save(state))
    fileio.write_bytes(out / "heldout.safetensors",
                       save({"levels": held_x.to(torch.uint8).contiguous(), "labels": held_y.contiguous()}))
    summary = {"steps": done, "seconds": round(time.time() - start, 1), "final_loss": round(loss.item(), 4),
               "parameters": sum(p.numel() for p in net.parameters()), "classifier_heldout_accuracy": round(accuracy, 4),
               "train": int(train_x.shape[0]), "heldout": int(held_x.shape[0])}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
