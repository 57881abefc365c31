"""Time README command 1 after its install (distil, sample, compare) with an empty cache; write JSON.

The command is read from README.md's first code block, its set-up part (venv, pip) dropped, and run
with ``bash`` from the repository root with ``.venv/bin/lsd`` as written (so run this after the
install, on a fresh clone), in a fresh ``LSD_CACHE_DIR``. Wall time, the CPU time of the command and
its children, and the load averages before and after are recorded; so is the quick start's own
output (the comparison table) when ``--keep-output`` is given.

    python benchmarks/quickstart_time.py --json benchmarks/results/quickstart-time.json
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from render_results import emit

ROOT = Path(__file__).resolve().parent.parent
SETUP = re.compile(r"^(python3 -m venv|\.venv/bin/pip install)")


def command() -> str:
    """README command 1 without its install steps."""
    body = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    return " && ".join(p for p in body.strip().split(" && ") if not SETUP.match(p.strip()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the result here (the results-page schema)")
    ap.add_argument("--cache-dir", type=Path, help="use this (empty) cache directory and keep it")
    args = ap.parse_args(argv)
    cmd = command()
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="lsd-quickstart-"))
    env = {**os.environ, "LSD_CACHE_DIR": str(cache)}
    before, t0 = [round(x, 2) for x in os.getloadavg()], time.perf_counter()
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = [round(x, 2) for x in os.getloadavg()]
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise SystemExit(f"README command 1 failed:\n{r.stderr[-3000:]}")
    result = {"id": "quickstart-time", "title": "README command 1 (after the install), empty cache",
              "command": cmd, "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch default threads",
              "date": date.today().isoformat(), "source": "measured: written by benchmarks/quickstart_time.py",
              "summary": "Fresh clone, fresh virtual environment, empty cache; the install itself is not timed.",
              "tables": [{"columns": ["wall s", "CPU s (user + system)", "load before (1, 5, 15 min)", "load after"],
                          "rows": [[f"{wall:.1f}", f"{ru.ru_utime + ru.ru_stime:.1f}", " / ".join(map(str, before)),
                                    " / ".join(map(str, after))]]}],
              "notes": [], "stdout": r.stdout}
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
