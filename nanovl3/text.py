"""
Qwen2 / Qwen2.5 decoder: the language model of InternVL3-1B/2B/8B/14B/38B/78B (InternVL3 §2.1),
and Qwen3, that of the dense InternVL3.5 models (arXiv 2508.18265 §2.1; Qwen3 arXiv 2505.09388 §2).

RMSNorm, RoPE evaluated at *float* positions, grouped-query attention, SwiGLU MLP. Qwen2 has a
qkv bias; Qwen3 has none, RMSNorms q and k per head before RoPE (q_norm, k_norm) and an explicit
head_dim (heads * head_dim may differ from the hidden size).
Float positions make V2PE a change of position ids only (InternVL3 §2.1, arXiv 2504.10479): visual
tokens may advance the position by δ < 1, text tokens by 1; δ = 1 is ordinary RoPE.

Names equal the released checkpoint's (`language_model.model.layers.{i}.self_attn.q_proj`, ...).
Shapes: B batch, T tokens, C hidden size, H query heads, KV key/value heads, D head dim, S slots."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovl3.attention import Mask, attention
from nanovl3.config import TextConfig
from nanovl3.layers import RMSNorm

# -----------------------------------------------------------------------------
# RoPE and the static KV cache

def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """positions float [B,T] -> cos, sin [B,1,T,D] ("rotate-half" layout: D/2 frequencies twice).
    angle = position * theta^(-2k/D): positions may be fractional (V2PE), nothing else changes.
    The first half of sin is negated here, once per forward, so apply_rope needs none per layer."""
    k = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (k / head_dim))  # [D/2]
    angles = positions.float()[..., None] * inv_freq  # [B, T, D/2], fp32
    cos, sin = angles.cos(), angles.sin()
    cos = torch.cat([cos, cos], dim=-1)  # [B, T, D]
    sin = torch.cat([-sin, sin], dim=-1)  # [B, T, D]: signed for rotate-half
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # [B, 1, T, D]: broadcast over heads


def apply_rope(x, cos, sin):
    """x [B,H,T,D] -> x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]. With the sign
    folded into sin, rotate_half is a roll by D/2 ([x2, x1]); -a*b == a*(-b) exactly, so the numbers
    are the reference's bit for bit."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


class KVCache:
    """Preallocated key/value buffers for every layer, plus the document id of every slot.
    k[i], v[i]  [B, KV, S, D]   doc  LongTensor [B, S] (-1 = padding; attention stays in a document)
    Writes: index_copy into fixed buffers, so shapes never change while decoding (torch.compile)."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k, self.v = ([torch.zeros(shape, device=device, dtype=dtype)
                           for _ in range(cfg.num_hidden_layers)] for _ in range(2))
        self.doc = torch.full((batch, max_len), -1, dtype=torch.long, device=device)

    def repeat_rows(self, n: int):
        """Each row becomes n consecutive rows: prefill once, then sample n answers (Best-of-N)."""
        self.k, self.v = ([t.repeat_interleave(n, dim=0) for t in ts] for ts in (self.k, self.v))
        self.doc = self.doc.repeat_interleave(n, dim=0)


# -----------------------------------------------------------------------------
# the decoder: attention, MLP, block

class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                 cfg.head_dim)
        C, qwen3 = cfg.hidden_size, cfg.model_type == "qwen3"
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=not qwen3)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=not qwen3)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=not qwen3)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        if qwen3:  # one RMSNorm over each head's D channels, shared by all heads
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask: Mask, cache: KVCache | None, layer: int, slots,
                prefill: bool):
        B, T, C = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H*D], [B, T, KV*D] x 2
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        if hasattr(self, "q_norm"):  # Qwen3: normalise each head's query and key, then rotate
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # write this step's keys/values to their slots; a decode step reads the whole buffer
            cache.k[layer].index_copy_(2, slots, k)
            cache.v[layer].index_copy_(2, slots, v)
            if not prefill:
                k, v = cache.k[layer], cache.v[layer]  # [B, KV, S, D]
        y = attention(q, k, v, mask)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, slots, prefill):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, slots,
                               prefill)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2(nn.Module):
    """`language_model` of InternVL: `.model` (embeddings, blocks, final norm) and `.lm_head`.
    Qwen2 or Qwen3 by cfg.model_type (the attention differs, nothing else)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, x, positions, mask: Mask, cache: KVCache | None = None, slots=None,
                prefill: bool = False):
        """x: input embeddings [B,T,C]; positions float/long [B,T] -> final hidden states [B,T,C].
        With a cache, `slots` LongTensor [T] are the buffer slots these T tokens occupy; `prefill`
        means they are slots 0..T-1, so attention needs only this forward's own keys."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, cache, i, slots, prefill)
        return self.model.norm(x)
