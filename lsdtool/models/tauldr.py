"""tauLDR image models (Campbell et al. 2022; the LSD paper's CIFAR-10 model; DESIGN §12).

An image is D = C·H·W ordinal positions in 0..S-1, flattened (channel, row, column). The UNet
predicts a discretised logistic over the S bins per position (log p(x0 | x_t)); the concrete score
of the ``gaussian`` graph follows from it (:meth:`Gaussian.log_score`). The weights used are the EMA
copy (``ema_shadow_params``), never the raw training weights stored beside it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from lsdtool.diffusion.gaussian import Gaussian, TimeChange
from lsdtool.errors import LsdError
from lsdtool.models.base import DiffusionModel
from lsdtool.models.ddit import NEVER, freeze, load_weights
from lsdtool.models.loading import construct, read_weights
from lsdtool.models.locate import first_line, locate_tauldr
from lsdtool.models.unet import UNet

MODEL_CLASS = "GaussianTargetRateImageX0PredEMA"


def _numpy_globals() -> list:
    """numpy's scalar and dtype globals (old and new module names): all a tauLDR checkpoint may unpickle besides tensors."""
    import numpy as np  # a dependency of transformers

    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
    kinds = getattr(np, "dtypes", None)  # numpy >= 1.25
    dtypes = [getattr(kinds, n) for n in dir(kinds) if n.endswith("DType")] if kinds is not None else []
    names = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")  # as numpy 1.x and 2.x pickle it
    return [*((scalar, n) for n in names), np.dtype, *dtypes]


def read_yaml_config(path: Path) -> dict:
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


