import json

import pytest

from conftest import run_cli


def run(*args, **kw):
    return run_cli(*args, catch_exceptions=False, **kw)


def test_jsonl_is_identical_for_any_batch_size():
    a = run("sample", "--model", "countdown", "--steps", "4", "-n", "10", "--seed", "3", "--batch-size", "6", "--format", "jsonl")
    b = run("sample", "--model", "countdown", "--steps", "4", "-n", "10", "--seed", "3", "--batch-size", "4", "--format", "jsonl")
    assert a.exit_code == 0 and a.stdout == b.stdout
    rows = [json.loads(line) for line in a.stdout.splitlines()]
    assert [r["index"] for r in rows] == list(range(10))
    assert all(len(r["tokens"]) == 256 and r["text"] == " ".join(map(str, r["tokens"])) for r in rows)
    c = run("sample", "--model", "countdown", "--steps", "4", "-n", "10", "--seed", "4", "--format", "jsonl")
    assert c.stdout != a.stdout


def test_formats_and_output_file(tmp_path):
    text = run("sample", "--model", "countdown", "--steps", "2", "-n", "2", "--format", "text")
    tokens = run("sample", "--model", "countdown", "--steps", "2", "-n", "2", "--format", "tokens")
    assert text.stdout == tokens.stdout and len(text.stdout.splitlines()) == 2
    out = tmp_path / "s.jsonl"
    r = run("sample", "--model", "countdown", "--steps", "2", "-n", "3", "--format", "jsonl", "-o", str(out))
    assert r.exit_code == 0 and r.stdout == "" and len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "countdown", "--steps", "0"],
        ["--model", "countdown", "--steps", "-3"],
        ["--model", "countdown", "--steps", "4", "-n", "-1"],
        ["--model", "no-such-model", "--steps", "4"],
        ["--model", "./no/such/dir", "--steps", "4"],
        ["--model", "countdown"],
        ["--model", "countdown", "--steps", "4", "--device", "cuda:7"],
    ],
)
def test_bad_input_is_one_line_without_traceback(args):
    r = run_cli("sample", *args)
    assert r.exit_code in (1, 2), r.output
    assert r.stdout == ""
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("Error:")
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_models_lists_countdown_as_offline():
    r = run("models", "--json")
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["countdown"]["offline"] is True and "sedd-small" in rows
