"""
Qwen2 / Qwen2.5 decoder: the language model of InternVL3-1B/2B/8B/14B/38B/78B. SPEC §1.6.

RMSNorm, rotary position embedding (RoPE) evaluated at *float* positions, grouped-query attention with qkv bias,
SwiGLU MLP. Float positions are what make V2PE a change of position ids only (InternVL3 §2.1, arXiv 2504.10479):
visual tokens may advance the position by δ < 1, text tokens by 1; with δ = 1 this is ordinary RoPE.

Names equal the released checkpoint's (`language_model.model.layers.{i}.self_attn.q_proj`, ...).
Shapes: B batch, T tokens, C hidden size, H query heads, KV key/value heads, D head dim, S KV-buffer slots.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovl3.attention import Mask, attention
from nanovl3.config import TextConfig

# -----------------------------------------------------------------------------
# building blocks

# oneDNN can pre-pack a bf16 weight into its blocked layout (what Inductor's freezing does for CPU inference)
_PACKED_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@torch.compiler.assume_constant_result
def _threads() -> int:
    """CPU threads; a constant to torch.compile, whose graph would otherwise break at every Linear (it cannot trace
    torch.get_num_threads)."""
    return torch.get_num_threads()


def _packs(w: torch.Tensor) -> bool:
    """Whether a product with weight w takes the pre-packed oneDNN path: eager bf16 inference on a CPU that has it
    (compiled code: Inductor's freezing packs the weights itself)."""
    return (_PACKED_BF16 and w.dtype == torch.bfloat16 and w.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


class Linear(nn.Linear):
    """nn.Linear with two fast paths for CPU inference, where a decode step is a chain of matrix-vector products.

    - bf16: multiply by a copy of the weight pre-packed for oneDNN (what Inductor's freezing does): 2.2x faster
      for one row (896x4864: 0.11 vs 0.24 ms), 1.1x for a prompt and for a 1B-shape ViT tile (the ViT and the
      projector use this class too), bit-identical. The copy is made once per weight version (an optimizer step
      makes a new one) and costs one more copy of these weights.
    - fp32, one row: MKL runs a matrix-vector product on one core; split the weight's rows into one block per
      thread and multiply them in one batched call, which runs a block per core: 1.9x (bit-identical on the
      shapes we checked; up to 1 ulp on a 150k-row head). Kept inside torch.compile'd decode steps too, where
      it matters most: without it Inductor's product ran on one core.
    """

    def forward(self, x):
        w, b = self.weight, self.bias
        if _packs(w):  # bf16 eager: our packed copy
            key = (w.data_ptr(), w._version)
            if getattr(self, "_packed_key", None) != key:
                self._packed, self._packed_key = torch.ops.mkldnn._reorder_linear_weight(w, 1), key
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, b, "none", [], "")
        if w.device.type != "cpu" or torch.is_grad_enabled():
            return F.linear(x, w, b)  # training and GPUs: the plain product
        n, (N, K) = _threads(), w.shape
        if w.dtype == torch.float32 and x.numel() == K and n > 1 and N % n == 0:
            blocks = w.view(n, N // n, K).transpose(1, 2)  # [n, K, N/n]
            x1 = x.reshape(1, 1, K).expand(n, 1, K)  # [n, 1, K]: the same row for every block
            y = torch.bmm(x1, blocks) if b is None else torch.baddbmm(b.view(n, 1, N // n), x1, blocks)  # [n, 1, N/n]
            return y.view(*x.shape[:-1], N)
        return F.linear(x, w, b)

    def fused_with(self, x, *others) -> tuple:
        """(self(x), *[o(x) for o in others]) for layers that read the same x (q/k/v, gate/up).

        bf16 CPU inference makes them ONE product with a pre-packed concatenation of the weights (cached here, per
        weight version, like the packed copy above): fewer, larger oneDNN calls, 1.06x a 1B-shape decode step.
        Everything else (training, fp32, GPUs, compiled code) runs the separate products.
        """
        layers = (self,) + others
        if not _packs(self.weight):
            return tuple(layer(x) for layer in layers)
        key = tuple((layer.weight.data_ptr(), layer.weight._version) for layer in layers)
        if self.bias is not None:  # the concatenated bias is a copy too: rebuilt when any bias changes
            key += tuple(layer.bias._version for layer in layers)
        if getattr(self, "_fused_key", None) != key:
            bias = None if self.bias is None else torch.cat([layer.bias for layer in layers])
            weight = torch.cat([layer.weight for layer in layers])  # [sum of N, K]
            self._fused = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            self._fused_bias, self._fused_key = bias, key
        y = torch.ops.mkldnn._linear_pointwise(x, self._fused, self._fused_bias, "none", [], "")  # [..., sum of N]
        return y.split([layer.out_features for layer in layers], dim=-1)

    def __getstate__(self):  # deepcopy / pickle: the packed copies are caches, and oneDNN's tensors cannot be copied
        return {k: v for k, v in self.__dict__.items() if not k.startswith(("_packed", "_fused"))}


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32, result cast back before the weight (as Qwen2 does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # F.rms_norm: fewer dispatches than spelling it out, and bit-identical to x * rsqrt(mean(x^2) + eps) on CPU
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """positions float [B,T] -> cos, sin [B,1,T,D] ("rotate-half" layout: the D/2 frequencies repeated twice).

    angle = position * theta^(-2k/D): positions may be fractional (V2PE), nothing else changes.
    The first half of sin is negated here, once per forward, so that apply_rope needs no negation per layer.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [B, T, D/2], fp32
    cos, sin = angles.cos(), angles.sin()
    cos = torch.cat([cos, cos], dim=-1)  # [B, T, D]
    sin = torch.cat([-sin, sin], dim=-1)  # [B, T, D]: signed for rotate-half
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # [B, 1, T, D]: broadcast over heads


def apply_rope(x, cos, sin):
    """x [B,H,T,D] -> x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].

    With the sign folded into sin, rotate_half is a roll by D/2 ([x2, x1]); -a*b == a*(-b) exactly, so the numbers
    are the reference's bit for bit.
    """
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


# -----------------------------------------------------------------------------
# static KV cache


class KVCache:
    """Preallocated key/value buffers for every layer, plus the document id of every slot.

    k[i], v[i]  [B, KV, S, D]   doc  LongTensor [B, S] (-1 = padding; attention stays within one document)
    Writing is an index_copy into fixed buffers, so shapes never change while decoding (torch.compile friendly).
    """

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.doc = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.max_len = max_len

    def repeat_rows(self, n: int):
        """Each row becomes n consecutive rows: prefill a prompt once, then sample n answers (Best-of-N)."""
        self.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        self.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        self.doc = self.doc.repeat_interleave(n, dim=0)


# -----------------------------------------------------------------------------
# attention, MLP, block


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = Linear(C, self.n_head * self.head_dim, bias=True)
        self.k_proj = Linear(C, self.n_kv * self.head_dim, bias=True)
        self.v_proj = Linear(C, self.n_kv * self.head_dim, bias=True)
        self.o_proj = Linear(self.n_head * self.head_dim, C, bias=False)

    def forward(self, x, cos, sin, mask: Mask, cache: KVCache | None, layer: int, slots, prefill: bool):
        B, T, C = x.shape
        q, k, v = self.q_proj.fused_with(x, self.k_proj, self.v_proj)  # [B, T, H*D], [B, T, KV*D] x 2
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # write this step's keys/values into their slots; a decode step then attends over the whole buffer,
            # while prefill (slots 0..T-1) already holds every key it may see
            cache.k[layer].index_copy_(2, slots, k)
            cache.v[layer].index_copy_(2, slots, v)
            if not prefill:
                k, v = cache.k[layer], cache.v[layer]  # [B, KV, S, D]
        y = attention(q, k, v, mask)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_proj.fused_with(x, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, slots, prefill):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, slots, prefill)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


# -----------------------------------------------------------------------------
# the decoder


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2(nn.Module):
    """`language_model` of InternVL: `.model` (embeddings, blocks, final norm) and `.lm_head`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, x, positions, mask: Mask, cache: KVCache | None = None, slots=None, prefill: bool = False):
        """x: input embeddings [B,T,C]; positions float/long [B,T]; returns final hidden states [B,T,C].

        With a cache, `slots` LongTensor [T] says which buffer slots these T tokens occupy; `prefill` means they are
        slots 0..T-1, so attention needs only this forward's own keys.
        """
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, cache, i, slots, prefill)
        return self.model.norm(x)