def read_checkpoint(path: Path) -> dict:
    """The checkpoint dict via torch.load(weights_only=True), allowing only numpy scalars/dtypes; one-line LsdError."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = f"it would unpickle {m.group(1)}, which is refused" if m else first_line(e)
        raise LsdError(f"cannot load {path}: {why}") from None
    return ckpt


def ema_state(ckpt, path: Path) -> dict[str, torch.Tensor]:
    """The UNet's EMA weights {name: tensor}: the checkpoint's ``net.*`` tensors name the shadow list in order."""
    state = ckpt.get("model") if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    if not isinstance(state, dict) or "ema_shadow_params" not in state:
        raise LsdError(f"{path} is not a tauLDR checkpoint (no model state with ema_shadow_params)")
    raw = _net_tensors(state)
    shadow = state["ema_shadow_params"]
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(v, torch.Tensor) for v in shadow):
        raise LsdError(f"{path}: ema_shadow_params is not a list of tensors")
    if len(shadow) != len(raw):
        raise LsdError(f"{path}: {len(shadow)} EMA tensors for {len(raw)} network tensors")
    for (k, v), s in zip(raw.items(), shadow):
        if v.shape != s.shape:
            raise LsdError(f"{path}: EMA tensor for {k} has shape {tuple(s.shape)}, the weight {tuple(v.shape)}")
    return dict(zip(raw, shadow))


def _net_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The tensors of a model state, in order, named as UNet parameters (``net.`` and ``module.`` dropped)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and isinstance(k, str):
            k = ".".join(part for part in k.split(".") if part != "module")  # DataParallel / DDP wrappers
            out[k[len("net."):] if k.startswith("net.") else k] = v
    return out


def raw_state(ckpt) -> dict[str, torch.Tensor]:
    """The raw (non-EMA) training weights, for comparison only."""
    return _net_tensors(ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt)


class TauLDR(DiffusionModel):
    """A tauLDR ``GaussianTargetRateImageX0PredEMA``: UNet x0-predictor on the ordinal gaussian graph.

    Config keys read: data.{S, shape}; model.{name, ch, ch_mult, num_scales, num_res_blocks, input_channels,
    scale_count_to_put_attn, data_min_max, dropout, skip_rescale, time_embed_dim, time_scale_factor,
    fix_logistic, rate_sigma, Q_sigma, time_base, time_exponential}.
    """

    family = "tauldr"
    noise = None  # set per instance: the graph's time change beta(t) (gaussian.TimeChange)

    def __init__(self, config: dict, *, name: str, fingerprint: str):
        data, m = config["data"], config["model"]
        if m.get("name", MODEL_CLASS) != MODEL_CLASS:
            raise ValueError(f"model {m.get('name')!r} is not {MODEL_CLASS}")
        self.shape = tuple(int(v) for v in data["shape"])
        if len(self.shape) != 3 or int(m["input_channels"]) != self.shape[0]:
            raise ValueError(f"data.shape {list(self.shape)} is not (C, H, W) with C = model.input_channels")
        if int(m.get("num_scales", len(m["ch_mult"]))) != len(m["ch_mult"]):
            raise ValueError("model.num_scales differs from len(model.ch_mult)")
        if any(d % 2 ** (len(m["ch_mult"]) - 1) for d in self.shape[1:]):
            raise ValueError(f"H, W of {list(self.shape)} do not halve {len(m['ch_mult']) - 1} times")
        S = int(data["S"])
        self.graph = Gaussian(S, float(m["rate_sigma"]), float(m["Q_sigma"]), float(m["time_base"]),
                              float(m["time_exponential"]))
        self.noise = TimeChange(self.graph)
        self.fix_logistic = bool(m.get("fix_logistic", False))
        self.task = str(config["task"]) if config.get("task") is not None else None
        self.net = UNet(ch=int(m["ch"]), ch_mult=m["ch_mult"], num_res_blocks=int(m["num_res_blocks"]),
                        input_channels=self.shape[0], attn_scale=int(m["scale_count_to_put_attn"]),
                        data_min_max=m["data_min_max"], dropout=float(m["dropout"]),
                        skip_rescale=bool(m["skip_rescale"]), time_scale_factor=m["time_scale_factor"],
                        time_embed_dim=int(m["time_embed_dim"]))
        self.name, self.fingerprint = name, fingerprint
        self.vocab_size, self.seq_len = S, math.prod(self.shape)
        self.device = torch.device("cpu")

    def to(self, device) -> "TauLDR":
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def _times(self, t, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        return t.reshape(-1).expand(batch)

    def x0_logits(self, x: torch.Tensor, t) -> torch.Tensor:
        """Unnormalised log p(x0 | x_t): x (B, D) levels, t (B,) -> (B, D, S) float32 (tauLDR's model output)."""
        B, S = x.shape[0], self.vocab_size
        C, H, W = self.shape
        out = self.net(x.reshape(B, C, H, W), self._times(t, B).float())  # (B, 2C, H, W), time input in float32
        mu, log_scale = out[:, :C, ..., None], out[:, C:, ..., None]
        inv_scale = torch.exp(2 - log_scale)
        width = 2.0 / S
        centres = torch.linspace(-1 + width / 2, 1 - width / 2, S, device=out.device)
        left = (centres - width / 2 - mu) * inv_scale
        right = (centres + width / 2 - mu) * inv_scale
        left_logcdf, right_logcdf = F.logsigmoid(left), F.logsigmoid(right)
        logits = _log_minus_exp(right_logcdf, left_logcdf)  # log(CDF(right) - CDF(left)) per bin
        if self.fix_logistic:
            logits = torch.minimum(logits, _log_minus_exp(left_logcdf - left, right_logcdf - right))
        return logits.reshape(B, self.seq_len, S)

    def x0_log_probs(self, x: torch.Tensor, t) -> torch.Tensor:
        """log p_theta(x0 | x_t) (B, D, S) float32."""
        return torch.log_softmax(self.x0_logits(x, t), dim=-1)

    def log_score(self, x: torch.Tensor, t) -> torch.Tensor:
        """log s_y = log sum_x0 p(x0|x) q(y|x0) / (q(x|x0) + 1e-9) (B, D, S) float32, 0 at x, NEVER where s_y = 0
        (q_{t|0} is zeroed below 1e-8); differentiable in t."""
        t = self._times(t, x.shape[0])
        # p0 in float64: d log s / d log p0 is bounded by 1, but d log s / d p0 overflows float32 in the tails
        p0 = self.x0_log_probs(x, t).double().exp()
        return self.graph.log_score(p0, x, t, zero=NEVER).float()

    def reverse_rates(self, x: torch.Tensor, t) -> torch.Tensor:
        """tauLDR's reverse rates beta(t) R[y, x] s_y (B, D, S), 0 at y = x."""
        t = self._times(t, x.shape[0])
        return self.graph.reverse_rates(self.x0_log_probs(x, t).exp(), x, t)


def _log_minus_exp(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """log(e^a - e^b) for b < a as tauLDR computes it: a + log1p(-e^{b-a} + 1e-6)."""
    return a + torch.log1p(-torch.exp(b - a) + eps)


def load_tauldr(path: str, ema: bool = True) -> TauLDR:
    """A tauLDR adapter from a checkpoint folder, a training run or a named ckpt_*.pt (on CPU, frozen)."""
    return build(None, locate_tauldr(path), ema)


def build(config, found, ema: bool = True) -> TauLDR:
    """The families-table builder: the adapter of the located checkpoint (its yaml config read here)."""
    config = read_yaml_config(found.config_path)
    if found.weight_path.suffix == ".safetensors":
        if not ema:
            raise LsdError(f"{found.weight_path} holds the EMA weights only")
        state = _net_tensors(read_weights(found.weight_path))
    else:
        ckpt = read_checkpoint(found.weight_path)
        state = ema_state(ckpt, found.weight_path) if ema else raw_state(ckpt)
    model = construct(TauLDR, config, found, "tauLDR")
    load_weights(model.net, state, f"{found.weight_path} (for the config {found.config_path.name})")
    freeze(model.net)
    return model
