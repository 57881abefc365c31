"""countdown-net: the trained SEDD network shipped in the package, its training loss, distillation on it."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from lsdtool.cli import main
from lsdtool.diffusion.score_entropy import absorb_corrupt, absorb_loss, absorb_score_entropy
from lsdtool.models.locate import EMBEDDED_DIR, file_digest

SHIPPED = EMBEDDED_DIR / "countdown-net"
PARAMETERS = 1_035_553  # hidden 128, 4 blocks, 4 heads, cond 64 (benchmarks/train_countdown_net.py)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---- the training objective ------------------------------------------------------------------------

def test_score_entropy_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    b, l, v = 3, 5, 6
    log_score = torch.randn(b, l, v, generator=g, dtype=torch.float64)
    x0 = torch.randint(0, v - 1, (b, l), generator=g)
    x_t = torch.where(torch.rand(b, l, generator=g) < 0.5, torch.full_like(x0, v - 1), x0)
    sigma = torch.tensor([0.1, 0.9, 3.0], dtype=torch.float64)
    dsigma = torch.tensor([1.5, 2.0, 0.5], dtype=torch.float64)
    got = absorb_score_entropy(log_score, x_t, x0, sigma)
    for i in range(b):
        r = 1 / math.expm1(sigma[i].item())
        for j in range(l):
            if x_t[i, j] != v - 1:
                assert got[i, j] == 0
                continue
            s = log_score[i, j].exp()
            want = s[: v - 1].sum().item() - r * log_score[i, j, x0[i, j]].item() + r * (math.log(r) - 1)
            assert got[i, j].item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(absorb_loss(log_score, x_t, x0, sigma, dsigma), dsigma * got.sum(-1))


def test_score_entropy_is_minimised_at_the_true_score():
    """One masked position, x0 ~ p: the expected loss is minimised by s_y = p(y) / (e^sigma - 1), where,
    given x0, the loss at s = onehot(x0) / (e^sigma - 1) is exactly 0."""
    p = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    sigma = torch.tensor([0.7], dtype=torch.float64)
    r = 1 / math.expm1(0.7)
    x_t = torch.tensor([[3]])

    def expected(log_s):  # log_s (3,) over the real tokens; the mask column is never used
        ls = torch.cat([log_s, torch.zeros(1, dtype=torch.float64)])[None, None]
        return sum(p[y] * absorb_score_entropy(ls, x_t, torch.tensor([[y]]), sigma)[0, 0] for y in range(3))

    true = torch.log(r * p)
    log_s = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_s], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = expected(log_s)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(log_s.detach(), true, atol=1e-6)
    for delta in (torch.tensor([0.1, 0, 0]), torch.tensor([0, -0.2, 0.2]), torch.tensor([0.05, 0.05, 0.05])):
        assert expected(true + delta.double()) > expected(true)
    one = torch.log(torch.tensor([r, 1e-30, 1e-30], dtype=torch.float64))
    ls = torch.cat([one, torch.zeros(1, dtype=torch.float64)])[None, None]
    assert absorb_score_entropy(ls, x_t, torch.tensor([[0]]), sigma).item() == pytest.approx(0, abs=1e-12)


def test_forward_corruption_masks_at_rate_one_minus_e_to_minus_sigma():
    x0 = torch.zeros(4, 20_000, dtype=torch.long)
    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0])
    x_t = absorb_corrupt(x0, sigma, 32, torch.Generator().manual_seed(0))
    assert set(x_t.unique().tolist()) <= {0, 32}
    assert torch.allclose((x_t == 32).double().mean(-1), 1 - torch.exp(-sigma.double()), atol=0.01)


# ---- the shipped network ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def net():
    from lsdtool.models import load

    return load("countdown-net", offline=True)


def test_countdown_net_is_the_shipped_checkpoint(net):
    from lsdtool.models import availability, identify
    from lsdtool.models.sedd import SEDD

    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["task"] == "countdown" and config["graph"]["type"] == "absorb" and config["noise"]["type"] == "loglinear"
    assert isinstance(net, SEDD) and net.task == "countdown" and net.source == "countdown-net"
    assert (net.graph, net.vocab_size, net.seq_len, net.noise.name) == ("absorb", 33, 256, "loglinear")
    assert sum(p.numel() for p in net.net.parameters()) == PARAMETERS
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in net.net.parameters())
    digest = file_digest(SHIPPED / "model.safetensors")
    assert net.fingerprint == f"sedd:sha256:{digest}" == identify("countdown-net")[1]
    assert availability("countdown-net") == ("embedded", True)
    from safetensors.torch import load_file

    stored = load_file(str(SHIPPED / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in stored.values())
    assert torch.equal(net.net.blocks[0].attn_qkv.weight, stored["blocks.0.attn_qkv.weight"].float())
    assert (SHIPPED / "model.safetensors").stat().st_size < 4_000_000


def test_countdown_net_has_learnt_the_countdown_rule(net):
    """A masked slot between k and k - 2 is k - 1 with high probability; the score is scaled by about 1/(e^sigma - 1)."""
    x = torch.randint(0, 32, (1, 256), generator=torch.Generator().manual_seed(3))
    x[0, 100:110] = torch.tensor([12, 11, 10, 9, 8, 7, 6, 5, 4, 3])
    x[0, 105] = 32
    t = torch.tensor([0.3])
    with torch.no_grad():
        ls = net.log_score(x, t)
    p = torch.softmax(ls[0, 105, :32].double(), -1)
    assert p[7] > 0.9
    sigma = net.noise.total(t.double())
    # The total rate is learnt, not normalised: roughly 1/(e^sigma - 1); a wrong scale_by_sigma shift is ~14x off.
    assert 0.5 < ls[0, 105, :32].double().exp().sum().item() * math.expm1(sigma.item()) < 2
    assert ls[0, 0, x[0, 0]] == 0 and ls[0, 105, 32] == 0


def test_lsd_plus_distils_and_samples_on_countdown_net(tmp_path):
    cache = tmp_path / "cache"
    recipe = tmp_path / "small.toml"
    recipe.write_text("teacher_steps = 16\nsamples = 8\nbatch = 8\ncandidates = 8\niters = 2\nseed = 0\n")
    out = run("distill", "--model", "countdown-net", "--steps", 4, "--plus", "--recipe", recipe, "--cache-dir", cache)
    assert out.exit_code == 0, out.output
    artifact = out.stdout.strip().splitlines()[-1]
    info = json.loads(run("inspect", artifact, "--json").stdout)
    assert info["model"] == "countdown-net" and info["plus"] in (True, "true") and int(info["steps"]) == 4
    sampled = run("sample", "--sampler", artifact, "-n", 3, "--seed", 1, "--format", "tokens")
    assert sampled.exit_code == 0, sampled.output
    x = torch.tensor([[int(v) for v in line.split()] for line in sampled.stdout.splitlines()])
    assert x.shape == (3, 256) and 0 <= int(x.min()) and int(x.max()) <= 31


# ---- the training script ---------------------------------------------------------------------------

def test_training_is_deterministic_from_its_seed_and_writes_a_loadable_countdown_checkpoint(tmp_path):
    """benchmarks/train_countdown_net.py at one thread: the same seed gives the same weights bit for bit,
    another seed other weights; the output is a SEDD checkpoint directory declaring the countdown task."""
    import importlib.util
    import pathlib

    from safetensors.torch import load_file

    from lsdtool.models import load

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "train_countdown_net.py"
    spec = importlib.util.spec_from_file_location("train_countdown_net", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    threads = torch.get_num_threads()

    def run_training(seed, out):
        tiny = ["--steps", 3, "--batch", 4, "--hidden", 32, "--blocks", 1, "--heads", 2, "--cond", 16,
                "--threads", 1, "--eval-every", 0, "--warmup", 1, "--seed", seed, "--out", tmp_path / out]
        try:
            assert train.main([str(a) for a in tiny]) == 0
        finally:
            torch.set_num_threads(threads)
        return load_file(str(tmp_path / out / "model.safetensors"))

    first, again, other = run_training(5, "a"), run_training(5, "b"), run_training(6, "c")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert not torch.equal(first["blocks.0.adaLN_modulation.weight"], torch.zeros_like(first["blocks.0.adaLN_modulation.weight"]))
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["task"] == "countdown" and config["model"]["hidden_size"] == 32
    model = load(str(tmp_path / "a"), offline=True)
    assert model.task == "countdown" and model.vocab_size == 33 and model.seq_len == 256
