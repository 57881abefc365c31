"""lsd compare --metric MODULE:FUNCTION: user metrics by hand, built-ins through the same registry, one-line errors."""

import json
import math
import shutil
import textwrap

import pytest
import torch
from click.testing import CliRunner

from lsdtool import compare
from lsdtool.cli import main
from lsdtool.errors import LsdError
from lsdtool.metrics import BUILTIN_METRICS, PerSampleMetric, countdown_errors, make_metrics

from conftest import FIXTURES

METRIC_MODULE = textwrap.dedent('''
    import torch

    def repeats(x):
        """Per sample: fraction of neighbouring tokens that are equal."""
        return (x[:, 1:] == x[:, :-1]).double().mean(-1)

    def figures(x):
        return {"zeros": (x == 0).sum(-1).tolist(), "top": x.max(-1).values}

    def broken(x):
        raise ValueError("no good\\nsecond line")

    def wrong_shape(x):
        return torch.zeros(x.shape[0], 2)
''')


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tokens_of(result):
    return torch.tensor([[int(v) for v in line.split()] for line in result.stdout.splitlines()])


def mean_se_by_hand(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, sd / math.sqrt(n)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(METRIC_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_user_metric_in_compare_matches_the_function_on_lsd_sample_output(plugin, tmp_path):
    out = run("compare", "--model", "countdown", "--samplers", "euler", "--steps", 4, "-n", 12, "--seed", 5,
              "--teacher-steps", 8, "--metric", "my_metrics:repeats", "--metric", "my_metrics:figures",
              "--metric", "countdown", "--cache-dir", tmp_path / "cache", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["protocol"]["metric"] == "repeats" and data["protocol"]["headlines"] == ["repeats", "zeros", "error"]
    euler = next(r for r in data["rows"] if r["sampler"] == "euler")["metrics"]
    x = tokens_of(run("sample", "--model", "countdown", "--steps", 4, "-n", 12, "--seed", 5, "--format", "tokens"))
    assert x.shape == (12, 256)
    rows = x.tolist()
    per_sample = {"repeats": [sum(a == b for a, b in zip(r[1:], r[:-1])) / 255 for r in rows],
                  "zeros": [r.count(0) for r in rows], "top": [max(r) for r in rows]}
    for key, values in per_sample.items():
        mean, se = mean_se_by_hand(values)
        assert euler[key] == pytest.approx(mean, rel=1e-12, abs=1e-12)
        assert euler[f"{key}_se"] == pytest.approx(se, rel=1e-9, abs=1e-12)
    assert euler["error"] == pytest.approx(countdown_errors(x)["error"], abs=1e-12)
    teacher = next(r for r in data["rows"] if r["sampler"] == "teacher")
    assert teacher["nfe"] == 8 and "repeats" in teacher["metrics"]
    table = run("compare", "--model", "countdown", "--samplers", "euler", "--steps", 4, "-n", 12, "--seed", 5,
                "--teacher-steps", 8, "--metric", "my_metrics:repeats", "--metric", "countdown",
                "--cache-dir", tmp_path / "cache")
    assert table.exit_code == 0 and "repeats ± s.e." in table.stdout and "\nerror " not in table.stdout
    assert f"{euler['repeats']:.3f}"[:4] in table.stdout and "error" in table.stdout


def test_a_metric_file_path_and_the_api_function_form(plugin, tmp_path, countdown):
    res = compare.run(countdown, "euler", [4], n=6, seed=1, teacher=False, cache_dir=tmp_path / "c",
                      metric=f"{plugin / 'my_metrics.py'}:repeats")
    via_api = compare.run(countdown, "euler", [4], n=6, seed=1, teacher=False, cache_dir=tmp_path / "c",
                          metric=lambda x: (x[:, 1:] == x[:, :-1]).double().mean(-1))
    assert res.rows[0].metrics["repeats"] == via_api.rows[0].metrics["<lambda>"]
    assert res.protocol["eval_model"].endswith("my_metrics.py:repeats")


@pytest.mark.parametrize("spec, needle", [
    ("my_metrics:broken", "metric my_metrics:broken failed on samples of shape (6, 256): ValueError: no good"),
    ("my_metrics:wrong_shape", "metric my_metrics:wrong_shape returned shape (6, 2) for 'wrong_shape'; expected (6,)"),
    ("my_metrics:absent", "metric my_metrics:absent: my_metrics has no function 'absent'"),
    ("no_such_module_xyz:f", "metric no_such_module_xyz:f: cannot import no_such_module_xyz (ModuleNotFoundError"),
    ("nonsense", "unknown metric 'nonsense': use countdown, gen-ppl, fid, kid, fd-digits, kid-digits or MODULE:FUNCTION"),
])
def test_a_broken_metric_is_one_line_naming_it(plugin, tmp_path, spec, needle):
    out = run("compare", "--model", "countdown", "--samplers", "euler", "--steps", 2, "-n", 6, "--no-teacher",
              "--metric", spec, "--cache-dir", tmp_path / "cache")
    assert out.exit_code == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and needle in lines[-1], out.stderr
    assert not any("Traceback" in line for line in lines)


def test_builtins_are_registered_like_user_metrics(countdown):
    assert set(BUILTIN_METRICS) == {"countdown", "gen-ppl", "fid", "kid", "fd-digits", "kid-digits"}
    m = make_metrics("countdown", model=countdown, device="cpu")
    assert isinstance(m, PerSampleMetric) and m.primary == "error"
    x = torch.tensor([[3, 2, 1, 0, 5, 9], [1, 0, 2, 1, 0, 0]])
    assert m(x)["error"] == pytest.approx(countdown_errors(x)["error"])
    with pytest.raises(LsdError, match="both report"):
        make_metrics(["countdown", "countdown"], model=countdown, device="cpu")(x)


def test_the_countdown_metric_follows_the_task_in_the_config(tmp_path):
    """Any checkpoint directory whose config declares the countdown task is scored by the countdown rule."""
    ckpt = tmp_path / "my-countdown-model"
    shutil.copytree(f"{FIXTURES}/sedd-tiny-absorb", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["task"] = "countdown"
    (ckpt / "config.json").write_text(json.dumps(config))
    out = run("compare", "--model", ckpt, "--samplers", "euler", "--steps", 2, "-n", 4, "--teacher-steps", 4,
              "--cache-dir", tmp_path / "cache", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["protocol"]["metric"] == "error" and data["protocol"]["eval_model"] == "countdown-rule"
    assert {"error", "break_rate", "valid"} <= set(data["rows"][0]["metrics"])
    del config["task"]
    (ckpt / "config.json").write_text(json.dumps(config))
    from lsdtool.models import load

    model = load(str(ckpt))
    assert model.task is None
    with pytest.raises(LsdError, match="gpt2-large"):  # without the task: generative perplexity (offline here)
        compare.make_evaluator(model, None, "cpu", local_files_only=True)
