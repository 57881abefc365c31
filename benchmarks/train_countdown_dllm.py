"""Train ``countdown-dllm``: a small bidirectional transformer in the LLaDA layout (x0 logits, no time input,
``auto_map`` + ``mask_token_id`` in its config, a word-level tokenizer with a chat template) on countdown
sequences (DESIGN §9), with the masked-diffusion loss: t ~ U[eps, 1], each token masked with probability t,
cross-entropy on the masked positions (by default averaged over them; ``--weighting elbo`` is LLaDA's 1/t
weighting, whose variance stalled training at batch 16 here). AdamW with warm-up and cosine decay,
gradient clipping at 1.

Vocabulary: the values 0..31 (ids 0..31), then ``[MASK]`` (32), ``[PAD]`` (33), ``<user>`` (34) and
``<assistant>`` (35): the mask is not the last id. Deterministic from ``--seed`` at ``--threads 1``.

    python benchmarks/train_countdown_dllm.py --out lsdtool/models/embedded/countdown-dllm \
        --steps 1200 --hidden 128 --layers 4 --batch 32 --lr 1e-3

Progress goes to stderr, the summary (JSON) to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lsdtool import fileio  # noqa: E402

MODELING = ROOT / "lsdtool" / "models" / "embedded" / "countdown-dllm" / "modeling_tinydllm.py"
VALUES, MASK, PAD, USER, ASSISTANT = 32, 32, 33, 34, 35
SPECIALS = {"[MASK]": MASK, "[PAD]": PAD, "<user>": USER, "<assistant>": ASSISTANT}
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")
AUTO_MAP = {"AutoConfig": "modeling_tinydllm.TinyDllmConfig", "AutoModel": "modeling_tinydllm.TinyDllmModel"}


def write_tokenizer(out: Path) -> None:
    """A word-level tokenizer (values as words, specials) built offline with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(v): v for v in range(VALUES)} | SPECIALS
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, mask_token="[MASK]", pad_token="[PAD]")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    path = out / "tokenizer_config.json"  # readable by transformers 4 too: the class by its old name, the template inline
    config = json.loads(path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE, model_max_length=1 << 20)
    fileio.write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_modeling():
    import importlib.util

    spec = importlib.util.spec_from_file_location("modeling_tinydllm", MODELING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weighting", choices=["token", "elbo"], default="token",
                    help="token: mean cross-entropy over masked tokens; elbo: LLaDA's 1/t-weighted sum")
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="stop early (and save) after this long")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals on CPU cost orders of magnitude per op; they carry nothing here
    from lsdtool.models.countdown import generate

    mod = load_modeling()
    torch.manual_seed(args.seed)
    config = mod.TinyDllmConfig(vocab_size=VALUES + len(SPECIALS), hidden_size=args.hidden, num_hidden_layers=args.layers,
                                num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                                max_position_embeddings=args.length, mask_token_id=MASK)
    net = mod.TinyDllmModel(config)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    start, eps, done = time.time(), 1e-3, 0
    for step in range(args.steps):
        x0 = generate(args.batch, args.length, gen)
        t = eps + (1 - eps) * torch.rand(args.batch, 1, generator=gen)
        masked = torch.rand(x0.shape, generator=gen) < t
        logits = net(torch.where(masked, MASK, x0)).logits
        ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
        if args.weighting == "elbo":  # LLaDA's 1/t weighting: unbiased, but high variance in small batches
            loss = (ce * masked / t).sum(-1).mean() / args.length
        else:  # cross-entropy per masked token
            loss = (ce * masked).sum() / masked.sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", file=sys.stderr, flush=True)
        if time.time() - start > args.max_seconds:
            break
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out)
    if MODELING.resolve() != (out / MODELING.name).resolve():
        shutil.copy(MODELING, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(auto_map=AUTO_MAP, task="countdown", mask_token_id=MASK, pad_token_id=PAD)
    fileio.write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_tokenizer(out)
    summary = {"steps": done, "seconds": round(time.time() - start, 1), "final_loss": round(loss.item(), 4),
               "parameters": sum(p.numel() for p in net.parameters())}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
