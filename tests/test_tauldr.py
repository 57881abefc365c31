"""tauLDR images: the gaussian graph and the UNet adapter against the official code's outputs (fixture
``tauldr-tiny``, made by the official tauLDR code; tolerances from its meta.json), other configs, both
folder layouts and bad checkpoints."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from lsdtool.diffusion.gaussian import Gaussian
from lsdtool.errors import LsdError
from lsdtool.models import identify, load
from lsdtool.models.locate import file_digest
from lsdtool.models.tauldr import TauLDR, load_tauldr

from conftest import run_cli

FIX = Path(__file__).parent / "fixtures" / "tauldr-tiny"
META = json.loads((FIX / "meta.json").read_text())
TOL = META["suggested_tolerances"]
CIFAR = dict(S=256, rate_sigma=6.0, Q_sigma=512.0, time_base=3.0, time_exponential=100.0)


@pytest.fixture(scope="module")
def ref():
    return load_file(str(FIX / "reference.safetensors"))


@pytest.fixture(scope="module")
def model():
    return load(str(FIX))


@pytest.fixture(autouse=True)
def _cache(cache_dir):
    """Weight digests are remembered in a per-test cache, never the user's."""


def official_rate(S, rate_sigma, Q_sigma):
    """tauLDR's GaussianTargetRate loops, transcribed literally (float64 numpy)."""
    rate = np.zeros((S, S))
    vals = np.exp(-np.arange(0, S) ** 2 / (rate_sigma**2))
    for i in range(S):
        for j in range(S):
            if i < S // 2:
                if i < j < S - i:
                    rate[i, j] = vals[j - i - 1]
            elif i > S // 2:
                if i > j > -i + S - 1:
                    rate[i, j] = vals[i - j - 1]
    for i in range(S):
        for j in range(S):
            if rate[j, i] > 0.0:
                rate[i, j] = rate[j, i] * np.exp(-((j + 1) ** 2 - (i + 1) ** 2 + S * (i + 1) - S * (j + 1))
                                                 / (2 * Q_sigma**2))
    rate = rate - np.diag(np.diag(rate))
    return rate - np.diag(np.sum(rate, axis=1))


def probs_close(logits, ref_logits):
    """The fixture's x0 comparison: softmax probabilities, and logits where the official p > 1e-4."""
    p, pr = logits.softmax(-1), ref_logits.softmax(-1)
    assert (p - pr).abs().max() <= TOL["x0_logits"]["atol"]
    keep = pr > 1e-4
    assert (logits - ref_logits)[keep].abs().max() <= 5e-3


def rates_close(rate, ref_rate):
    atol = 1e-4 * ref_rate.abs().max()
    assert ((rate - ref_rate).abs() <= TOL["rev_rate"]["rtol"] * ref_rate.abs() + atol).all()
    rows, ref_rows = rate.sum(-1), ref_rate.sum(-1)
    assert ((rows - ref_rows).abs() <= TOL["rev_rate"]["row_sums_rtol"] * ref_rows.abs()).all()


# --- the gaussian graph -----------------------------------------------------------------------------


def test_rate_matrix_matches_official(ref):
    g = Gaussian(**CIFAR)
    R = g.rate_matrix()
    assert R.dtype == torch.float64 and R.shape == (256, 256)
    torch.testing.assert_close(R.float(), ref["rate_matrix"], rtol=TOL["rate_matrix"]["rtol"], atol=0.0)
    assert R.sum(1).abs().max() < 1e-12


