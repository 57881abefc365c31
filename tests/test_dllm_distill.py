"""Distillation of block schedules: the teacher is the block sampler with one token per step; LSD fits Phi
(temperature mode) on the teacher's committed tokens, LSD+ picks each block's schedule."""

import json

import pytest
import torch

from conftest import run_cli
from dllm_tiny import make_tiny
from lsdtool import api
from lsdtool.samplers import iterate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("distil")
    model_dir = make_tiny(d / "m", vocab=36, mask_id=32, tokenizer=True, mask_bias=-30.0)
    prompts = d / "p.jsonl"
    prompts.write_text('{"prompt": "9 8 7"}\n{"prompt": "20 19 18"}\n')
    return str(model_dir), str(prompts)


def fit(model_dir, prompts, base, plus):
    model = api.load_model(model_dir, trust_remote_code=True)
    keys = api.block_recipe(8, 4, prompts, base)
    keys.update(samples=8, batch=8, candidates=8, iters=3)
    return model, api.distill(model, 4, plus, cache=False, **keys)


@pytest.mark.parametrize("base", ["confidence", "count"])
@pytest.mark.parametrize("plus", [False, True])
def test_block_schedules_distil_and_sample(setup, base, plus):
    model_dir, prompts = setup
    model, sampler = fit(model_dir, prompts, base, plus)
    assert sampler.base == base and sampler.mode == "temperature"
    assert sampler.options["gen_length"] == 8 and sampler.options["block_length"] == 4
    assert sampler.options.get("counts") == ("noise" if plus else None)
    assert not torch.equal(sampler.coeffs, torch.ones(4, dtype=torch.float64))  # the fit moved Phi
    assert sampler.meta["prompts_digest"] and "gen_length = 8" in sampler.meta["recipe"]
    # the student's steps commit, within each block, what the teacher committed between its grid points:
    # one token per teacher step, so step k commits (grid index difference) tokens
    teacher_times = torch.linspace(1, 1e-5, 9, dtype=torch.float64)
    idx = [int(torch.argmin((teacher_times - t).abs())) for t in sampler.timesteps]
    assert idx[0] == 0 and idx[2] == 4 and idx[4] == 8  # block boundaries
    fixed = torch.zeros(2, 11, dtype=torch.bool)
    fixed[:, :3] = True
    x = torch.full((2, 11), 32)
    x[0, :3], x[1, :3] = torch.tensor([9, 8, 7]), torch.tensor([20, 19, 18])
    model.seq_len = 11
    commits = [int(((s.x == 32) & (s.x_next != 32))[0].sum()) for s in iterate(model, sampler, torch.arange(2), 0, x, fixed)]
    assert commits == [b - a for a, b in zip(idx, idx[1:])] and sum(commits) == 8


def test_a_sampler_for_one_block_length_refuses_another(setup, tmp_path):
    model_dir, prompts = setup
    _, sampler = fit(model_dir, prompts, "confidence", True)
    path = sampler.save(tmp_path / "s.safetensors")
    r = run_cli("sample", "--sampler", str(path), "--trust-remote-code", "--prompts", prompts, "--block-length", "2")
    assert r.exit_code == 1 and r.stdout == "" and "block length 4, not 2" in r.stderr
    ok = run_cli("sample", "--sampler", str(path), "--trust-remote-code", "--prompts", prompts, "--format", "jsonl")
    assert ok.exit_code == 0, ok.output
    rows = [json.loads(line) for line in ok.stdout.splitlines()]
    assert len(rows) == 2 and all(len(r["tokens"]) == 11 and 32 not in r["tokens"] for r in rows)


def test_lsd_distill_cli_with_prompts(setup, tmp_path):
    model_dir, prompts = setup
    args = ("distill", "--model", model_dir, "--trust-remote-code", "--prompts", prompts, "--gen-length", "8",
            "--block-length", "4", "--steps", "4", "--plus", "--samples", "4", "--batch", "4", "--iters", "2",
            "--cache-dir", str(tmp_path / "cache"))
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    path = r.stdout.strip().splitlines()[-1]
    again = run_cli(*args)
    assert again.stdout.strip().splitlines()[-1] == path and "cache hit" in again.stderr
    bad = run_cli(*args[:-2], "--steps", "3", "--cache-dir", str(tmp_path / "c2"))
    assert bad.exit_code == 1 and "student: 3 steps do not divide into 2 blocks" in bad.stderr and bad.stdout == ""
