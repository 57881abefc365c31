"""`lsd sample` with a transformers masked diffusion LM: prompted blockwise generation, jsonl completions and
the one-line refusals (nothing written, nothing on stdout)."""

import json

import pytest

from conftest import run_cli
from dllm_tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("cli") / "m", vocab=36, mask_id=32, tokenizer=True))


def sample(model, *args):
    return run_cli("sample", "--model", model, "--trust-remote-code", *args)


def test_prompted_blockwise_jsonl_keeps_the_prompt_and_adds_the_completion(tiny, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "9 8 7 6"}\n{"prompt": "3 2"}\n')
    r = sample(tiny, "--prompts", str(prompts), "--gen-length", "8", "--block-length", "4", "--steps", "4",
               "--temperature", "0", "--format", "jsonl")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and all(len(row["tokens"]) == 12 for row in rows)
    assert rows[0]["tokens"][:4] == [9, 8, 7, 6] and rows[1]["tokens"][:4] == [33, 33, 3, 2]  # left-padded
    names = {33: "[PAD]", 34: "<user>", 35: "<assistant>"}
    for row in rows:
        assert 32 not in row["tokens"]  # every mask filled
        assert row["completion"] == " ".join(names.get(v, str(v)) for v in row["tokens"][4:] if v != 33)
    one = sample(tiny, "--prompt", "9 8 7 6", "--gen-length", "8", "--block-length", "4", "--steps", "4",
                 "--temperature", "0", "--format", "jsonl", "-n", "1")
    assert json.loads(one.stdout)["tokens"] == rows[0]["tokens"]  # padding hides from attention: the same tokens


def test_shards_merge_to_the_unsharded_file(tiny, tmp_path):
    args = ("--prompt", "5 4", "--gen-length", "8", "--block-length", "8", "--steps", "4", "-n", "5", "--format", "jsonl")
    whole = sample(tiny, *args).stdout
    for i in range(2):
        assert sample(tiny, *args, "--shard", f"{i}/2", "-o", str(tmp_path / "s.jsonl")).exit_code == 0
    merged = run_cli("merge", *sorted(str(p) for p in tmp_path.glob("s.shard-*.jsonl")))
    assert merged.exit_code == 0 and merged.stdout == whole


@pytest.mark.parametrize("args,needle", [
    (("--gen-length", "8", "--block-length", "3", "--steps", "4"), "block length 3 does not divide gen length 8"),
    (("--gen-length", "8", "--block-length", "2", "--steps", "6"), "6 steps do not divide into 4 blocks"),
    (("--prompt", " ".join(["1"] * 125), "--gen-length", "8", "--steps", "4"), "more than the context"),
    (("--prompt", "5 4", "--gen-length", "8", "--steps", "4", "--chat"), "no chat template"),
    (("--prompt", "5 4", "--steps", "4"), "need --gen-length"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needle):
    d = make_tiny(tmp_path / "m", vocab=36, mask_id=32)  # no tokenizer files: --chat has no template
    out = tmp_path / "o.jsonl"
    r = sample(str(d), *args, "--format", "jsonl", "-o", str(out)) if "1 1 1" not in " ".join(args) else \
        sample(str(make_tiny(tmp_path / "t", vocab=36, mask_id=32, tokenizer=True)), *args, "-o", str(out))
    assert r.exit_code == 1 and r.stdout == "" and not out.exists()
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_no_trust_no_mask_are_one_line(tmp_path):
    d = make_tiny(tmp_path / "m", vocab=36, mask_id=32)
    r = run_cli("sample", "--model", str(d), "--gen-length", "8", "--steps", "4")
    assert r.exit_code == 1 and r.stdout == "" and "modeling_tinydllm.py" in r.stderr and "--trust-remote-code" in r.stderr
    nomask = make_tiny(tmp_path / "n", mask_id=None)
    r = sample(str(nomask), "--gen-length", "8", "--steps", "4")
    assert r.exit_code == 1 and r.stdout == "" and "names no mask token" in r.stderr
