"""The documented countdown-dllm example runs as written."""

import json
import re
import shlex
from pathlib import Path

from conftest import run_cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "diffusion-llms.md"


def test_the_countdown_dllm_example_runs_as_written():
    text = DOC.read_text()
    section = text.split("## countdown-dllm", 1)[1]
    command = re.search(r"```bash\n(lsd [^\n]+)\n```", section).group(1)
    args = shlex.split(command)[1:]
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert len(row["tokens"]) == 8 + 32 and row["tokens"][:8] == list(range(31, 23, -1))
        names = {34: "<user>", 35: "<assistant>"}  # [PAD] (33) is special and left out of the completion
        assert 32 not in row["tokens"]
        assert row["completion"].split() == [names.get(v, str(v)) for v in row["tokens"][8:] if v != 33]