@pytest.mark.parametrize("S, rate_sigma, Q_sigma", [(2, 1.0, 3.0), (7, 2.0, 4.0), (10, 1.5, 2.0), (33, 6.0, 20.0)])
def test_rate_matrix_and_transition_for_any_S(S, rate_sigma, Q_sigma):
    g = Gaussian(S, rate_sigma, Q_sigma, 3.0, 100.0)
    R = torch.from_numpy(official_rate(S, rate_sigma, Q_sigma))
    torch.testing.assert_close(g.rate_matrix(), R, rtol=1e-12, atol=1e-14)
    for t in (0.01, 0.3, 1.0):
        c = g.integral(torch.tensor(t, dtype=torch.float64))
        expm = torch.linalg.matrix_exp(c * R)
        expm = torch.where(expm < 1e-8, 0.0, expm)
        torch.testing.assert_close(g.transition(torch.tensor([t], dtype=torch.float64))[0], expm, rtol=0, atol=1e-11)
    assert g.transition(torch.tensor(0.0)).sub(torch.eye(S, dtype=torch.float64)).abs().max() < 1e-12


def test_time_change_matches_official(ref):
    g = Gaussian(**CIFAR)
    torch.testing.assert_close(g.beta(ref["t"].double()).float(), ref["rate_scalar"], rtol=1e-6, atol=0)
    torch.testing.assert_close(g.integral(ref["t"].double()).float(), ref["integral_rate_scalar"], rtol=1e-6, atol=0)


def test_transition_matches_official_including_the_zeroing(ref):
    g = Gaussian(**CIFAR)
    q = g.transition(ref["t"])  # (3, S, S) at the three fixture times
    assert q.shape == (3, 256, 256) and q.dtype == torch.float64
    zeroed = 0
    for i in range(3):
        r = ref[f"qt0_t{i}"].double()
        assert (q[i] - r).abs().max() <= TOL["qt0_t*"]["atol"]
        assert ((q[i] == 0) != (r == 0)).sum() <= 40  # near-threshold flips only
        zeroed += int((r == 0).sum())
        torch.testing.assert_close(q[i], g.transition(ref["t"][i]))  # batched = single
    assert zeroed > 20000  # the clamp is exercised: without it ~26k entries would be tiny, not 0


def test_start_distribution_and_state():
    g = Gaussian(**CIFAR)
    p = g.start_distribution()
    assert p.shape == (256,) and abs(float(p.sum()) - 1) < 1e-12
    assert int(p.argmax()) == 256 // 2 - 1  # centred one level below S // 2
    k1 = torch.arange(1, 257, dtype=torch.float64)
    torch.testing.assert_close(p[10] / p[200], torch.exp(-((k1[10] - 128) ** 2 - (k1[200] - 128) ** 2) / (2 * 512.0**2)))
    cdf = p.cumsum(0)
    u = torch.stack([torch.zeros(()), cdf[0] * 0.999, cdf[0] * 1.001, cdf[99] * 1.0001, torch.tensor(1 - 1e-16)])
    assert g.start_levels((5,), uniforms=u).tolist() == [0, 0, 1, 100, 255]
    gen = torch.Generator().manual_seed(0)
    x = g.start_levels((64, 300), generator=gen)
    assert x.shape == (64, 300) and x.dtype == torch.long and x.min() >= 0 and x.max() <= 255
    assert abs(x.double().mean() - (p * torch.arange(256)).sum()) < 2.0  # a near-uniform law: mean ~ 127.4
    small = Gaussian(8, 1.0, 1.0, 3.0, 100.0)
    counts = torch.bincount(small.start_levels((200000,), generator=gen), minlength=8).double()
    assert (counts / 200000 - small.start_distribution()).abs().max() < 5e-3
    assert g.moving(x).all() and g.vocab_size == 256 and g.mask_id is None and g.name == "gaussian"
    assert g.params == CIFAR


def test_reverse_rates_match_official(ref):
    g = Gaussian(**CIFAR)
    p0 = ref["x0_logits"].softmax(-1)
    rates_close(g.reverse_rates(p0, ref["x"], ref["t"]), ref["rev_rate"])
    rates_close(g.reverse_rates(p0.double(), ref["x"], ref["t"]).float(), ref["rev_rate"])
    # the raw-weight probabilities give other rates: the comparison can fail
    raw = g.reverse_rates(ref["x0_logits_raw"].softmax(-1), ref["x"], ref["t"])
    with pytest.raises(AssertionError):
        rates_close(raw, ref["rev_rate"])


