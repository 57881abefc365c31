"""Teacher rollouts kept for the next fit: LSD and LSD+ at several step counts share one rollout.

A rollout depends on the model (fingerprint), the teacher (base rule, steps), the trajectories
(samples, seed, batch) and the candidate boundaries where states are kept, never on the student's
step count itself (beyond the candidates its uniform grid adds) or the fitting keys. So
``lsd compare --steps 4,8`` distils lsd and lsd+ at both step counts from one rollout, and a
``lsd compare`` after ``lsd distill`` reuses the rollout the distillation made.

A :class:`Store` holds the last rollout in memory and, for rollouts of at most ``MAX_BYTES``, keeps
it under ``<cache>/rollouts/`` as a ``.rollout`` file in safetensors format (states, reveal steps, reveal log-probabilities
and the decoding-cost matrix) written through :mod:`lsdtool.fileio`. The restored rollout holds
the same tensors as a fresh one, so the fitted artifact is the same bit for bit (a test checks this).
The paper objective's teacher-mass buffer and distributed rollouts are never kept.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MAX_BYTES = 256 << 20  # rollouts larger than this are kept in memory only
_KEYS = ("base", "teacher_steps", "samples", "seed", "batch")
_memory: dict[str, object] = {}  # "<folder>:<key>" -> the last TeacherRollout (one entry: a rollout can be large)


def key(model, recipe: dict, candidates) -> str:
    """Hash of what a teacher rollout depends on."""
    src = {"fingerprint": model.fingerprint, **{k: recipe[k] for k in _KEYS}, "candidates": [int(c) for c in candidates]}
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]


class Store:
    """Callable in place of :class:`lsdtool.distillation.TeacherRollout`: the rollout it holds for the
    same inputs, else a fresh one (then kept)."""

    def __init__(self, folder: Path | None, stem: str = "model"):
        self.folder, self.stem = (Path(folder) if folder is not None else None), stem

    def path(self, k: str) -> Path | None:
        # not *.safetensors: the cache's samplers are those, and a rollout is none
        return None if self.folder is None else self.folder / f"{self.stem}-{k}.rollout"

    def __call__(self, model, recipe: dict, device, collect_mass: bool = False, world=None):
        from lsdtool.distillation import TeacherRollout, candidate_steps

        if collect_mass or world is not None:
            return TeacherRollout(model, recipe, device, collect_mass=collect_mass, world=world)
        k = key(model, recipe, candidate_steps(recipe))
        slot = f"{self.folder}:{k}"  # memory fronts one cache: another cache directory starts afresh
        rollout = _memory.get(slot)
        if rollout is not None and rollout.model is model:
            return rollout
        path = self.path(k)
        rollout = _read(path, model, recipe, device) if path is not None else None
        if rollout is None:
            rollout = TeacherRollout(model, recipe, device)
        _memory.clear()
        _memory[slot] = rollout
        rollout.store = (self, path)
        return rollout


def forget() -> None:
    """Drop the rollout held in memory."""
    _memory.clear()


def save_last() -> None:
    """Write the rollout held in memory (with its decoding costs when computed) to its store's file,
    if it has one and is small enough; a read-only or full cache only costs the next fit a rollout."""
    from safetensors.torch import save as encode

    from lsdtool import fileio

    for rollout in list(_memory.values()):
        _, path = getattr(rollout, "store", (None, None))
        has_cost = getattr(rollout, "decoding_cost", None) is not None
        if path is None or getattr(rollout, "saved", None) in (True, has_cost):
            continue
        tensors = {"states": rollout.states.to(_state_dtype(rollout.model.vocab_size)).contiguous(),
                   "reveal_step": rollout.reveal_step.to(_step_dtype(rollout.n_steps)).contiguous(),
                   "reveal_logp": rollout.reveal_logp.contiguous(), "candidates": rollout.candidates.contiguous()}
        if has_cost:
            tensors["decoding_cost"] = rollout.decoding_cost.contiguous()
        if sum(t.numel() * t.element_size() for t in tensors.values()) > MAX_BYTES:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fileio.write_bytes(path, encode(tensors, metadata={"format": "lsd.rollout",
                                                               "model_fingerprint": rollout.model.fingerprint}))
            rollout.saved = has_cost
        except OSError:
            pass


def _state_dtype(vocab_size: int):
    import torch

    return torch.uint8 if vocab_size <= 256 else torch.int32


def _step_dtype(n: int):
    import torch

    return torch.int16 if n < 2**15 else torch.int32


def _read(path: Path, model, recipe: dict, device):
    """The rollout stored at ``path`` as a TeacherRollout, or None when absent or unreadable."""
    import torch
    from safetensors.torch import load_file

    from lsdtool.distillation import TeacherRollout, block_options, candidate_steps

    if not path.is_file() or block_options(recipe):  # prompted block rollouts are not kept
        return None
    try:
        t = load_file(str(path))
    except Exception:  # a torn or foreign file: roll out again (safetensors raises its own types)
        return None
    cands = candidate_steps(recipe)
    n, l = recipe["samples"], model.seq_len
    if not torch.equal(t.get("candidates", torch.empty(0)), cands) or tuple(t["states"].shape) != (len(cands), n, l):
        return None
    r = TeacherRollout.restored(model, recipe, device, t["states"].long(), t["reveal_step"].long(), t["reveal_logp"].double())
    r.decoding_cost = t.get("decoding_cost")
    r.saved = r.decoding_cost is not None
    return r
