"""Tiny transformers masked diffusion LMs written to a directory: the shipped LLaDA-style modeling file, a
config with ``auto_map`` and random weights (a test helper, not a test module)."""

import importlib.util
import json
import shutil
from pathlib import Path

import torch

MODELING = Path(__file__).resolve().parents[1] / "lsdtool" / "models" / "embedded" / "countdown-dllm" / "modeling_tinydllm.py"
AUTO_MAP = {"AutoConfig": "modeling_tinydllm.TinyDllmConfig", "AutoModel": "modeling_tinydllm.TinyDllmModel"}


def modeling_module():
    spec = importlib.util.spec_from_file_location("modeling_tinydllm_for_tests", MODELING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tokenizer(directory) -> None:
    """countdown-dllm's word-level tokenizer (values 0..31, [MASK] 32, [PAD] 33, <user> 34, <assistant> 35)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_countdown_dllm.py"
    spec = importlib.util.spec_from_file_location("train_countdown_dllm_for_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_tokenizer(Path(directory))


def make_tiny(directory, model_type="llada", vocab=48, mask_id=17, seed=0, hidden=32, layers=2, context=128,
              mask_bias=-30.0, tokenizer=False, **extra) -> Path:
    """A random-weight model in ``directory``; the mask's logit gets ``mask_bias`` (a trained model never
    predicts the mask) unless it is None; ``mask_id=None`` writes no mask id."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mod = modeling_module()
    torch.manual_seed(seed)
    net = mod.TinyDllmModel(mod.TinyDllmConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                               num_attention_heads=4, intermediate_size=2 * hidden,
                                               max_position_embeddings=context))
    with torch.no_grad():
        for p in net.parameters():  # larger weights than the init: peaked, varied distributions
            p.add_(torch.randn_like(p) * 0.5)
        if mask_bias is not None and mask_id is not None:
            net.lm_head.bias[mask_id] = mask_bias
    net.save_pretrained(directory)
    shutil.copy(MODELING, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type=model_type, auto_map=AUTO_MAP, **extra)
    if mask_id is not None:
        config["mask_token_id"] = mask_id
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    if tokenizer:  # the countdown-dllm tokenizer: vocab 36, mask 32
        write_tokenizer(directory)
    return directory
