"""Batched sample generation and its output records, shared by ``lsd sample`` and ``compare``."""

from __future__ import annotations

import hashlib
import json
from typing import Iterator, Sequence

import torch

from lsdtool import conditioning
from lsdtool.samplers import Sampler, sample

FORMATS = ("text", "jsonl", "tokens")


def pick_device(name: str | None) -> torch.device:
    """``auto`` (or None) is CUDA when present, else CPU; any other name must be a device this machine
    has (checked before a model is loaded), else a ValueError saying which devices there are."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device name; {_devices_here()}") from None
    if device.type == "meta":
        raise ValueError(f"--device {name!r} holds no data and cannot sample; {_devices_here()}")
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name!r} requested but CUDA is not available; {_devices_here()}")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name!r} requested but this machine has {count} CUDA device(s); {_devices_here()}")
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"--device {name!r} is not available on this machine; {_devices_here()}")
    return device


def _devices_here() -> str:
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ["cpu"] + [f"cuda:{k}" for k in range(cuda)]
    if torch.backends.mps.is_available():
        names.append("mps")
    return "devices here: " + ", ".join(names)


def batches(model, sampler: Sampler, indices: Sequence[int], seed: int, batch_size: int | str,
            device: torch.device, on_step=None, conditions: conditioning.Conditions | None = None,
            ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (global indices, tokens (b, L) on CPU) batch by batch; output does not depend on batch_size.

    ``indices`` may be a ``range``: only one batch of indices ever exists, so memory is flat in n.

    ``conditions`` gives each sample's fixed tokens (see :mod:`lsdtool.conditioning`). ``batch_size``
    ``auto`` starts from what the free memory holds (:func:`lsdtool.memory.auto_batch_size`) and halves a
    batch that runs out of device memory, keeping the size that worked, with one note on stderr.
    """
    from lsdtool import memory

    auto = batch_size == "auto"
    size = memory.auto_batch_size(model, device, len(indices)) if auto else batch_size
    start, failed = 0, None
    while start < len(indices):
        chunk = list(indices[start : start + size])
        try:
            x = _draw(model, sampler, chunk, seed, device, on_step, conditions)
        except memory.OUT_OF_MEMORY:
            if not auto or size == 1:
                raise
            failed, size = failed or len(chunk), max(1, len(chunk) // 2)
        else:
            if failed is not None:
                from lsdtool import console

                console.log(f"note: batch {failed} does not fit on {device}; using {size}")
                failed = None
            start += len(chunk)
            yield chunk, x
        if failed is not None and device.type == "cuda":
            torch.cuda.empty_cache()  # the failed batch's blocks, freed with its traceback


def _draw(model, sampler: Sampler, chunk: list[int], seed: int, device, on_step, conditions) -> torch.Tensor:
    """Tokens (b, L) on CPU of the samples with global ids ``chunk``."""
    index = torch.tensor(chunk, dtype=torch.long, device=device)
    x_init = fixed = None
    if conditions is not None:
        x_init, fixed = conditioning.start(model, index, seed, conditions.given(chunk).to(device))
    return sample(model, sampler, index, seed, x_init, fixed, callback=on_step).cpu()


def sampler_label(sampler: Sampler) -> str:
    """The sampler's name for provenance: its artifact key or name, else ``base-steps[-denoise]``
    followed by a digest of the grid and coefficients when they are not the plain sampler's."""
    name = sampler.meta.get("key") or sampler.meta.get("name")
    if name:
        return str(name)
    label = f"{sampler.base}-{sampler.steps}" + ("-denoise" if sampler.denoise else "")
    ts, cs = sampler.timesteps.detach().cpu().double(), sampler.coeffs.detach().cpu().double()
    plain = Sampler.plain(sampler.steps, sampler.base, sampler.mode, sampler.denoise)
    options = json.dumps(sampler.options, sort_keys=True).encode() if sampler.options else b""  # rule options
    if sampler.mode != "score" or options or not (torch.equal(ts, plain.timesteps) and torch.equal(cs, plain.coeffs)):
        digest = hashlib.sha256(sampler.mode.encode() + ts.numpy().tobytes() + cs.numpy().tobytes() + options)
        label += "-" + digest.hexdigest()[:12]
    return label


def provenance(model, sampler: Sampler, seed: int) -> dict:
    """What a jsonl record says about where it came from (compared by ``lsd merge`` and ``--resume``)."""
    return {"seed": seed, "sampler": sampler_label(sampler), "model": model.name, "model_fingerprint": model.fingerprint}


def record(model, index: int, tokens: torch.Tensor, fmt: str, extra: dict | None = None) -> str:
    """One sample as a line of the chosen format (without the trailing newline)."""
    ids = [int(v) for v in tokens.tolist()]
    if fmt == "tokens":
        return " ".join(map(str, ids))
    text = model.decode(ids) if model.has_tokenizer else None
    if fmt == "text":
        if text is None:
            return " ".join(map(str, ids))
        return text.replace("\\", "\\\\").replace("\n", "\\n")  # one sample per line
    obj = {"index": index, "tokens": ids}
    if text is not None:
        obj["text"] = text
    if extra:
        obj.update(extra)
    return json.dumps(obj, separators=(",", ":"))
