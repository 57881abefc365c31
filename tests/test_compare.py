"""lsd compare: rows, NFE accounting, agreement with lsd sample, cache reuse, outputs, JYS and text metrics."""

import json
import math
import sys

import pytest
import torch

from lsdtool import compare, jys
from conftest import run_cli
from lsdtool.diffusion import LogLinear
from lsdtool.metrics import countdown_errors, generative_perplexity, sequence_nll, unigram_entropy

TINY_RECIPE = 'teacher_steps = 16\nsamples = 8\nbatch = 8\ncandidates = 8\niters = 1\nseed = 0\n'


def run(*args):
    return run_cli(*args, catch_exceptions=False)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One compare run with lsd and lsd+ rows (distilled with a tiny recipe into a fresh cache)."""
    root = tmp_path_factory.mktemp("compare")
    recipe = root / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    cache = root / "cache"
    args = ["compare", "--model", "countdown", "--steps", "4", "--samplers", "euler,tweedie,lsd,lsd+", "-n", 5,
            "--seed", 7, "--teacher-steps", 16, "--recipe", recipe, "--cache-dir", cache]
    out = run(*args, "--json", "--csv", root / "rows.csv")
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    return {"args": args, "data": json.loads(out.stdout), "cache": cache, "stamps": stamps, "root": root}


def test_sampler_names_are_validated():
    assert compare.parse_samplers("euler, lsd+:paper:temperature,euler") == ["euler", "lsd+:paper:temperature"]
    for bad, needle in [("eulr", "unknown sampler"), ("euler:paper", "no ':' options"), ("lsd:fast", "unknown option"), ("", "no samplers")]:
        with pytest.raises(Exception, match=needle):
            compare.parse_samplers(bad)
    assert compare.lsd_overrides("lsd+:paper:temperature", 8, None) == {"steps": 8, "plus": True, "objective": "paper", "mode": "temperature"}
    assert compare.lsd_overrides("lsd", 4, 64) == {"steps": 4, "plus": False, "teacher_steps": 64}


def test_nfe_accounting():
    assert compare.steps_for("euler", 5) == 5
    assert compare.steps_for("theta-trapezoidal", 8) == 4
    assert compare.steps_for("jys", 16) == 16
    with pytest.raises(compare.Skip, match="2 model calls"):
        compare.steps_for("theta-trapezoidal", 5)
    with pytest.raises(compare.Skip, match="power-of-two"):
        compare.steps_for("jys", 6)


def test_rows_share_seeds_and_count_every_model_call(countdown, tmp_path):
    res = compare.run(countdown, "euler,tweedie,count,theta-trapezoidal", [2, 3, 4], n=6, seed=3, teacher_steps=8,
                      cache_dir=tmp_path)
    cells = {(r.sampler, r.nfe): r for r in res.rows}
    assert ("theta-trapezoidal", 3) not in cells and cells["theta-trapezoidal", 4].steps == 2
    assert any("NFE 3" in s["reason"] or s["nfe"] == 3 for s in res.skipped)
    assert any("tweedie ≡ euler" in note for note in res.notes)
    assert cells["teacher", 8].details["reference"] and cells["teacher", 8].steps == 8
    for (name, nfe), r in cells.items():
        assert r.nfe == nfe and r.seconds_per_sample > 0
        assert set(r.metrics) >= {"error", "error_se", "break_rate", "break_rate_se", "valid", "valid_se"}
        assert 0 <= r.metrics["error"] <= 1 and r.metrics["error_se"] >= 0
    assert cells["euler", 4].metrics == cells["tweedie", 4].metrics
    assert cells["euler", 2].metrics["error"] > cells["euler", 4].metrics["error"] > cells["teacher", 8].metrics["error"] - 0.05
    p = res.protocol
    assert p["n"] == 6 and p["seed"] == 3 and p["teacher_steps"] == 8 and p["metric"] == "error"
    assert p["tune_seed"] != 3 and "torch_version" in p and p["model_fingerprint"] == countdown.fingerprint


def tokens_of(result):
    return torch.tensor([[int(v) for v in line.split()] for line in result.stdout.splitlines()])


def test_rows_equal_lsd_sample_with_the_same_seed_and_n(first_run):
    rows = {(r["sampler"], r["nfe"]): r for r in first_run["data"]["rows"]}
    for name, nfe in [("euler", 4), ("tweedie", 4)]:
        x = tokens_of(run("sample", "--model", "countdown", "--steps", nfe, "--base", name, "-n", 5, "--seed", 7, "--format", "tokens"))
        assert rows[name, nfe]["metrics"]["error"] == pytest.approx(countdown_errors(x)["error"], abs=1e-12)
    for name in ("lsd", "lsd+"):
        art = rows[name, 4]["details"]["artifact"]
        x = tokens_of(run("sample", "--sampler", art, "-n", 5, "--seed", 7, "--format", "tokens", "--batch-size", 2))
        assert rows[name, 4]["metrics"]["error"] == pytest.approx(countdown_errors(x)["error"], abs=1e-12)
    x = tokens_of(run("sample", "--model", "countdown", "--steps", 16, "-n", 5, "--seed", 7, "--format", "tokens"))
    assert rows["teacher", 16]["metrics"]["error"] == pytest.approx(countdown_errors(x)["error"], abs=1e-12)


def test_json_csv_table_and_a_second_run_reuses_the_cache(first_run):
    data = first_run["data"]
    names = {(r["sampler"], r["nfe"]) for r in data["rows"]}
    assert names == {(s, 4) for s in ("euler", "tweedie", "lsd", "lsd+")} | {("teacher", 16)}
    assert all(set(r) >= {"sampler", "steps", "nfe", "metrics", "seconds_per_sample"} for r in data["rows"])
    assert data["protocol"]["recipe"].endswith("tiny.toml") and len(first_run["stamps"]) == 2
    again = json.loads(run(*first_run["args"], "--json").stdout)
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in data["rows"]]
    now = {p: p.stat().st_mtime_ns for p in first_run["cache"].rglob("*.safetensors")}
    assert now == first_run["stamps"]  # nothing distilled again
    assert "cached" in again["rows"][-1]["details"] and "cached" not in data["rows"][-1]["details"]
    csv = (first_run["root"] / "rows.csv").read_text().splitlines()
    assert csv[0].startswith("sampler,steps,nfe,seconds_per_sample,error,error_se") and len(csv) == 1 + len(data["rows"])
    table = run(*first_run["args"])
    assert "NFE 4" in table.stdout and "teacher (16)" in table.stdout
    assert "lsd+" in table.stdout and "±" in table.stdout and "tweedie ≡ euler" in table.stdout
    assert table.stderr.count("NFE") >= 5  # one progress line per row on stderr


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    r = run("compare", "--model", "countdown", "--steps", "2,3", "--samplers", "euler", "-n", 3, "--teacher-steps", 4,
            "--cache-dir", tmp_path, "--plot", png)
    assert r.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_is_one_line(tmp_path, monkeypatch):
    png = tmp_path / "p.png"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = run_cli("compare", "--model", "countdown", "--steps", "2", "-n", "2", "--plot", png)
    assert r.exit_code == 1 and "matplotlib" in r.stderr and "Traceback" not in r.stderr and r.stdout == ""


def test_controls_tune_on_a_held_out_seed(countdown, tmp_path, monkeypatch):
    seeds = []
    real = compare.draw

    def spy(ctx, sampler, n, seed, description=""):
        seeds.append((description.split()[0], seed))
        return real(ctx, sampler, n, seed, description)

    monkeypatch.setattr(compare, "draw", spy)
    res = compare.run(countdown, "euler-temp,power", [2], n=4, seed=5, tune_n=3, teacher=False, cache_dir=tmp_path)
    temp, power = res.rows
    assert temp.details["tuned_temperature"] in compare.TEMPERATURES and len(temp.details["tuning_scores"]) == len(compare.TEMPERATURES)
    assert power.details["tuned_rho"] in compare.RHOS
    tuning = [s for d, s in seeds if d == "tuning"]
    assert tuning and set(tuning) == {5 + compare.TUNE_SEED_OFFSET} and [s for d, s in seeds if d != "tuning"] == [5, 5]
    best = min(temp.details["tuning_scores"].values())
    assert temp.details["tuning_scores"][f"{temp.details['tuned_temperature']:g}"] == best


# ---- JYS --------------------------------------------------------------------------------------------

def test_golden_section_finds_the_minimum():
    best, values = jys.golden_section(lambda x: (x - 0.3) ** 2, 0.0, 1.0, err=1e-4)
    assert best == pytest.approx(0.3, abs=1e-3) and len(values) < 40


def test_klub_masks_are_nested_and_the_drop_is_positive(countdown):
    x0, _ = jys.clean_data(countdown, None, 8, 0)
    k = jys.Klub(countdown, x0, 0, batch_size=4)
    hi, lo = k.noised(slice(0, 8), 0.8), k.noised(slice(0, 8), 0.3)
    mask = countdown.vocab_size - 1
    assert ((lo == mask) <= (hi == mask)).all() and (hi == mask).sum() > (lo == mask).sum()
    assert k(0.9, 0.5, 0.1) > 0 and k(0.9, 0.5, 0.1) == k(0.9, 0.5, 0.1)  # common random numbers


def test_jys_schedules_are_valid_cached_and_reused(countdown, tmp_path, monkeypatch):
    found = jys.load_or_search(countdown, [1, 2, 4], cache_dir=tmp_path, n=8, src_steps=16, batch_size=8)
    for steps, (path, sampler) in found.items():
        sampler.check()
        assert path.exists() and sampler.steps == steps and sampler.base == "euler" and (sampler.coeffs == 1).all()
        grid = torch.linspace(1, 1e-5, 17, dtype=torch.float64)
        assert all(bool((grid - t).abs().min() < 1e-12) for t in sampler.timesteps)  # on the fine grid
    assert torch.equal(found[4][1].timesteps[::2], found[2][1].timesteps)  # hierarchical refinement
    monkeypatch.setattr(jys, "schedules", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = jys.load_or_search(countdown, [2, 4], cache_dir=tmp_path, n=8, src_steps=16, batch_size=8)
    assert torch.equal(again[4][1].timesteps, found[4][1].timesteps)
    with pytest.raises(Exception, match="power-of-two"):
        jys.load_or_search(countdown, [3], cache_dir=tmp_path, n=8, src_steps=16)


def test_jys_reads_token_files(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps([1, 2, 3, 4]) + "\n" + json.dumps({"tokens": [5, 6, 7, 8, 9]}) + "\n")
    assert jys.read_data(f, 4, 10).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(Exception, match="needs 6"):
        jys.read_data(f, 6, 10)


# ---- text metrics -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=11, n_positions=32)
    path = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return str(path)


def test_generative_perplexity_by_hand(tiny_lm):
    from lsdtool.metrics import load_eval_model

    lm = load_eval_model(tiny_lm)
    x = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 7, 7, 0, 1, 2]])
    nll = sequence_nll(x, lm, batch_size=1)
    assert nll.shape == (2, 5)  # L - 1 tokens, no BOS
    with torch.no_grad():
        logits = lm(input_ids=x).logits.double()
    hand = [[-torch.log_softmax(logits[b, j], -1)[x[b, j + 1]].item() for j in range(5)] for b in range(2)]
    assert torch.allclose(nll, torch.tensor(hand, dtype=torch.float64), atol=1e-5)
    m = generative_perplexity(x, lm, batch_size=2)
    assert m["gen_ppl"] == pytest.approx(math.exp(sum(map(sum, hand)) / 10), rel=1e-5)
    assert m["gen_ppl_per_sample"] == pytest.approx(sum(math.exp(sum(h) / 5) for h in hand) / 2, rel=1e-5)
    ent = [-(6 * (1 / 6) * math.log(1 / 6)), -(0.5 * math.log(0.5) + 3 * (1 / 6) * math.log(1 / 6))]
    assert m["entropy"] == pytest.approx(sum(ent) / 2) and unigram_entropy(x)[0].item() == pytest.approx(math.log(6))
    assert m["gen_ppl_se"] > 0 and m["entropy_se"] > 0
    with pytest.raises(Exception, match="vocabulary"):
        sequence_nll(torch.tensor([[1, 11]]), lm)


class TinyTextModel:
    """An absorbing 'text' model over the tiny LM's 11 tokens (+ mask)."""

    name, graph, vocab_size, seq_len, fingerprint = "tiny-text", "absorb", 12, 9, "tiny-text:v0"
    noise = LogLinear(1e-3)
    device = torch.device("cpu")

    def log_score(self, x, t):
        ls = torch.linspace(-3, 0, self.vocab_size, dtype=torch.float64).expand(*x.shape, self.vocab_size)
        return ls.scatter(-1, x[..., None], 0.0)


def test_text_rows_report_perplexity_and_entropy(tiny_lm, tmp_path):
    ev = compare.make_evaluator(TinyTextModel(), tiny_lm, "cpu")
    res = compare.run(TinyTextModel(), "euler,count", [2], n=4, seed=0, teacher_steps=4, evaluator=ev, cache_dir=tmp_path)
    assert res.protocol["eval_model"] == tiny_lm and res.protocol["eval_dtype"] == "float32"
    assert "transformers_version" in res.protocol
    for r in res.rows:
        assert {"gen_ppl", "gen_ppl_se", "gen_ppl_per_sample", "entropy", "entropy_se"} <= set(r.metrics)
        assert r.metrics["gen_ppl"] > 1 and 0 <= r.metrics["entropy"] <= math.log(9)
