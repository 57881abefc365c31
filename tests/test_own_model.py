"""Your own model: the docs page's example run as written, MODULE:FACTORY and registered names, one-line
errors, artifacts that rebuild their model, the family table, and the small API items."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lsdtool
from lsdtool.errors import LsdError
from lsdtool.models import families, load, locate, own
from lsdtool.models.countdown import CountdownModel
from lsdtool.models.countdown_id import FINGERPRINT
from lsdtool.samplers import Sampler
from conftest import run_cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "your-own-model.md"
# what keeps the distillations short; the docs' commands with these appended
FAST = ["--teacher-steps", "16"]
RECIPE = "samples = 16\nbatch = 16\niters = 3\n"


def doc_example() -> str:
    """The first fenced python block of docs/your-own-model.md, as written."""
    return re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)


def doc_commands() -> list[list[str]]:
    """The `lsd ...` lines of the first sh block, as argument lists (comments dropped)."""
    block = re.search(r"```bash\n(.*?)```", DOC.read_text(), re.S).group(1)
    return [line.split("#")[0].split()[1:] for line in block.splitlines() if line.startswith("lsd ")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """A directory holding the docs' my_model.py and a small recipe, and the docs' distill run in it."""
    home = tmp_path_factory.mktemp("own")
    (home / "my_model.py").write_text(doc_example())
    (home / "fast.toml").write_text(RECIPE)
    return home


def in_dir(monkeypatch, directory, *args):
    monkeypatch.chdir(directory)
    return run_cli(*args)


def test_the_docs_commands_distil_sample_and_compare_the_docs_model(example, tmp_path, monkeypatch):
    distill, sample, compare = doc_commands()
    assert distill == ["distill", "--model", "my_model.py:make", "--steps", "4", "--plus"]
    assert sample == ["sample", "--sampler", "ART", "-n", "4"]
    assert compare == ["compare", "--model", "my_model.py:make", "--steps", "4", "-n", "64"]
    cache = tmp_path / "cache"
    extra = [*FAST, "--recipe", "fast.toml", "--cache-dir", cache]

    r = in_dir(monkeypatch, example, *distill, *extra)
    assert r.exit_code == 0, r.output
    art = Path(r.stdout.strip().splitlines()[-1])
    assert art.is_file() and cache in art.parents
    meta = Sampler.load(art).meta
    assert meta["model_source"] == f"{example / 'my_model.py'}:make"  # absolute: found from anywhere
    assert meta["model"] == "my_model:make" and meta["plus"] == "true" and meta["graph"] == "absorb"
    assert meta["model_fingerprint"] == f"my_model:make:sha256:{digest(example / 'my_model.py')}"
    again = in_dir(monkeypatch, example, *distill, *extra)
    assert again.exit_code == 0 and again.stdout.strip().splitlines()[-1] == str(art) and "cache hit" in again.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = in_dir(monkeypatch, elsewhere, *[str(art) if a == "ART" else a for a in sample])
    assert r.exit_code == 0, r.output
    x = torch.tensor([[int(v) for v in line.split()] for line in r.stdout.splitlines()])
    assert x.shape == (4, 32) and x.min() >= 0 and x.max() <= 31  # only real tokens: every mask filled
    model, sampler = lsdtool.load_artifact(art)
    assert model.name == "my_model:make" and sampler == Sampler.load(art)
    assert torch.equal(lsdtool.sample(model, sampler, 4), x)  # the CLI's samples, through the API

    r = in_dir(monkeypatch, example, *compare, *extra, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    rows = {row["sampler"]: row for row in result["rows"]}
    assert set(rows) == {"euler", "tweedie", "lsd", "lsd+", "teacher"} and rows["lsd+"]["nfe"] == 4
    assert result["protocol"]["metric"] == "error"  # the model's task: scored by the countdown rule
    assert 0 <= rows["lsd+"]["metrics"]["error"] <= 1 and rows["lsd+"]["metrics"]["error_se"] > 0
    assert f"cache hit: {art}" in r.stderr  # compare's lsd+ row is the artifact distil made
    table = in_dir(monkeypatch, example, *compare, *extra)
    assert table.exit_code == 0 and re.search(r"│ lsd\+ +│ +\d\.\d+ ± \d\.\d+", table.stdout), table.stdout


BROKEN = textwrap.dedent('''
    import torch
    from lsdtool import DiffusionModel
    from lsdtool.diffusion import LogLinear

    class Flat(DiffusionModel):
        graph, vocab_size, seq_len, noise = "absorb", 5, 3, LogLinear()

        def log_score(self, x, t):
            return torch.zeros(*x.shape, 5)

    def good():
        return Flat()

    def raises():
        raise ValueError("no weights here\\nsecond line")

    def not_a_model():
        return object()

    def no_vocab():
        m = Flat()
        m.vocab_size = None
        return m

    def bad_graph():
        m = Flat()
        m.graph = "circle"
        return m

    def no_noise():
        m = Flat()
        m.noise = "loglinear"
        return m

    def named():
        m = Flat()
        m.name, m.fingerprint = "flat", "flat:v1"
        return m

    class NoScore(DiffusionModel):
        graph, vocab_size, seq_len, noise = "absorb", 5, 3, LogLinear()

    def no_score():
        return NoScore()
''')


@pytest.fixture
def broken(tmp_path, monkeypatch):
    (tmp_path / "broken_models.py").write_text(BROKEN)
    (tmp_path / "fails_import.py").write_text("import no_such_module_xyz\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("spec, needle", [
    ("missing.py:make", "model missing.py:make: no file missing.py"),
    ("fails_import.py:make", "model fails_import.py:make: cannot import fails_import.py (ModuleNotFoundError"),
    ("broken_models:absent", "model broken_models:absent: broken_models has no function 'absent'"),
    ("broken_models.py:raises", "model broken_models.py:raises: its factory raised ValueError: no weights here"),
    ("broken_models.py:not_a_model", "the factory returned object, not an lsdtool.DiffusionModel"),
    ("broken_models.py:no_vocab", "vocab_size is None, not an integer of at least 2"),
    ("broken_models.py:bad_graph", "graph: unknown graph 'circle'"),
    ("broken_models.py:no_noise", "noise is str, not an lsdtool.diffusion.Noise"),
    ("broken_models.py:no_score", "it does not define log_score(x, t)"),
    ("broken_models.py:", "model 'broken_models.py:': use MODULE:FACTORY"),
])
def test_a_broken_model_is_one_line_naming_it(broken, spec, needle):
    with pytest.raises(LsdError) as err:
        load(spec)
    assert needle in str(err.value) and "\n" not in str(err.value)
    r = run_cli("sample", "--model", spec, "--steps", 2, "-n", 1)
    assert r.exit_code == 1 and r.stdout == "" and needle in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr


def test_names_and_fingerprints_default_from_the_factory_or_are_kept(broken):
    good = load("broken_models.py:good")
    assert good.name == "broken_models:good" and good.source == f"{broken / 'broken_models.py'}:good"
    assert good.fingerprint == f"broken_models:good:sha256:{digest(broken / 'broken_models.py')}"
    assert load("broken_models:good").source == "broken_models:good"  # an importable module stays a module name
    named = load(f"{broken / 'broken_models.py'}:named")
    assert (named.name, named.fingerprint) == ("flat", "flat:v1")


class Tiny(CountdownModel):
    """The countdown model under another name and no fingerprint of its own."""

    name = None

    def __init__(self):
        super().__init__()
        self.fingerprint = None


def make_tiny():
    return Tiny()


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(own, "_REGISTERED", {})
    return own._REGISTERED


def test_a_registered_model_loads_distils_and_reloads_by_name(registry, tmp_path):
    lsdtool.models.register("tiny-countdown", make_tiny)
    model = lsdtool.load_model("tiny-countdown")
    assert isinstance(model, Tiny) and model.name == "tiny-countdown" and model.source == "tiny-countdown"
    assert model.fingerprint == f"tiny-countdown:sha256:{digest(Path(__file__))}"
    sampler = lsdtool.distill(model, 2, False, cache_dir=tmp_path, teacher_steps=8, samples=8, batch=8, iters=1)
    assert sampler.meta["model_source"] == "tiny-countdown"
    again, loaded = lsdtool.load_artifact(sampler.path)
    assert isinstance(again, Tiny) and loaded == Sampler.load(sampler.path)
    registry.clear()  # another process: the name is not registered there
    with pytest.raises(LsdError, match=r"made for model 'tiny-countdown', which is neither built in nor registered now") as err:
        lsdtool.load_artifact(sampler.path)
    assert "\n" not in str(err.value)
    r = run_cli("sample", "--sampler", sampler.path, "-n", 1)
    assert r.exit_code == 1 and "register it first" in r.stderr
    assert lsdtool.load_artifact(sampler.path, model_name="countdown", force=True)[0].name == "countdown"


@pytest.mark.parametrize("name, factory, needle", [
    ("countdown", make_tiny, "it is a built-in model's name"),
    ("a:b", make_tiny, "without ':'"),
    ("", make_tiny, "non-empty"),
    ("x", 3, "int is not callable"),
])
def test_register_refuses_what_it_cannot_keep(registry, name, factory, needle):
    with pytest.raises(LsdError, match=needle):
        lsdtool.models.register(name, factory)
    assert registry == {}


def test_a_factory_without_a_source_file_must_name_a_fingerprint(registry):
    exec_scope = {"Tiny": Tiny}
    exec("def make():\n    return Tiny()\n", exec_scope)
    lsdtool.models.register("sourceless", exec_scope["make"])
    with pytest.raises(LsdError, match="set model.fingerprint"):
        lsdtool.load_model("sourceless")


# ---- the family table -----------------------------------------------------------------------------

def test_the_embedded_models_go_through_the_family_table():
    found = locate.locate("countdown")
    assert found.family.name == "countdown" and found.weight_path is None and found.fingerprint == FINGERPRINT
    assert locate.identify("countdown") == ("countdown", FINGERPRINT)
    assert locate.locate("countdown-net").family.name == "sedd"
    model = load("countdown")
    assert isinstance(model, CountdownModel) and model.source == "countdown" and model.fingerprint == FINGERPRINT


def test_a_directory_of_a_code_defined_family_loads_by_its_config(tmp_path):
    shutil.copytree(locate.EMBEDDED_DIR / "countdown", tmp_path / "mine")
    model = load(str(tmp_path / "mine"))
    assert isinstance(model, CountdownModel) and model.fingerprint == FINGERPRINT and model.name == "countdown"


def test_a_new_family_is_one_row_and_one_adapter_file(tmp_path, monkeypatch):
    (tmp_path / "toy_adapter.py").write_text(textwrap.dedent('''
        from lsdtool.models.countdown import CountdownModel

        def build(config, found):
            model = CountdownModel(leak=config["leak"])
            model.name, model.fingerprint = found.name, found.fingerprint
            return model
    '''))
    row = families.Family("toy", "Toy", lambda c: c.get("model_type") == "toy", f"{tmp_path / 'toy_adapter.py'}:build",
                          weight_files=("toy.bin",))
    monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, row))
    ckpt = tmp_path / "toy-model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "toy", "leak": 0.01}')
    with pytest.raises(LsdError, match="holds neither toy.bin"):
        load(str(ckpt))
    (ckpt / "toy.bin").write_bytes(b"weights")
    model = load(str(ckpt))
    assert model.leak == 0.01 and model.name == "toy-model"
    assert model.fingerprint == f"toy:sha256:{digest(ckpt / 'toy.bin')}"
    (ckpt / "config.json").write_text('{"model_type": "other"}')
    with pytest.raises(LsdError, match="is not a SEDD, RADD, MDLM or Toy config"):
        load(str(ckpt))


def test_an_unknown_name_says_what_a_model_can_be():
    with pytest.raises(locate.UnknownModel) as err:
        load("no-such-model")
    assert "use one of countdown" in str(err.value) and "MODULE:FACTORY" in str(err.value)


def test_registry_locating_and_cache_hits_import_no_torch(tmp_path):
    code = textwrap.dedent(f'''
        import sys
        from click.testing import CliRunner
        import lsdtool.cli, lsdtool.plugins, lsdtool.models.families, lsdtool.models.own
        from lsdtool.models import identify, register
        assert identify("countdown")[0] == "countdown" and identify("countdown-net")[1].startswith("sedd:sha256:")
        register("mine", lambda: None)
        r = CliRunner().invoke(lsdtool.cli.main, ["models", "--json"])
        assert r.exit_code == 0 and "countdown-net" in r.output, r.output
        assert "torch" not in sys.modules, "torch imported"
    ''')
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "LSD_CACHE_DIR": str(tmp_path)})


# ---- small API items -------------------------------------------------------------------------------

def test_samplers_compare_by_value():
    assert Sampler.plain(8) == Sampler.plain(8)
    assert Sampler.plain(8) != Sampler.plain(4) and Sampler.plain(8) != Sampler.plain(8, base="tweedie")
    assert Sampler.plain(8) != Sampler.plain(8, denoise=True)
    assert Sampler.plain(8, base="confidence", options={"temperature": 0.5}) != Sampler.plain(8, base="confidence")
    other = Sampler.plain(8)
    other.coeffs = other.coeffs.clone()
    other.coeffs[3] = 1.5
    assert Sampler.plain(8) != other
    tagged = Sampler.plain(8)
    tagged.meta = {"model": "countdown"}
    assert tagged != Sampler.plain(8)
    moved = Sampler.plain(8)
    moved.path = Path("elsewhere.safetensors")
    assert moved == Sampler.plain(8)  # where it lives is not what it is
    assert Sampler.plain(8) != "euler"


def test_the_engine_and_the_contract_are_exported_lazily():
    from lsdtool.models.base import DiffusionModel
    from lsdtool.samplers import Step, iterate

    assert lsdtool.iterate is iterate and lsdtool.Step is Step and lsdtool.DiffusionModel is DiffusionModel
    assert {"iterate", "Step", "DiffusionModel"} <= set(dir(lsdtool)) and "DiffusionModel" in lsdtool.__all__
    code = "import sys, lsdtool; lsdtool.__version__; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
