"""Teacher rollouts shared between fits: reusing one (from memory or from the cache) gives the same
artifacts bit for bit as rolling out afresh, and a different teacher is never reused."""

import torch

from lsdtool import cache, rollouts
from lsdtool.samplers import Sampler

TINY = dict(teacher_steps=16, samples=6, batch=4, candidates=8, iters=2, seed=0)


def _fit(model, root, **keys):
    return cache.load_or_distill(model, dict(TINY, **keys), cache_dir=root)


def test_reused_rollouts_give_the_artifacts_of_fresh_ones(countdown, tmp_path, monkeypatch):
    calls = []
    from lsdtool import distillation
    real = distillation.TeacherRollout._run
    monkeypatch.setattr(distillation.TeacherRollout, "_run", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    rollouts.forget()
    shared = tmp_path / "shared"
    a8 = _fit(countdown, shared, steps=8, plus=True)
    a4 = _fit(countdown, shared, steps=4, plus=True)  # from memory, decoding costs included
    rollouts.forget()
    b4 = _fit(countdown, shared, steps=4, plus=False)  # from the file under <cache>/rollouts/
    assert len(calls) == 1 and len(list((shared / "rollouts").glob("*.rollout"))) == 1
    for sampler, keys in ((a8, dict(steps=8, plus=True)), (a4, dict(steps=4, plus=True)), (b4, dict(steps=4, plus=False))):
        rollouts.forget()
        fresh = _fit(countdown, tmp_path / f"fresh-{keys['steps']}-{keys['plus']}", **keys)
        assert torch.equal(sampler.timesteps, fresh.timesteps) and torch.equal(sampler.coeffs, fresh.coeffs)
        assert sampler.fit["loss_after"] == fresh.fit["loss_after"]
    assert len(calls) == 4


def test_another_teacher_is_rolled_out_again(countdown, tmp_path):
    rollouts.forget()
    _fit(countdown, tmp_path, steps=4, plus=True)
    other = _fit(countdown, tmp_path, steps=4, plus=True, seed=1)
    assert isinstance(other, Sampler) and len(list((tmp_path / "rollouts").glob("*.rollout"))) == 2
