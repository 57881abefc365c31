"""Confidence-ordered and entropy-bounded unmasking: invariants, batch independence, artifacts, parity
with diffusers' BlockRefinementScheduler / EntropyBoundScheduler, and the countdown diversity figure."""

import math

import pytest
import torch

from lsdtool import adaptive, artifacts, metrics
from lsdtool.diffusion import Absorb, LogLinear
from lsdtool.errors import LsdError
from lsdtool.samplers import Sampler, count_schedule, iterate, sample


class ContextModel:
    """An absorbing model whose log score at position j depends on the tokens at j and j-1 (random tables)."""

    graph, name, device = "absorb", "context", torch.device("cpu")

    def __init__(self, vocab=9, length=24, seed=0):
        self.vocab_size, self.seq_len, self.noise = vocab, length, LogLinear(1e-3)
        g = torch.Generator().manual_seed(seed)
        self.own = torch.randn(vocab, length, vocab, generator=g, dtype=torch.float64)
        self.left = torch.randn(vocab, length, vocab, generator=g, dtype=torch.float64)
        self.calls = 0

    def log_score(self, x, t):
        self.calls += x.shape[0]
        prev = torch.cat([torch.full_like(x[:, :1], self.vocab_size - 1), x[:, :-1]], 1)
        pos = torch.arange(self.seq_len)
        ls = 2.0 * self.own[x, pos] + 1.5 * self.left[prev, pos] - 1.0
        return ls.scatter(-1, x[..., None], 0.0)


def model_probs(log_score):
    return torch.softmax(log_score[..., :-1].double(), -1)


def entropy(log_score):
    p = model_probs(log_score)
    return -(p * p.log()).sum(-1)


def trajectory(model, sampler, n=5, seed=3, **kw):
    with torch.no_grad():
        return list(iterate(model, sampler, torch.arange(n), seed, **kw))


# ---- invariants -------------------------------------------------------------------------------------

@pytest.mark.parametrize("score", ["probability", "margin"])
def test_confidence_commits_exactly_n_k_by_confidence_and_never_touches_unmasked(score):
    model = ContextModel()
    mask = model.vocab_size - 1
    sampler = Sampler.plain(5, "confidence", options={"score": score})
    left = count_schedule(model.noise, sampler.timesteps, torch.full((5,), model.seq_len))
    steps = trajectory(model, sampler)
    assert len(steps) == sampler.nfe == 5
    for st in steps:
        was, now = st.x == mask, st.x_next == mask
        assert torch.equal(was.sum(-1) - now.sum(-1), left[:, st.k] - left[:, st.k + 1])
        assert torch.equal(st.x_next[~was], st.x[~was])  # unmasked tokens never change
        committed = was & ~now
        p = model_probs(st.log_score)
        if score == "margin":  # every committed margin is >= every margin left masked
            top = p.topk(2, -1).values
            conf = top[..., 0] - top[..., 1]
            lo = torch.where(committed, conf, torch.inf).min(-1).values
            hi = torch.where(now, conf, -torch.inf).max(-1).values
            assert (lo >= hi).all()
        else:  # the committed tokens' probabilities
            got = p.gather(-1, st.x_next.clamp_max(mask - 1)[..., None]).squeeze(-1)
            assert (got[committed] > 0).all()
    assert (steps[-1].x_next != mask).all()


def test_confidence_keeps_the_most_confident_candidates():
    """Redraw the step's candidates with the engine's own uniforms: the committed ones are the top n_k."""
    from lsdtool.samplers import advance

    model = ContextModel(length=30)
    sampler = Sampler.plain(4, "confidence")
    index = torch.arange(4)
    for st in trajectory(model, sampler, n=4, seed=5):
        still = st.x == model.vocab_size - 1
        cand = advance(model, adaptive.candidates(1.0).candidates, st.log_score, st.x, (5, index, st.k), ~still)
        conf = model_probs(st.log_score).gather(-1, cand.clamp_max(model.vocab_size - 2)[..., None]).squeeze(-1)
        committed = still & (st.x_next != model.vocab_size - 1)
        assert torch.equal(st.x_next[committed], cand[committed])
        lo = torch.where(committed, conf, torch.inf).min(-1).values
        hi = torch.where(still & ~committed, conf, -torch.inf).max(-1).values
        assert (lo >= hi).all()


