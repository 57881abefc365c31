"""Train ``countdown-net``: a small SEDD network (DDiT, absorbing graph, loglinear noise, scale_by_sigma)
on countdown data (DESIGN §9) with SEDD's denoising score entropy, and write it as a SEDD checkpoint.

Deterministic from ``--seed``: initialisation, data, times and masks all come from seeded generators,
and at ``--threads 1`` two runs give the same weights bit for bit (tested). With more threads the
backward pass's parallel reductions round differently from run to run: the losses agree, the weights
differ in their last bits (at most 3e-5 after 20 steps at two threads).

Each step draws fresh countdown sequences, t ~ U[eps, 1], masks each token with probability
1 - e^{-sigma_bar(t)} and minimises sigma'(t) x score entropy (summed over positions, mean over the
batch); AdamW with a linear warm-up and cosine decay, gradient clipping at 1, and an
exponential moving average of the weights, which is what gets written (float16 safetensors; the
loader restores float32).

    python benchmarks/train_countdown_net.py --out lsdtool/models/embedded/countdown-net

The defaults are the shipped network's settings (1,035,553 parameters, 1500 steps of batch 32, 2 CPU
threads), and the shipped weights came from exactly that command on a 2-core CPU: 1856 s in all, of
which about 9 minutes were the three Euler NFE 64 evaluations (``--eval-every 0`` skips them).
Runs on other devices agree in their losses but not bit for bit (CUDA runs the blocks in bfloat16).

Progress and the Euler NFE 64 countdown error of the EMA weights (every ``--eval-every`` steps) go
to stderr; the final summary (JSON) to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

TASK = "countdown"


def config_for(args) -> dict:
    """The Hydra-style SEDD config (as JSON) of the network, with the task it was trained on."""
    return {
        "task": TASK,
        "ngpus": int(str(args.device).startswith("cuda")),
        "tokens": 32,
        "training": {"batch_size": args.batch, "n_iters": args.steps, "ema": args.ema, "seed": args.seed,
                     "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
                     "sampling_eps": args.t_eps, "loss": "denoising score entropy x sigma'(t)"},
        "data": {"train": "countdown", "length": 256},
        "graph": {"type": "absorb", "file": "data", "report_all": False},
        "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "model": {"name": "countdown-net", "type": "ddit", "hidden_size": args.hidden, "cond_dim": args.cond,
                  "length": 256, "n_blocks": args.blocks, "n_heads": args.heads, "scale_by_sigma": True,
                  "dropout": 0.0},
    }


def init_weights(net: torch.nn.Module, seed: int) -> None:
    """SEDD's initialisation: embedding kaiming-uniform, adaLN modulations and output projection zero."""
    torch.manual_seed(seed)
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    torch.nn.init.kaiming_uniform_(net.vocab_embed.embedding, a=math.sqrt(5))
    zero = [b.adaLN_modulation for b in net.blocks] + [net.output_layer.adaLN_modulation, net.output_layer.linear]
    for module in zero:
        torch.nn.init.zeros_(module.weight)
        torch.nn.init.zeros_(module.bias)


def countdown_error_euler(model, nfe: int, n: int, seed: int, batch: int = 128) -> float:
    """Mean countdown error of ``n`` Euler samples at ``nfe`` steps (indices 0..n-1, ``seed``)."""
    from lsdtool.metrics import countdown_errors
    from lsdtool.samplers import Sampler, sample

    out = []
    for start in range(0, n, batch):
        index = torch.arange(start, min(n, start + batch), device=model.device)
        out.append(sample(model, Sampler.plain(nfe), index, seed))
    return countdown_errors(torch.cat(out))["error"]


def save(model, ema: dict, config: dict, out: str, metadata: dict) -> None:
    """config.json and model.safetensors (EMA weights in float16) into ``out``, each written atomically."""
    from safetensors.torch import save

    from lsdtool.fileio import write_bytes

    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in ema.items()}
    write_bytes(os.path.join(out, "model.safetensors"),
                save(state, metadata={k: str(v) for k, v in metadata.items()}))
    write_bytes(os.path.join(out, "config.json"), (json.dumps(config, indent=2) + "\n").encode())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write (config.json + model.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--cond", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--t-eps", type=float, default=1e-3, help="t ~ U[t_eps, 1]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where to train (data and randomness are drawn on the CPU either way)")
    p.add_argument("--eval-every", type=int, default=500, help="Euler NFE 64 error of the EMA weights every k steps (0: off)")
    p.add_argument("--eval-n", type=int, default=256)
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from lsdtool.diffusion.score_entropy import absorb_corrupt, absorb_loss
    from lsdtool.models.countdown import generate
    from lsdtool.models.sedd import SEDD

    config = config_for(args)
    model = SEDD(config, name="countdown-net", fingerprint="training")
    net = model.net
    init_weights(net, args.seed)
    model.to(args.device)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"countdown-net: {n_params:,} parameters, {args.threads} threads, batch {args.batch}, {args.steps} steps",
          file=sys.stderr)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)

    def lr_at(step):  # linear warm-up, then cosine decay to a tenth
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(args.seed)
    mask_id = model.vocab_size - 1
    recent, evals = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        x0 = generate(args.batch, generator=gen)
        t = args.t_eps + (1 - args.t_eps) * torch.rand(args.batch, generator=gen)
        sigma, dsigma = model.noise(t)
        x_t = absorb_corrupt(x0, sigma, mask_id, gen)
        x0, t, sigma, dsigma, x_t = (v.to(model.device) for v in (x0, t, sigma, dsigma, x_t))
        loss = absorb_loss(model.log_score(x_t, t), x_t, x0, sigma, dsigma).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for k, v in net.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        recent.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}: loss {sum(recent) / len(recent):.3f} (per token {sum(recent) / len(recent) / 256:.4f}), "
                  f"lr {lr_at(step):.2e}, {elapsed:.0f} s, {elapsed / (step + 1):.2f} s/step, load {os.getloadavg()[0]:.2f}",
                  file=sys.stderr, flush=True)
            last_loss, recent = sum(recent) / len(recent), []
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            trained = {k: v.clone() for k, v in net.state_dict().items()}
            net.load_state_dict(ema)
            net.eval()
            err = countdown_error_euler(model, 64, args.eval_n, seed=1)
            net.load_state_dict(trained)
            net.train()
            evals.append({"step": step + 1, "euler64_error": err})
            print(f"step {step + 1}: EMA Euler NFE 64 countdown error {err:.4f} (n = {args.eval_n})",
                  file=sys.stderr, flush=True)
            save(model, ema, config, args.out, {"step": step + 1, "seed": args.seed, "loss": last_loss})
    seconds = time.perf_counter() - start
    summary = {"parameters": n_params, "steps": args.steps, "batch": args.batch, "seed": args.seed,
               "threads": args.threads, "device": args.device, "seconds": round(seconds, 1), "final_loss": last_loss,
               "final_loss_per_token": last_loss / 256, "evals": evals, "load_average": os.getloadavg(),
               "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    save(model, ema, config, args.out, {"format": "sedd", "task": TASK, "steps": args.steps, "seed": args.seed,
                                        "final_loss": f"{last_loss:.4f}", "train_seconds": f"{seconds:.0f}",
                                        "threads": args.threads, "device": args.device, "torch": torch.__version__})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
