"""Loading checkpoints: the Hugging Face cache (offline), local directories, and broken files."""

from __future__ import annotations

import pickle
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lsdtool.diffusion import LogLinear
from lsdtool.errors import LsdError
from lsdtool.models import REGISTRY, availability, load
from lsdtool.models import pretrained
from lsdtool.models.locate import cached_locally
from lsdtool.models.pretrained import PretrainedModel

FIXTURES = Path(__file__).parent / "fixtures"
SHA = "0123456789abcdef0123456789abcdef01234567"
WEIGHTS = {"sedd-tiny-absorb": "pytorch_model.bin", "sedd-tiny-uniform": "pytorch_model.bin",
           "radd-tiny": "model.safetensors", "mdlm-tiny": "model.safetensors"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache; returns it."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_repo(cache: Path, repo_id: str, fixture: str, sha: str = SHA) -> Path:
    """Put a fixture into the cache layout models--owner--name/{refs/main, snapshots/<sha>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for fn in ("config.json", WEIGHTS[fixture]):
        shutil.copy(FIXTURES / fixture / fn, snapshot / fn)
    return snapshot


def local_copy(tmp_path: Path, fixture: str) -> Path:
    directory = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, directory)
    return directory


def log_score(model, fixture: str) -> torch.Tensor:
    x = load_file(str(FIXTURES / fixture / "reference.safetensors"))["x"]
    with torch.no_grad():
        return model.log_score(x, torch.tensor([1.0, 0.7, 0.3, 0.08]))


@pytest.mark.parametrize("fixture", list(WEIGHTS))
def test_hub_id_loads_offline_with_revision_in_fingerprint(hub, fixture):
    cache_repo(hub, f"someone/{fixture}", fixture)
    model = load(f"someone/{fixture}")
    assert model.fingerprint == f"hub:someone/{fixture}@{SHA}"
    assert model.name == f"someone/{fixture}"
    assert torch.equal(log_score(model, fixture), log_score(load(str(FIXTURES / fixture)), fixture))


def test_registry_name_loads_offline_from_cache(hub):
    cache_repo(hub, REGISTRY["sedd-small"], "sedd-tiny-absorb")
    model = load("sedd-small")
    assert model.name == "sedd-small"
    assert model.fingerprint == f"hub:{REGISTRY['sedd-small']}@{SHA}"
    assert availability("sedd-small") == (REGISTRY["sedd-small"], True)
    assert availability("sedd-medium") == (REGISTRY["sedd-medium"], False)


def test_hf_home_is_respected(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    cache_repo(tmp_path / "home" / "hub", "someone/radd", "radd-tiny")
    assert load("someone/radd", offline=True).fingerprint == f"hub:someone/radd@{SHA}"


def test_missing_repo_offline_says_what_to_download(hub):
    with pytest.raises(LsdError) as err:
        load("louaaron/sedd-medium")
    message = str(err.value)
    assert "louaaron/sedd-medium" in message and "download" in message and str(hub) in message
    assert "\n" not in message


def test_offline_argument_wins_over_environment(hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(LsdError, match="not in the Hugging Face cache"):
        load("nobody/nothing", offline=True)


def test_snapshot_without_weights_is_not_cached(hub):
    snapshot = cache_repo(hub, "someone/partial", "sedd-tiny-absorb")
    (snapshot / "pytorch_model.bin").unlink()
    assert not cached_locally("someone/partial")
    with pytest.raises(LsdError, match="not in the Hugging Face cache"):
        load("someone/partial")


def test_cached_locally(hub):
    assert not cached_locally("someone/sedd")
    cache_repo(hub, "someone/sedd", "sedd-tiny-absorb")
    assert cached_locally("someone/sedd")


@pytest.mark.parametrize("path", ["/nonexistent/model", "./no-such-model", "~/no-such-model-dir", "a/b/c"])
def test_nonexistent_directory(path):
    with pytest.raises(LsdError, match="does not exist"):
        load(path)


def test_file_instead_of_directory():
    with pytest.raises(LsdError, match="not a directory"):
        load(str(FIXTURES / "radd-tiny" / "config.json"))


def test_directory_without_config(tmp_path):
    directory = local_copy(tmp_path, "radd-tiny")
    (directory / "config.json").unlink()
    with pytest.raises(LsdError, match="no config.json"):
        load(str(directory))


def test_directory_without_weights(tmp_path):
    directory = local_copy(tmp_path, "radd-tiny")
    (directory / "model.safetensors").unlink()
    with pytest.raises(LsdError, match="holds neither"):
        load(str(directory))


def test_unknown_config(tmp_path):
    directory = local_copy(tmp_path, "radd-tiny")
    (directory / "config.json").write_text('{"hello": 1}')
    with pytest.raises(LsdError, match="not a SEDD, RADD or MDLM config"):
        load(str(directory))


def test_config_missing_a_key(tmp_path):
    directory = local_copy(tmp_path, "sedd-tiny-absorb")
    config = '{"tokens": 64, "graph": {"type": "absorb"}, "noise": {"type": "loglinear"}}'
    (directory / "config.json").write_text(config)
    with pytest.raises(LsdError, match="missing key 'model'"):
        load(str(directory))


@pytest.mark.parametrize("fixture", ["sedd-tiny-absorb", "radd-tiny"])
def test_truncated_weights(tmp_path, fixture):
    directory = local_copy(tmp_path, fixture)
    weights = directory / WEIGHTS[fixture]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LsdError) as err:
        load(str(directory))
    assert str(weights) in str(err.value) and "\n" not in str(err.value)


def edit_sedd_weights(tmp_path: Path, edit) -> Path:
    directory = local_copy(tmp_path, "sedd-tiny-absorb")
    weights = directory / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    edit(state)
    torch.save(state, weights)
    return directory


def test_extra_key(tmp_path):
    directory = edit_sedd_weights(tmp_path, lambda s: s.update({"blocks.9.norm1.weight": torch.ones(64)}))
    with pytest.raises(LsdError, match=r"pytorch_model.bin has unexpected weights blocks.9.norm1.weight"):
        load(str(directory))


def test_missing_key(tmp_path):
    directory = edit_sedd_weights(tmp_path, lambda s: s.pop("blocks.1.attn_out.weight"))
    with pytest.raises(LsdError, match=r"pytorch_model.bin lacks weights blocks.1.attn_out.weight"):
        load(str(directory))


def test_shape_mismatch(tmp_path):
    directory = edit_sedd_weights(tmp_path, lambda s: s.update({"output_layer.linear.bias": torch.zeros(66)}))
    with pytest.raises(LsdError, match=r"output_layer.linear.bias has shape \(66,\), expected \(65,\)"):
        load(str(directory))


def test_rotary_buffer_is_optional(tmp_path):
    directory = edit_sedd_weights(tmp_path, lambda s: s.pop("rotary_emb.inv_freq"))
    model = load(str(directory))
    assert torch.equal(log_score(model, "sedd-tiny-absorb"), log_score(load(str(FIXTURES / "sedd-tiny-absorb")),
                                                                        "sedd-tiny-absorb"))


class Payload:
    """Not a tensor: a weights-only load must refuse it."""


@pytest.mark.parametrize("payload", [{"vocab_embed.embedding": Payload()}, {"vocab_embed.embedding": "text"}])
def test_pickle_with_foreign_objects_is_refused(tmp_path, payload):
    directory = local_copy(tmp_path, "sedd-tiny-absorb")
    torch.save(payload, directory / "pytorch_model.bin", pickle_module=pickle)
    with pytest.raises(LsdError, match="pytorch_model.bin"):
        load(str(directory))


def test_local_sedd_directory_may_hold_safetensors(tmp_path):
    directory = local_copy(tmp_path, "sedd-tiny-absorb")
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    save_file(state, directory / "model.safetensors")
    (directory / "pytorch_model.bin").unlink()
    model = load(str(directory))
    assert torch.equal(log_score(model, "sedd-tiny-absorb"), log_score(load(str(FIXTURES / "sedd-tiny-absorb")),
                                                                        "sedd-tiny-absorb"))


def test_fingerprint_follows_the_weight_bytes(tmp_path):
    directory = edit_sedd_weights(tmp_path, lambda s: s["output_layer.linear.bias"].add_(1.0))
    original = load(str(FIXTURES / "sedd-tiny-absorb"))
    assert load(str(directory)).fingerprint != original.fingerprint
    assert load(str(FIXTURES / "sedd-tiny-absorb")).fingerprint == original.fingerprint


# --- text -----------------------------------------------------------------------------------------


def gpt2_sized_model() -> PretrainedModel:
    return PretrainedModel(torch.nn.Identity(), name="toy", fingerprint="toy", graph="absorb", vocab_size=50258,
                           seq_len=4, noise=LogLinear())


def fake_transformers(monkeypatch, tokenizer) -> None:
    def from_pretrained(name, local_files_only=False):
        assert name == "gpt2" and local_files_only
        if tokenizer is None:
            raise OSError("not cached")
        return tokenizer

    module = types.SimpleNamespace(AutoTokenizer=types.SimpleNamespace(from_pretrained=from_pretrained))
    monkeypatch.setitem(sys.modules, "transformers", module)
    monkeypatch.setattr(pretrained, "_tokenizer_state", {})


def test_decode_marks_mask_and_foreign_ids(monkeypatch):
    tokenizer = types.SimpleNamespace(decode=lambda ids: "".join(f"<{i}>" for i in ids),
                                      encode=lambda text: [ord(c) for c in text])
    fake_transformers(monkeypatch, tokenizer)
    model = gpt2_sized_model()
    assert model.has_tokenizer
    assert model.decode(torch.tensor([1, 2, 50257, 3, 70000])) == "<1><2>[MASK]<3>[UNK]"
    assert model.encode("ab") == [97, 98]


def test_missing_tokenizer_warns_once(monkeypatch, capsys):
    fake_transformers(monkeypatch, None)
    model = gpt2_sized_model()
    assert model.decode([1, 2]) is None
    assert not model.has_tokenizer
    assert model.decode([3]) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer" in err and "token ids" in err
    with pytest.raises(ValueError):
        model.encode("hello")
