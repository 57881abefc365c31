"""A small bidirectional transformer that predicts x0 logits from a partly masked sequence (the LLaDA
layout: forward(input_ids, attention_mask) -> .logits (B, L, V), no time input, rotary positions).

Loaded by transformers as remote code (``auto_map`` in config.json); needs only torch and transformers.
``attention_mask``: None (every position sees every other), (B, L) 0/1 (keys with 0 are hidden) or
(B, 1, L, L) bool (True: the query may attend to the key; a block-causal mask for block diffusion).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


class TinyDllmConfig(PretrainedConfig):
    model_type = "tinydllm"

    def __init__(self, vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, max_position_embeddings=512, mask_token_id=None, rope_theta=10000.0,
                 **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.intermediate_size, self.max_position_embeddings = intermediate_size, max_position_embeddings
        self.mask_token_id, self.rope_theta = mask_token_id, rope_theta
        super().__init__(**kwargs)


def rotate(x, cos, sin):
    """Rotary position embedding (RoFormer eq. 34) on (B, H, L, Dh) with (L, Dh/2) angles' cos and sin."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.num_attention_heads
        self.ln1, self.ln2 = nn.LayerNorm(c.hidden_size), nn.LayerNorm(c.hidden_size)
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.out = nn.Linear(c.hidden_size, c.hidden_size)
        self.up = nn.Linear(c.hidden_size, c.intermediate_size)
        self.down = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, h, mask, cos, sin):
        b, l, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, attn_mask=mask)
        h = h + self.out(a.transpose(1, 2).reshape(b, l, d))
        return h + self.down(F.gelu(self.up(self.ln2(h))))


class TinyDllmModel(PreTrainedModel):
    config_class = TinyDllmConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.ln = nn.LayerNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=1 / math.sqrt(self.config.hidden_size))
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        b, l = input_ids.shape
        h = self.embed(input_ids)
        half = self.config.hidden_size // self.config.num_attention_heads // 2
        freq = self.config.rope_theta ** (-torch.arange(half, device=h.device, dtype=torch.float32) / half)
        angle = torch.arange(l, device=h.device, dtype=torch.float32)[:, None] * freq
        cos, sin = angle.cos().to(h.dtype), angle.sin().to(h.dtype)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()
            if mask.dim() == 2:
                mask = mask[:, None, None, :]
        for block in self.blocks:
            h = block(h, mask, cos, sin)
        return MaskedLMOutput(logits=self.lm_head(self.ln(h)))
