"""--batch-size auto: a size from the free memory, a batch that runs out of memory halved, the samples unchanged."""

import pytest
import torch

import lsdtool
from conftest import run_cli
from lsdtool import memory
from lsdtool.samplers import Sampler


def test_auto_size_is_the_share_of_free_memory_over_a_samples_step_bytes(countdown, monkeypatch):
    assert 0 < memory.available_bytes(torch.device("cpu"))  # this machine's MemAvailable
    per = countdown.seq_len * countdown.vocab_size * 4 * memory.STEP_FACTOR
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(per * 10 / memory.SHARE) + 5)
    assert memory.auto_batch_size(countdown, torch.device("cpu"), 1000) == 10
    assert memory.auto_batch_size(countdown, torch.device("cpu"), 7) == 7  # never more than the samples asked for
    monkeypatch.setattr(memory, "available_bytes", lambda device: 0)
    assert memory.auto_batch_size(countdown, torch.device("cpu"), 7) == 1  # a batch of one is always tried


def _fits_at_most(model, monkeypatch, limit: int) -> list[int]:
    """Make the model's forward run out of memory above ``limit`` rows; returns the batch sizes it was called with."""
    calls, forward = [], model.log_score

    def log_score(x, t):
        calls.append(x.shape[0])
        if x.shape[0] > limit:
            raise memory.OUT_OF_MEMORY("CUDA out of memory (simulated)")
        return forward(x, t)

    monkeypatch.setattr(model, "log_score", log_score)
    return calls


def test_a_batch_that_does_not_fit_is_halved_once_with_one_note(countdown, monkeypatch, capfd):
    sampler = Sampler.plain(3)
    expected = lsdtool.sample(countdown, sampler, 11, 2, batch_size=4)
    capfd.readouterr()
    monkeypatch.setattr(memory, "auto_batch_size", lambda model, device, n: n)
    calls = _fits_at_most(countdown, monkeypatch, 3)
    batches = list(lsdtool.sample_batches(countdown, sampler, 11, 2, batch_size="auto"))
    assert [len(ids) for ids, _ in batches] == [2, 2, 2, 2, 2, 1]  # 11 and 5 fail; 2 works and is kept
    assert calls[:2] == [11, 5] and max(calls[2:]) == 2
    assert torch.equal(torch.cat([x for _, x in batches]), expected)  # the same samples as any other batching
    assert capfd.readouterr().err.strip() == "note: batch 11 does not fit on cpu; using 2"


def test_a_fixed_batch_size_that_does_not_fit_is_an_error_not_a_silent_split(countdown, monkeypatch):
    _fits_at_most(countdown, monkeypatch, 3)
    with pytest.raises(memory.OUT_OF_MEMORY):
        lsdtool.sample(countdown, Sampler.plain(3), 8, 0, batch_size=8)


def test_cli_auto_batch_writes_the_same_samples():
    args = ("sample", "--model", "countdown", "--steps", "4", "-n", "10", "--seed", "3", "--format", "jsonl")
    auto = run_cli(*args, "--batch-size", "auto", catch_exceptions=False)
    fixed = run_cli(*args, "--batch-size", "3", catch_exceptions=False)
    assert auto.exit_code == 0 and auto.stdout == fixed.stdout
    bad = run_cli(*args, "--batch-size", "lots")
    assert bad.exit_code != 0 and "must be auto or an integer" in bad.output
