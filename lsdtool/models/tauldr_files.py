"""Finding a tauLDR checkpoint and its config without loading it (torch-free; DESIGN §12).

Two layouts: the authors' published folder (``config_001.yaml`` or ``config.yaml`` beside
``ckpt_*.pt``) and a training run (``config/config_NNN.yaml``, ``checkpoints/ckpt_*.pt``). The newest
config and checkpoint are used unless a checkpoint file is named. The fingerprint is a digest of the
checkpoint file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lsdtool.errors import LsdError
from lsdtool.models.locate import first_line, weight_digest

FAMILY = "tauldr"
HOW_TO_GET = ("not on the Hugging Face hub: download the authors' CIFAR-10 folder (ckpt_*.pt + config yaml) "
              "from the link in the readme of github.com/andrew-cr/tauLDR, then pass --model DIR")


@dataclass
class TauLDRFiles:
    name: str
    config_path: Path
    checkpoint_path: Path
    fingerprint: str


def _newest(directory: Path, pattern: str) -> Path | None:
    found = sorted(p for p in directory.glob(pattern) if p.is_file())
    return found[-1] if found else None  # names are zero-padded counters (ckpt_0001999999.pt, config_002.yaml)


def _config_in(directory: Path) -> Path | None:
    for d in (directory, directory / "config"):
        found = _newest(d, "config_*.yaml") or (d / "config.yaml" if (d / "config.yaml").is_file() else None)
        if found is not None:
            return found
    return None


def _checkpoint_in(directory: Path) -> Path | None:
    return _newest(directory, "ckpt_*.pt") or _newest(directory / "checkpoints", "ckpt_*.pt")


def find(path: str) -> tuple[Path, Path] | None:
    """(config, checkpoint) when ``path`` is a tauLDR folder or a checkpoint file beside its config, else None."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".pt":
        config = _config_in(p.parent) or _config_in(p.parent.parent)
        return (config, p) if config is not None else None
    if not p.is_dir():
        return None
    config, ckpt = _config_in(p), _checkpoint_in(p)
    return (config, ckpt) if config is not None and ckpt is not None else None


def locate(path: str) -> TauLDRFiles:
    """The files, name and fingerprint of a tauLDR checkpoint at ``path``; LsdError if there is none."""
    found = find(path)
    if found is None:
        raise LsdError(f"{path} holds no tauLDR checkpoint (a config yaml with ckpt_*.pt, or config/ and checkpoints/)")
    config, ckpt = found
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return TauLDRFiles(run.resolve().name, config, ckpt, f"{FAMILY}:sha256:{weight_digest(ckpt)}")


def read_config(path: Path) -> dict:
    """The training config (yaml.safe_load; tuples read as lists); LsdError naming the file otherwise."""
    import yaml  # PyYAML, a dependency of huggingface_hub

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))
    try:
        config = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, yaml.YAMLError) as e:
        raise LsdError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not isinstance(
            config.get("data"), dict):
        raise LsdError(f"{path} is not a tauLDR config (no model and data sections)")
    return config