def test_score_is_the_rate_over_beta_R(ref):
    """R_hat(x -> y) = beta(t) R[y, x] s_y; log s is 0 at x and finite-or-floored elsewhere."""
    g = Gaussian(**CIFAR)
    x, t = ref["x"], ref["t"]
    p0 = ref["x0_logits"].softmax(-1).double()
    rate = g.reverse_rates(p0, x, t)
    ls = g.log_score(p0, x, t, zero=-1e4)
    assert (ls.gather(-1, x[..., None]) == 0).all()
    fwd = g.rate_matrix().T[x] * g.beta(t.double())[:, None, None]
    off = torch.ones_like(rate, dtype=torch.bool).scatter(-1, x[..., None], False) & (fwd > 0)
    torch.testing.assert_close((fwd * ls.exp())[off], rate[off], rtol=1e-10, atol=1e-12)
    # by hand at one position
    b, d, y = 1, 17, int(x[1, 17]) + 3
    q = g.transition(t[b])
    s = sum(p0[b, d, a] * q[a, y] / (q[a, x[b, d]] + 1e-9) for a in range(256))
    assert math.isclose(float(ls[b, d, y].exp()), float(s), rel_tol=1e-10)


def test_log_score_gradient_in_t_matches_finite_differences(ref):
    g = Gaussian(**CIFAR)
    x, p0 = ref["x"][:1], ref["x0_logits"][1:2].softmax(-1).double()
    w = torch.randn(1, 192, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def f(t):
        return (g.log_score(p0, x, t) * w).sum()

    t = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)  # no entry near the 1e-8 clamp here
    f(t).backward()
    h = 1e-6
    fd = (f(t.detach() + h) - f(t.detach() - h)) / (2 * h)
    assert math.isclose(float(t.grad), float(fd), rel_tol=1e-5)


# --- the adapter --------------------------------------------------------------------------------------


def test_unet_and_x0_logits_match_official(model, ref):
    x, t = ref["x"], ref["t"]
    assert (model.vocab_size, model.seq_len, model.shape) == (256, 192, (3, 8, 8))
    assert model.noise.rate(torch.tensor(0.5)) == model.graph.beta(torch.tensor(0.5))
    assert model.graph.name == "gaussian" and model.graph.params == CIFAR and model.mask_id is None
    with torch.no_grad():
        out = model.net(x.reshape(3, 3, 8, 8), t)
        torch.testing.assert_close(out, ref["net_out"], rtol=0, atol=TOL["net_out"]["atol"])
        probs_close(model.x0_logits(x, t), ref["x0_logits"])
        lp = model.x0_log_probs(x, t)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 192))


def test_the_ema_weights_are_the_ones_used(model, ref):
    raw = load_tauldr(str(FIX), ema=False)
    with torch.no_grad():
        raw_logits = raw.x0_logits(ref["x"], ref["t"])
        probs_close(raw_logits, ref["x0_logits_raw"])
        with pytest.raises(AssertionError):
            probs_close(raw_logits, ref["x0_logits"])
        assert (raw_logits.softmax(-1) - model.x0_logits(ref["x"], ref["t"]).softmax(-1)).abs().max() > 0.1


def test_adapter_reverse_rates_and_log_score(model, ref):
    x, t = ref["x"], ref["t"]
    with torch.no_grad():
        rates_close(model.reverse_rates(x, t), ref["rev_rate"])
    tt = t.clone().requires_grad_()
    ls = model.log_score(x, tt)
    assert ls.shape == (3, 192, 256) and ls.dtype == torch.float32 and torch.isfinite(ls).all()
    assert (ls.gather(-1, x[..., None]) == 0).all()
    ls.sum().backward()
    assert torch.isfinite(tt.grad).all() and (tt.grad != 0).all()
    with torch.no_grad():
        s = model.graph.score(model.x0_log_probs(x, t).double().exp(), x, t)
    keep = s > 1e-30
    torch.testing.assert_close(ls.double().exp()[keep & (ls != 0)], s[keep & (ls != 0)], rtol=1e-5, atol=0)


