"""Transformers masked diffusion LMs: the trust gate, the mask id, the family quirks, and token-exact parity
of the block sampler with LLaDA's generate() (re-implemented below from its published algorithm)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dllm_tiny import make_tiny
from lsdtool import api, rng
from lsdtool.errors import LsdError
from lsdtool.samplers import Sampler, iterate, sample

MASK = 17


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("dllm") / "llada")


@pytest.fixture(scope="module")
def model(tiny):
    return api.load_model(str(tiny), trust_remote_code=True)


# ---- LLaDA's generate(), written from its published algorithm (GSAI-ML/LLaDA generate.py) -----------------------


def get_num_transfer_tokens(mask_index, steps):
    """Tokens per step: masks // steps each, one more on the first masks % steps steps."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        out[i, : remainder[i]] += 1
    return out


@torch.no_grad()
def llada_generate(net, prompt, steps, gen_length, block_length, cfg_scale=0.0, remasking="low_confidence",
                   mask_id=MASK, random_confidence=None):
    """Temperature 0 (argmax candidates); ``random_confidence(x)`` (B, L) replaces torch.rand for ``random``."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        lo = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, lo : lo + block_length] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits = net(torch.cat([x, un_x], dim=0)).logits
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = net(x).logits
            x0 = torch.argmax(logits, dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            else:
                x0_p = random_confidence(x)
            x0_p[:, lo + block_length :] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


def ours(model, prompt, steps, gen_length, block_length, cfg=0.0, remasking="low_confidence", seed=0):
    base = "confidence" if remasking == "low_confidence" else "count"
    options = {"greedy": True, "gen_length": gen_length, "block_length": block_length}
    if cfg:
        options["cfg"] = cfg
    sampler = Sampler.plain(steps, base, options=options)
    sampler.check()
    b, p = prompt.shape
    model.seq_len = p + gen_length
    x = torch.full((b, p + gen_length), MASK)
    x[:, :p] = prompt
    fixed = torch.zeros_like(x, dtype=torch.bool)
    fixed[:, :p] = True
    return sample(model, sampler, torch.arange(b), seed, x_init=x, fixed=fixed)


PROMPT = torch.tensor([[3, 9, 1, 30, 4, 22], [5, 5, 40, 2, 11, 7], [0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize("block_length,steps", [(16, 16), (8, 8), (4, 16), (2, 8)])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_block_sampler_gives_llada_generate_tokens_at_temperature_0(model, block_length, steps, remasking):
    seed = 3
    order = rng.uniforms(seed, rng.STREAM_ORDER, torch.arange(3), 0, PROMPT.shape[1] + 16)  # the count rule's order
    want = llada_generate(model.net, PROMPT, steps, 16, block_length, remasking=remasking,
                          random_confidence=lambda x: -order.clone())
    got = ours(model, PROMPT, steps, 16, block_length, remasking=remasking, seed=seed)
    assert (got != MASK).all()
    assert torch.equal(got, want)


@pytest.mark.parametrize("cfg", [0.5, 2.0])
def test_classifier_free_guidance_gives_llada_generate_tokens(model, cfg):
    want = llada_generate(model.net, PROMPT, 8, 16, 8, cfg_scale=cfg)
    assert torch.equal(ours(model, PROMPT, 8, 16, 8, cfg=cfg), want)
    assert not torch.equal(want, llada_generate(model.net, PROMPT, 8, 16, 8))  # guidance changed the tokens


def test_a_model_that_ships_code_needs_trust_and_nothing_is_imported(tiny):
    import sys

    before = {m for m in sys.modules if "modeling_tinydllm" in m}
    with pytest.raises(LsdError, match=r"modeling_tinydllm\.py.*--trust-remote-code"):
        api.load_model(str(tiny))
    assert {m for m in sys.modules if "modeling_tinydllm" in m} == before


def test_a_model_without_a_mask_token_is_refused(tmp_path):
    d = make_tiny(tmp_path / "nomask", mask_id=None)
    with pytest.raises(LsdError, match="names no mask token"):
        api.load_model(str(d), trust_remote_code=True)


def test_the_mask_id_comes_from_the_config_and_need_not_be_last(model):
    assert model.mask_id == MASK and model.vocab_size == 48 and model.graph.mask_id == MASK


def _raw_log_probs(net, x):
    logits = net(x).logits.float()
    real = torch.cat([logits[..., :MASK], logits[..., MASK + 1 :]], -1)
    return real.log_softmax(-1)


def test_llada_reads_its_logits_in_place_and_dream_shifts_them_by_one(tmp_path, model):
    dream = api.load_model(str(make_tiny(tmp_path / "dream", model_type="Dream")), trust_remote_code=True)
    assert dream.quirk.shift and not model.quirk.shift
    x = torch.tensor([[3, MASK, MASK, 8, MASK, MASK, 1, MASK]])
    t = torch.tensor([0.4])
    raw = _raw_log_probs(dream.net, x)
    got = dream.x0_log_probs(x, t)
    assert torch.allclose(got[:, 1:], raw[:, :-1], atol=1e-5) and torch.allclose(got[:, 0], raw[:, 0], atol=1e-5)
    assert torch.allclose(model.x0_log_probs(x, t), _raw_log_probs(model.net, x), atol=1e-5)
    ls = dream.log_score(x, t)  # the in-place score: log p - log(e^sigma - 1) at masks, 0 at known tokens
    sigma = dream.noise.total(t.double())
    real = torch.cat([ls[..., :MASK], ls[..., MASK + 1 :]], -1)
    assert torch.allclose(real[0, 1], raw[0, 0] - torch.log(torch.expm1(sigma)).float(), atol=1e-4)
    assert ls[0, 0, 3] == 0 and ls[0, 3, 8] == 0


def test_llada2_attends_block_causally(tmp_path):
    m = api.load_model(str(make_tiny(tmp_path / "l2", model_type="llada2_moe")), trust_remote_code=True)
    m.configure({"gen_length": 8, "block_length": 4})
    x = torch.tensor([[3, 9, 1, 30, MASK, MASK, MASK, MASK, MASK, MASK, MASK, MASK]])  # prompt 4, blocks [4, 8), [8, 12)
    mask = m.attention(x)[0, 0].bool()
    blocks = torch.tensor([-1] * 4 + [0] * 4 + [1] * 4)
    assert torch.equal(mask, blocks[None, :] <= blocks[:, None])
    later = x.clone()
    later[0, 9] = 5  # a token in the last block
    a, b = m.x0_log_probs(x, torch.tensor([0.5])), m.x0_log_probs(later, torch.tensor([0.5]))
    assert torch.allclose(a[:, :8], b[:, :8]) and not torch.allclose(a[:, 8:], b[:, 8:])
    assert m.attention(x).dtype == next(m.net.parameters()).dtype


def test_bad_block_settings_are_one_line_each():
    for options, steps, needle in [({"gen_length": 16, "block_length": 5}, 16, "does not divide"),
                                   ({"gen_length": 16, "block_length": 4}, 6, "do not divide into 4 blocks")]:
        with pytest.raises(ValueError, match=needle):
            Sampler.plain(steps, "confidence", options=options).check()