@pytest.mark.parametrize("mask_id", [None, 4])  # the mask last (canonical) and inside the vocabulary
@pytest.mark.parametrize("options", [{}, {"score": "margin"}, {"temperature": 0.7}, {"greedy": True}],
                         ids=["probability", "margin", "temperature", "greedy"])
@pytest.mark.parametrize("mode", ["score", "temperature"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scored_candidates_are_the_engine_draw_and_row_scores_to_the_bit(mask_id, options, mode, dtype):
    """The confidence step's one pass per row chunk gives the tokens advance draws with the candidate kernel
    and the figures row_scores computes, bit for bit, in either layout and for any Phi, temperature or score,
    and leaves the model's scores as they were."""
    from lsdtool.diffusion import graph_of
    from lsdtool.samplers import Run, advance

    v, b, l = 11, 3, 40
    model = ContextModel(vocab=v, length=l)
    model.graph, model.mask_id = "absorb", (v - 1 if mask_id is None else mask_id)
    graph = graph_of(model)
    sampler = Sampler(torch.linspace(1, 0, 5, dtype=torch.float64), torch.linspace(0.8, 1.3, 4, dtype=torch.float64),
                      "confidence", mode, options=options)
    index = torch.arange(7, 7 + b)
    run = Run(model, sampler, index, 9, None, False, sampler.timesteps, sampler.coeffs, graph)
    g = torch.Generator().manual_seed(3)
    log_score = torch.randn(b, l, v, generator=g, dtype=dtype) * 4
    before = log_score.clone()
    x = torch.where(torch.rand(b, l, generator=g) < 0.7, graph.mask_id, torch.randint(0, v, (b, l), generator=g))
    x = torch.where(x == graph.mask_id, x, graph.real_token(graph.real_index(x).clamp_max(v - 2)))
    open_ = (x == graph.mask_id) & (torch.rand(b, l, generator=g) < 0.8)
    full = torch.full_like(x, graph.mask_id)  # every row open: the chunks are views of the scores
    for k, (x, open_) in enumerate([(x, open_), (x, open_), (full, full == graph.mask_id), (x, open_)]):
        a, a_draw = adaptive.sharpness(run, k)
        kind = options.get("score", "probability")
        kernel = adaptive.candidates(a_draw, options.get("greedy", False)).candidates
        cand = advance(model, kernel, log_score, x, (9, index, k), ~open_)
        want = adaptive.row_scores(graph, log_score, open_, a, kind, cand)
        got_cand, got = adaptive.scored_candidates(run, k, log_score, x, open_, kind, options.get("greedy", False))
        assert torch.equal(got_cand, cand) and (got_cand[open_] != graph.mask_id).all()
        assert torch.equal(got.isnan(), ~open_) and torch.equal(got[open_], want[open_])
        assert torch.equal(log_score, before)


def test_entropy_bound_respects_the_budget_and_stops_calling_finished_samples():
    model = ContextModel(length=28)
    mask, gamma = model.vocab_size - 1, 1.5
    sampler = Sampler.plain(model.seq_len, "entropy-bound", options={"gamma": gamma})
    steps = trajectory(model, sampler, n=6)
    calls = torch.zeros(6, dtype=torch.long)
    for st in steps:
        rows = st.rows
        assert torch.equal(rows, (st.x == mask).any(-1).nonzero().squeeze(-1))  # only samples with masks call
        calls[rows] += 1
        x, x_next = st.x[rows], st.x_next[rows]
        was, now = x == mask, x_next == mask
        committed = was & ~now
        assert torch.equal(x_next[~was], x[~was])
        assert (committed.sum(-1) >= 1).all()
        h = entropy(st.log_score)
        spent = torch.where(committed, h, 0.0).sum(-1) - torch.where(committed, h, -torch.inf).max(-1).values
        assert (spent <= gamma + 1e-12).all()
        # maximal: the lowest-entropy position left masked would have broken the budget
        nxt = torch.where(now, h, torch.inf).min(-1).values
        more = torch.where(committed, h, 0.0).sum(-1)
        assert ((more > gamma - 1e-12) | torch.isinf(nxt)).all()
        assert (torch.where(committed, h, -torch.inf).max(-1).values <= nxt).all()  # lowest entropies first
    assert (steps[-1].x_next != mask).all() and calls.max() > calls.min() >= 2
    assert model.calls == int(calls.sum())


def test_entropy_bound_steps_cap_the_calls():
    model = ContextModel()
    steps = trajectory(model, Sampler.plain(3, "entropy-bound", options={"gamma": 0.0}))
    assert [st.k for st in steps] == [0, 1, 2] and all(st.rows.numel() == 5 for st in steps)
    assert steps[-1].final and (steps[-1].x_next != model.vocab_size - 1).all()
    one = trajectory(model, Sampler.plain(model.seq_len, "entropy-bound", options={"gamma": 0.0}), n=2)
    assert len(one) == model.seq_len  # gamma = 0: one position per call


def test_time_of_masked_fraction_inverts_the_grid():
    noise = LogLinear(1e-3)
    ts = torch.linspace(0.9, 1e-3, 7, dtype=torch.float64)
    alpha = -torch.expm1(-noise.total(ts))
    frac = (alpha - alpha[-1]) / (alpha[0] - alpha[-1])
    assert torch.allclose(adaptive.time_of_masked_fraction(noise, ts, frac), ts, atol=1e-12)


@pytest.mark.parametrize("base,options", [("confidence", {}), ("confidence", {"score": "margin", "temperature": 0.5}),
                                          ("entropy-bound", {"gamma": 2.0})])
def test_adaptive_rules_are_batch_independent_and_keep_fixed_tokens(base, options):
    model = ContextModel(length=20)
    sampler = Sampler.plain(6, base, options=options)
    full = sample(model, sampler, torch.arange(6), seed=11)
    halves = torch.cat([sample(model, sampler, torch.arange(0, 2), 11), sample(model, sampler, torch.arange(2, 6), 11)])
    assert torch.equal(full, halves) and not torch.equal(full, sample(model, sampler, torch.arange(6), seed=12))
    x0 = torch.full((3, 20), model.vocab_size - 1)
    x0[:, 5:9] = torch.tensor([1, 2, 3, 4])
    fixed = torch.zeros(3, 20, dtype=torch.bool)
    fixed[:, 5:9] = True
    out = sample(model, sampler, torch.arange(3), 0, x_init=x0, fixed=fixed)
    assert torch.equal(out[:, 5:9], x0[:, 5:9]) and (out < model.vocab_size - 1).all()


def test_adaptive_rules_need_an_absorbing_model_and_valid_options():
    uniform = ContextModel()
    uniform.graph = "uniform"
    for base in ("confidence", "entropy-bound"):
        with pytest.raises(ValueError, match="absorbing"):
            sample(uniform, Sampler.plain(2, base), torch.arange(2), 0)
    for base, options, needle in [("euler", {"gamma": 1.0}, "takes no option"), ("confidence", {"gamma": 1.0}, "takes no option"),
                                  ("entropy-bound", {"gamma": -1.0}, "out of range"),
                                  ("confidence", {"temperature": 0}, "out of range"),
                                  ("confidence", {"score": "top"}, "one of")]:
        with pytest.raises(ValueError, match=needle):
            Sampler.plain(3, base, options=options).check()


def test_artifacts_round_trip_the_rules_and_their_options(countdown, tmp_path):
    for base, options in [("confidence", {"score": "margin", "temperature": 0.7}), ("entropy-bound", {"gamma": 3.0})]:
        sampler = Sampler(torch.tensor([1.0, 0.6, 0.2, 1e-5], dtype=torch.float64),
                          torch.tensor([1.0, 1.3, 0.8], dtype=torch.float64), base, "score", options=options)
        path = artifacts.save(tmp_path / f"{base}.safetensors", sampler,
                              artifacts.metadata(countdown, sampler, {"steps": 3}, "", {}))
        back = Sampler.load(path, model=countdown)
        assert back.base == base and back.options == options and back.meta["base"] == base
        assert torch.equal(back.timesteps, sampler.timesteps) and torch.equal(back.coeffs, sampler.coeffs)
        index = torch.arange(4)
        assert torch.equal(sample(countdown, back, index, 2), sample(countdown, sampler, index, 2))
    from safetensors.torch import save_file

    bad = Sampler.plain(2, "entropy-bound", options={"gamma": 1.0})
    meta = {**artifacts.describe(bad), "options": '{"gamma": "wide"}'}  # a file written by something else
    save_file({"timesteps": bad.timesteps, "coeffs": bad.coeffs}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(LsdError, match="out of range"):
        artifacts.read(tmp_path / "bad.safetensors")


def test_sample_cli_takes_the_rules_and_their_options():
    from click.testing import CliRunner

    from lsdtool.cli import main

    def run(*args):
        return CliRunner().invoke(main, ["sample", "--model", "countdown", "-n", "3", "--format", "tokens", *args])

    for args in (["--steps", "4", "--base", "confidence", "--margin"], ["--steps", "8", "--base", "entropy-bound", "--gamma", "50"]):
        r = run(*args)
        assert r.exit_code == 0, r.output
        rows = [list(map(int, line.split())) for line in r.stdout.splitlines()]
        assert len(rows) == 3 and all(len(row) == 256 and max(row) < 32 for row in rows)
    r = run("--steps", "4", "--gamma", "1")
    assert r.exit_code == 1 and "takes no option" in r.output


# ---- diversity --------------------------------------------------------------------------------------

def test_position_entropy_is_zero_for_identical_samples_and_log_v_for_uniform_ones():
    assert metrics.position_entropy(torch.tensor([[3, 1, 4, 1]] * 50)) == 0.0
    x = torch.arange(8).repeat(8, 1).t()  # every position sees each of 8 tokens once
    assert metrics.position_entropy(x) == pytest.approx(math.log(8))


def test_countdown_diversity_drops_as_the_temperature_goes_to_zero(countdown):
    index = torch.arange(48)
    div = [metrics.position_entropy(sample(countdown, Sampler.plain(4, "confidence", options={"temperature": t}), index, 0))
           for t in (1.0, 0.1, 0.01)]
    assert div[0] > div[1] > div[2] and div[2] < 0.6 * div[0]  # countdown's restarts are exact ties: never 0
    model = ContextModel()  # no ties: greedy decoding collapses every sample onto one sequence
    hot, cold = (sample(model, Sampler.plain(4, "confidence", options={"temperature": t}), torch.arange(32), 0)
                 for t in (1.0, 1e-9))
    assert metrics.position_entropy(hot) > 0.3 and metrics.position_entropy(cold) == 0.0


# ---- parity with diffusers --------------------------------------------------------------------------

def needs_diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is a test-only dependency: pip install -e '.[test]'")


def test_confidence_matches_diffusers_block_refinement_greedy():
    """Greedy candidates (T -> 0) through lsd's engine and diffusers' BlockRefinementScheduler step with
    the same logits commit the same positions and tokens at every step."""
    BlockRefinementScheduler = needs_diffusers().BlockRefinementScheduler

    model = ContextModel(vocab=11, length=24)
    steps, n = 6, 4
    sched = BlockRefinementScheduler(block_length=model.seq_len, num_inference_steps=steps, threshold=2.0)
    sched.set_timesteps(steps, block_length=model.seq_len)
    sampler = Sampler.plain(steps, "confidence", options={"temperature": 1e-9})
    left = count_schedule(model.noise, sampler.timesteps, torch.full((1,), model.seq_len))[0]
    assert (left[:-1] - left[1:]).tolist() == sched.get_num_transfer_tokens(model.seq_len, steps).tolist()
    ours = trajectory(model, sampler, n=n)
    x = torch.full((n, model.seq_len), model.vocab_size - 1)
    for k, st in enumerate(ours):
        assert torch.equal(st.x, x)
        out = sched.step(st.log_score[..., :-1].float(), k, x, mask_token_id=model.vocab_size - 1, temperature=0.0)
        committed = (st.x == model.vocab_size - 1) & (st.x_next != model.vocab_size - 1)
        assert torch.equal(committed, out.transfer_index) and torch.equal(st.x_next, out.prev_sample)
        x = out.prev_sample


def test_confidence_selection_matches_diffusers_on_given_candidates():
    """Identical logits and identical (sampled) candidates: the same n_k positions are committed."""
    BlockRefinementScheduler = needs_diffusers().BlockRefinementScheduler

    g = torch.Generator().manual_seed(1)
    b, l, v = 3, 32, 17
    logits = torch.randn(b, l, v, generator=g)
    x = torch.where(torch.rand(b, l, generator=g) < 0.6, v, torch.randint(0, v, (b, l), generator=g))
    sched = BlockRefinementScheduler(block_length=l, num_inference_steps=4, threshold=2.0)
    sched.set_timesteps(4, block_length=l)
    gen = torch.Generator().manual_seed(2)
    out = sched.step(logits, 1, x, mask_token_id=v, temperature=1.0, generator=gen)
    log_score = torch.cat([logits.double(), torch.full((b, l, 1), -700.0, dtype=torch.float64)], -1)
    still = x == v
    conf = adaptive.row_scores(Absorb(v + 1), log_score, still, 1.0, "probability", out.sampled_tokens)
    assert torch.allclose(conf[still], out.sampled_probs[still].double(), atol=1e-6)
    n = torch.minimum(still.sum(-1), torch.tensor(l // 4))
    assert torch.equal(adaptive.top_n(conf, still, n), out.transfer_index)


def test_entropy_bound_matches_diffusers_entropy_bound_scheduler():
    """Per sample, diffusers' step on the block of masked positions (temperature 1) accepts exactly
    the positions lsd's entropy-bound step commits, at every step of the trajectory."""
    EntropyBoundScheduler = needs_diffusers().EntropyBoundScheduler

    model = ContextModel(vocab=13, length=20, seed=4)
    for gamma in (0.3, 4.0):
        sched = EntropyBoundScheduler(entropy_bound=gamma, t_max=1.0, t_min=1.0, num_inference_steps=model.seq_len)
        sched.set_timesteps(model.seq_len)
        for st in trajectory(model, Sampler.plain(model.seq_len, "entropy-bound", options={"gamma": gamma}), n=2):
            for r, b in enumerate(st.rows.tolist()):
                masked = (st.x[b] == model.vocab_size - 1).nonzero().squeeze(-1)
                block = st.log_score[r, masked, :-1].float()[None]
                out = sched.step(block, st.k, st.x[b, masked][None], generator=torch.Generator().manual_seed(0))
                committed = st.x_next[b, masked] != model.vocab_size - 1
                assert torch.equal(committed, out.accepted_index[0]), (gamma, st.k, b)


# ---- compare rows -----------------------------------------------------------------------------------

def test_compare_rows_report_realised_nfe_diversity_and_the_footnote():
    from lsdtool import compare

    model = ContextModel(length=32)
    model.fingerprint = "context:v0"
    res = compare.run(model, "confidence,entropy-bound", [2, 4], n=8, seed=1, tune_n=8, teacher=False,
                      evaluator=metrics.countdown_metric())
    cells = {(r.sampler, r.nfe): r for r in res.rows}
    assert set(cells) == {(s, k) for s in ("confidence", "entropy-bound") for k in (2, 4)}
    for (name, nfe), r in cells.items():
        assert r.metrics["diversity"] > 0 and r.nfe_max >= r.nfe_mean
        if name == "confidence":
            assert r.nfe_mean == r.nfe_max == nfe
        else:  # the tuned gamma is the candidate whose held-out mean NFE lies nearest the column
            d = r.details
            assert d["tuning_nfe"][f"{d['tuned_gamma']:g}"] == min(d["tuning_nfe"].values(), key=lambda m: abs(m - nfe))
    assert cells["entropy-bound", 2].nfe_mean < cells["entropy-bound", 4].nfe_mean
    assert any("do not sample the model's distribution" in note for note in res.notes)
    assert res.protocol["diversity"]["key"] == "diversity"


def test_compare_drives_confidence_with_the_distilled_grid(countdown, tmp_path):
    from lsdtool import compare

    recipe = tmp_path / "tiny.toml"
    recipe.write_text('teacher_steps = 16\nsamples = 8\nbatch = 8\ncandidates = 8\niters = 1\nseed = 0\n')
    ctx = compare.CompareSettings(countdown, 4, 1, 4, torch.device("cpu"), metrics.countdown_metric(), str(tmp_path),
                                  recipe_file=str(recipe))
    driven, info = compare.cell_sampler(ctx, "lsd+:confidence", 3, {})
    plus, _ = compare.cell_sampler(ctx, "lsd+", 3, {})
    assert driven.base == "confidence" and plus.base == "euler" and info["artifact"]
    assert torch.equal(driven.timesteps, plus.timesteps) and not torch.equal(plus.timesteps, Sampler.plain(3).timesteps)