def test_name_fingerprint_and_cli_listing():
    name, fp = identify(str(FIX))
    assert (name, fp) == ("tauldr-tiny", f"tauldr:sha256:{file_digest(FIX / 'ckpt_0000000001.pt')}")
    m = load(str(FIX))
    assert (m.name, m.fingerprint, m.source) == (name, fp, str(FIX.resolve()))
    res = run_cli("models", "--json")
    row = next(r for r in json.loads(res.stdout) if r["name"] == "tauldr-cifar10")
    assert row["offline"] is False and "github.com/andrew-cr/tauLDR" in row["source"]
    with pytest.raises(LsdError, match="not on the Hugging Face hub"):
        load("tauldr-cifar10")


# --- other configs and layouts ----------------------------------------------------------------------


def small_config(**model_overrides) -> dict:
    config = yaml.safe_load((FIX / "config.yaml").read_text())
    config["data"].update(S=16, shape=[1, 4, 8])
    config["model"].update(ch=8, ch_mult=[1, 1, 2], num_scales=3, num_res_blocks=2, input_channels=1,
                           scale_count_to_put_attn=0, data_min_max=[0, 15], skip_rescale=False, time_embed_dim=6,
                           rate_sigma=2.0, Q_sigma=20.0, **model_overrides)
    return config


def write_checkpoint(path: Path, net: torch.nn.Module, seed: int, prefix: str = "net.") -> list[torch.Tensor]:
    """A checkpoint as tauLDR's save_checkpoint writes it: raw net.* tensors + the EMA list; returns the EMA list."""
    gen = torch.Generator().manual_seed(seed)
    raw = {prefix + k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in net.state_dict().items()}
    shadow = [v + 0.05 * torch.randn(v.shape, generator=gen) for v in raw.values()]
    state = {**raw, "ema_decay": 0.9999, "ema_num_updates": 3, "ema_shadow_params": shadow}
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "n_iter": seed}, path)
    return shadow


def test_training_run_layout_other_config_newest_checkpoint(tmp_path):
    config = small_config(fix_logistic=True)
    run = tmp_path / "run_2024"
    (run / "config").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "config" / "config_001.yaml").write_text(yaml.safe_dump({**config, "data": {**config["data"], "S": 99}}))
    (run / "config" / "config_002.yaml").write_text(yaml.safe_dump(config))  # the newest config wins
    net = TauLDR(config, name="x", fingerprint="x").net
    old = write_checkpoint(run / "checkpoints" / "ckpt_0000000010.pt", net, 1)
    new = write_checkpoint(run / "checkpoints" / "ckpt_0000000200.pt", net, 2, prefix="net.module.")  # DDP keys
    m = load(str(run))
    assert m.name == "run_2024" and m.fingerprint.endswith(file_digest(run / "checkpoints" / "ckpt_0000000200.pt"))
    assert (m.vocab_size, m.seq_len, m.shape) == (16, 32, (1, 4, 8))
    torch.testing.assert_close(next(m.net.parameters()), new[0])
    named = load(str(run / "checkpoints" / "ckpt_0000000010.pt"))
    torch.testing.assert_close(next(named.net.parameters()), old[0])
    x = m.graph.start_levels((3, 32), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.4, 0.05])
    with torch.no_grad():
        lp, ls = m.x0_log_probs(x, t), m.log_score(x, t)
    assert lp.shape == ls.shape == (3, 32, 16)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 32))
    assert torch.isfinite(ls).all() and (ls.gather(-1, x[..., None]) == 0).all()


