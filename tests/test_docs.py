"""Every `lsd` command line in README.md and docs/*.md runs, and the docs site builds.

A fenced ``bash`` block holding an ``lsd`` command runs as one bash script (``set -euo pipefail``)
in a scratch directory shared by the blocks of its page, with a scratch cache. A ``console`` block
runs each ``$ `` line and compares what it prints (stdout and stderr) with the lines shown under it.
The line before a block may mark it: ``<!-- docs-test: skip (reason) -->`` for GPU, hub, launcher or
shell-set-up blocks (reported as skipped with the reason) and ``<!-- docs-test: slow -->`` for blocks
that distil with shipped recipes (run with ``-m slow``). Default runs cap ``-n`` at 8 samples; slow runs
use the commands as written. A ``python`` block whose first line is ``# NAME.py`` is written into the
page's directory (a metric module a later command imports).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<marker><!-- docs-test: (?P<kind>skip|slow)(?: \((?P<why>[^)]*)\))? -->\n)?"
                   r"```(?P<lang>bash|console|python)\n(?P<body>.*?)^```", re.M | re.S)
LSD = re.compile(r"(^|[\s;&|(\"'])(\.venv/bin/)?lsd(\s|$)", re.M)
INSTALL = re.compile(r"^(python3 -m venv|\.venv/bin/pip install|\.venv/bin/python -m pytest)")
N_CAP = 8


def blocks():
    """(page, index, kind, why, lang, body) of every block that runs lsd, and of the python files they use."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for i, m in enumerate(FENCE.finditer(text)):
            body, lang = m.group("body"), m.group("lang")
            if lang == "python" and not body.startswith("# ") or lang != "python" and not LSD.search(body):
                continue
            out.append((page, i, m.group("kind"), m.group("why") or "", lang, body))
    return out


def _script(body: str, cap: bool) -> str:
    """The block as a bash script: set-up commands (venv, pip, pytest) dropped, ``.venv/bin/lsd`` -> ``lsd``,
    and with ``cap`` every ``-n N`` above the cap lowered to it."""
    lines = []
    for line in body.replace("\\\n", " ").splitlines():
        parts = [p for p in line.split(" && ") if not INSTALL.match(p.strip())]
        line = " && ".join(parts).replace(".venv/bin/lsd", "lsd")
        if cap:
            line = re.sub(r"(-n )(\d+)", lambda m: m.group(1) + str(min(int(m.group(2)), N_CAP)), line)
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    env = {**os.environ, "LSD_CACHE_DIR": str(root / "cache"), "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return root, env


def _params():
    params = []
    for page, i, kind, why, lang, body in blocks():
        if lang == "python":
            continue
        marks = [pytest.mark.slow] if kind == "slow" else []
        params.append(pytest.param(page, i, kind, why, lang, body, marks=marks, id=f"{page.relative_to(ROOT)}#{i}"))
    return params


@pytest.mark.parametrize("page, i, kind, why, lang, body", _params())
def test_documented_commands_run(page, i, kind, why, lang, body, scratch, request):
    if kind == "skip":
        pytest.skip(f"marked in {page.name}: {why or 'not run here'}")
    root, env = scratch
    cwd = root / page.stem
    cwd.mkdir(exist_ok=True)
    for p, _, _, _, other, code in blocks():  # the modules the page's commands import
        if p == page and other == "python":
            (cwd / code.splitlines()[0][2:].strip()).write_text(code, encoding="utf-8")
    cap = "slow" not in request.keywords
    if lang == "bash":
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", _script(body, cap)], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, f"{page.name} block {i} failed:\n{r.stderr[-2000:]}"
        return
    for command, shown in _console(body):
        r = subprocess.run(["bash", "-c", _script(command, cap)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert (r.stdout + r.stderr).strip() == shown.strip(), f"{page.name}: {command}"


def _console(body: str):
    """(command, the output shown under it) for each ``$ `` line of a console block."""
    pairs, command, shown = [], None, []
    for line in body.splitlines():
        if line.startswith("$ "):
            if command is not None:
                pairs.append((command, "\n".join(shown)))
            command, shown = line[2:], []
        else:
            shown.append(line)
    if command is not None:
        pairs.append((command, "\n".join(shown)))
    return pairs


def test_every_page_with_commands_is_collected():
    """The collector sees the README quick start and a block on every page that shows lsd commands."""
    found = {(p.name, kind) for p, _, kind, _, lang, _ in blocks()}
    assert ("README.md", "slow") in found and ("faults.md", None) in found and ("cli.md", "skip") in found
    script = _script(next(b for p, _, _, _, _, b in blocks() if p.name == "README.md"), cap=True)
    assert script.startswith("lsd sample --sampler \"$(lsd distill") and "-n 8" in script and "pip" not in script


def test_results_page_is_rendered_from_the_json():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render_results.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_docs_site_builds_without_warnings(tmp_path):
    """mkdocs build --strict (the docs extra); skipped with the reason where it is not installed."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    r = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_readme_is_short_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 12 * 1024
    setup = [b for p, _, _, _, lang, b in blocks() if p.name == "README.md"]
    fences = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert len(fences) == 2 and fences[0] == setup[0]  # the quick start: the main job, then the tests
    test_command = fences[1].strip().split(" && ")[-1]
    assert test_command == ".venv/bin/python -m pytest -q" and test_command in (ROOT / ".ci" / "run").read_text()
