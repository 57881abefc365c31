"""A wheel built from a clean checkout ships the recipes, and an installed lsd distils with them."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lsdtool import cache, recipes
from lsdtool.models.countdown_id import FINGERPRINT

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import json, lsdtool
from lsdtool import cache, recipes
from lsdtool.models.countdown_id import FINGERPRINT
r = recipes.effective("countdown", None, {"steps": 8, "plus": True})
print(json.dumps({"file": lsdtool.__file__, "recipe": str(recipes.shipped("countdown", 8)),
                  "key": cache.key(FINGERPRINT, recipes.to_toml(r))}))
"""


def clean_checkout(dest: Path) -> Path:
    """The tracked files of the repository (what a fresh clone holds), or the tree without build leftovers."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        names = [n for n in files.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = None
    if not names:
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                                  "__pycache__", ".pytest_cache"))
        return dest
    for name in names:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_the_wheel_ships_the_recipes_and_finds_them_installed(tmp_path):
    pytest.importorskip("setuptools")
    src = clean_checkout(tmp_path / "src")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel, = (tmp_path / "dist").glob("lsdtool-*.whl")
    shipped = sorted(p.name for p in (REPO / "recipes").glob("*.toml"))
    with zipfile.ZipFile(wheel) as z:
        inside = sorted(Path(n).name for n in z.namelist() if n.startswith("lsdtool/recipes/") and n.endswith(".toml"))
        z.extractall(tmp_path / "site")  # a pure-Python wheel installs by unpacking it into site-packages
        names = set(z.namelist())
    assert inside == shipped and "countdown.toml" in inside
    assert {f"lsdtool/models/embedded/countdown-net/{f}" for f in ("config.json", "model.safetensors")} <= names
    digits = "lsdtool/models/embedded/digits-net/"
    assert {digits + f for f in ("config.yaml", "ckpt_0000003000.safetensors", "classifier.safetensors",
                                 "heldout.safetensors")} <= names

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    installed = json.loads(probe.stdout)
    assert installed["file"].startswith(str(tmp_path / "site"))  # the installed copy, not this checkout
    assert installed["recipe"].startswith(str(tmp_path / "site")) and installed["recipe"].endswith("countdown.toml")
    here = recipes.effective("countdown", None, {"steps": 8, "plus": True})
    assert installed["key"] == cache.key(FINGERPRINT, recipes.to_toml(here))