def test_authors_folder_layout_with_config_001(tmp_path):
    d = tmp_path / "cifar10"
    d.mkdir()
    shutil.copy(FIX / "config.yaml", d / "config_001.yaml")
    shutil.copy(FIX / "ckpt_0000000001.pt", d / "ckpt_0000000001.pt")
    run = tmp_path / "run"
    (run / "config").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    shutil.copy(FIX / "config.yaml", run / "config" / "config_001.yaml")
    shutil.copy(FIX / "ckpt_0000000001.pt", run / "checkpoints" / "ckpt_0000000001.pt")
    a, b = load(str(d)), load(str(run))
    assert a.fingerprint == b.fingerprint == load(str(FIX)).fingerprint
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)


# --- bad input: one line, nothing loaded ------------------------------------------------------------


def folder(tmp_path, ckpt_writer=None, config=None, name="bad") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.yaml").write_text(config if config is not None else (FIX / "config.yaml").read_text())
    if ckpt_writer is None:
        shutil.copy(FIX / "ckpt_0000000001.pt", d / "ckpt_0000000001.pt")
    else:
        ckpt_writer(d / "ckpt_0000000001.pt")
    return d


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_not_a_tauldr_checkpoint(tmp_path):
    d = folder(tmp_path, lambda p: torch.save({"weight": torch.zeros(3)}, p))
    with pytest.raises(LsdError) as e:
        load(str(d))
    assert "not a tauLDR checkpoint" in one_line(e)


class Payload:
    """A custom class: unpickling it means importing and running this module's code."""

    def __init__(self):
        self.note = "code"


def test_a_checkpoint_that_needs_code_is_refused(tmp_path):
    def write(p):
        torch.save({"model": {"net.w": torch.zeros(1), "ema_shadow_params": [torch.zeros(1)], "x": Payload()}}, p)

    d = folder(tmp_path, write)
    with pytest.raises(LsdError) as e:
        load(str(d))
    assert "refused" in one_line(e) and "Payload" in one_line(e)


def test_config_and_checkpoint_disagree(tmp_path):
    config = yaml.safe_load((FIX / "config.yaml").read_text())
    config["model"]["ch"] = 16
    d = folder(tmp_path, config=yaml.safe_dump(config))
    with pytest.raises(LsdError) as e:
        load(str(d))
    assert "shape" in one_line(e) and "config" in one_line(e)
    config["model"]["ch"], config["data"]["shape"] = 8, [3, 8, 7]
    with pytest.raises(LsdError) as e:
        load(str(folder(tmp_path, config=yaml.safe_dump(config), name="odd")))
    assert "not a valid tauLDR config" in one_line(e)


def test_unreadable_config(tmp_path):
    d = folder(tmp_path, config="model: [unclosed\n")
    with pytest.raises(LsdError) as e:
        load(str(d))
    assert "cannot read" in one_line(e)


def test_numpy_scalars_pickled_by_numpy_1_and_2_load(tmp_path):
    """The authors' 2022 checkpoint pickles numpy.core.multiarray.scalar (numpy 1.x); numpy 2 writes numpy._core."""
    from lsdtool.models.tauldr import read_checkpoint

    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2), "ema_decay": np.float64(0.9999)}}, buf,
               _use_new_zipfile_serialization=False)  # a plain pickle stream: its globals can be renamed in place
    data = buf.getvalue()
    assert data.count(b"numpy._core.multiarray\nscalar") == 1
    for name in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
        path = tmp_path / f"{name.decode()}.pt"
        path.write_bytes(data.replace(b"numpy._core.multiarray\nscalar", name + b"\nscalar"))
        assert float(read_checkpoint(path)["model"]["ema_decay"]) == 0.9999


def test_transp_rate_and_transition_rows():
    g = Gaussian(**CIFAR)
    x = torch.tensor([0, 5, 127, 128, 255])
    torch.testing.assert_close(g.transp_rate(x), g.rate_matrix()[:, x].T)
    sigma = torch.tensor([0.1, 1.0, 5.0, 27.0, 200.0], dtype=torch.float64)
    rows = g.transp_transition(x, sigma)
    for r in range(5):
        torch.testing.assert_close(rows[r], g.expm(sigma[r])[:, x[r]])
