"""
One attention function for the whole model, written by hand so torch.compile can fuse it.

    attention(q, k, v, mask) -> out        q [B,H,Tq,D]   k, v [B,KV,S,D]   out [B,H,Tq,D]

`mask` says who may attend to whom; `None` means full bidirectional attention (the ViT). For the LLM
a `Mask` carries the three rules that every case reduces to:
  causal    key slot j is visible from query i only if j <= q_slot[i]  (q_slot: query i's KV slot)
  documents key j is visible only if doc_kv[j] == doc_q[i]  (packed samples, left padding: pad = -1)
  length    slots never written are never visible (in every query's future: causality covers them)

Two paths compute the same numbers (tests check they agree to 1e-5); `use_flex` picks one:
  flex   flex_attention with a block mask of the rules; torch.compile fuses it into one kernel that
         skips fully-masked blocks (packed sequences cost what their documents cost).
  eager  scaled_dot_product_attention under the same rules: is_causal when possible, one call per
         document of a packed row, or a dense mask; bf16/fp16 CPU inference: per_head_attention."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# torch.compile(flex_attention) compiles lazily, once per shape on CPU: with dynamic=True torch
# 2.13's CPU flex kernel fails to build. CUDA: dynamic, as the ViT's batch (tiles per step) and
# prompt lengths keep changing and past dynamo's recompile limit (8) flex silently runs unfused.
_flex_compiled = torch.compile(flex_attention, dynamic=False)
_flex_compiled_cuda = torch.compile(flex_attention, dynamic=True)


def use_flex(q: torch.Tensor) -> bool:
    """flex on CUDA (forward and backward), except for a single query row (decode), where it has
    nothing to fuse and a block mask per step costs more. CPU takes the eager path: torch 2.13 has
    no CPU backward for flex, and for inference the compile time (~16 s) outweighs the gain."""
    return q.is_cuda and q.size(-2) > 1


@dataclass
class Mask:
    """Causal attention over a KV buffer of S slots, optionally split into documents.
    q_slot  LongTensor [B,Tq]  each query's KV slot (0..Tq-1 in a plain forward, offset in decode)
    doc_q   LongTensor [B,Tq] or None   document id of each query (None: one document)
    doc_kv  LongTensor [B,S]  or None   document id of each key slot
    kv_len  int or None   slots >= kv_len are unwritten (decode): eager attention reads [0, kv_len).
            None keeps the whole buffer, so shapes stay fixed for a compiled decode step."""
    q_slot: torch.Tensor
    doc_q: torch.Tensor | None = None
    doc_kv: torch.Tensor | None = None
    kv_len: int | None = None

    def dense(self, S: int) -> torch.Tensor:
        """bool [B,1,Tq,S]: True where attention is allowed. Built once, shared by every layer."""
        cached = getattr(self, "_dense", None)
        if cached is not None and cached.size(-1) == S:
            return cached
        kv = torch.arange(S, device=self.q_slot.device)
        allowed = kv[None, None, :] <= self.q_slot[:, :, None]  # [B,Tq,S]
        if self.doc_q is not None:
            allowed = allowed & (self.doc_q[:, :, None] == self.doc_kv[:, None, :S])
        allowed = allowed[:, None]  # [B,1,Tq,S]: broadcast over heads
        if not torch.compiler.is_compiling():  # compiled: recomputed (fused, free), not stored
            self._dense = allowed
        return allowed

    def additive(self, S: int, dtype) -> torch.Tensor:
        """[B,1,Tq,S] of dtype, added to the scores: 0 where allowed, else -inf. Built once."""
        cached = getattr(self, "_additive", None)
        if cached is None or cached.size(-1) != S or cached.dtype != dtype:
            zero = torch.zeros((), dtype=dtype, device=self.q_slot.device)
            cached = self._additive = zero.masked_fill(~self.dense(S), float("-inf"))
        return cached

    def documents(self, S: int) -> list[tuple[int, int]] | None:
        """[(start, end)] of the documents of ONE packed row with no cache (queries = keys), else
        None. Documents are runs of equal doc ids; computed once for all layers (one host sync)."""
        if (self.doc_q is None or self.doc_q.size(0) != 1 or self.q_slot.size(1) != S
                or self.q_slot[0, 0].item() != 0):
            return None
        if not hasattr(self, "_documents"):
            d = self.doc_q[0]
            starts = [0] + (torch.nonzero(d[1:] != d[:-1]).flatten() + 1).tolist()
            self._documents = list(zip(starts, starts[1:] + [S]))
        return self._documents

    def block_mask(self, Tq: int, S: int):
        """flex_attention's BlockMask of the rules, built once, shared by every layer."""
        cached = getattr(self, "_block_mask", None)
        if cached is None or cached.shape[-2:] != (Tq, S):
            cached = self._block_mask = self._build_block_mask(Tq, S)
        return cached

    # built eagerly, even in a compiled model (a graph break per forward): traced with dynamic
    # shapes, torch 2.11's Inductor cannot split the padded length into 128-blocks (CantSplit, CUDA)
    @torch.compiler.disable
    def _build_block_mask(self, Tq: int, S: int):
        q_slot, doc_q, doc_kv = self.q_slot, self.doc_q, self.doc_kv

        def mask_mod(b, h, qi, kj):
            ok = kj <= q_slot[b, qi]
            if doc_q is not None:
                ok = ok & (doc_q[b, qi] == doc_kv[b, kj])
            return ok

        return create_block_mask(mask_mod, q_slot.size(0), None, Tq, S, device=q_slot.device)


def causal_mask(B: int, T: int, device, doc_ids: torch.Tensor | None = None) -> Mask:
    """The mask of a plain (or packed, when doc_ids [B,T] is given) causal forward with no cache."""
    return Mask(torch.arange(T, device=device).expand(B, T), doc_ids, doc_ids)


def per_head_attention(q, k, v, bias: torch.Tensor | None, budget: int = 4 << 20) -> torch.Tensor:
    """Low-precision CPU inference by groups of heads: q [B,H,T,D], k/v [B,KV,S,D] -> [B,H,T,D].
    ATen's CPU kernel computes bf16 attention in fp32 blocks; here both products run on the bf16
    GEMMs, on as many heads at once as keep their [T,S] scores within `budget` bytes (in cache),
    with the numbers of transformers' eager attention: bf16 scores, softmax accumulated in fp32,
    bf16 probabilities. bias [B,1,T,S] (Mask.additive), or None for bidirectional attention."""
    B, H, T, D = q.shape
    S, KV = k.size(2), k.size(1)
    rep = H // KV
    if T == 1 and rep > 1:
        # a decode step: the rep query heads that share a kv head become rep query rows of one
        # product, so the cache is read once and never copied (bias [B,1,1,S] broadcasts over rows)
        return per_head_attention(q.view(B, KV, rep, D), k, v, bias, budget).view(B, H, 1, D)
    G = max(1, min(H, budget // (T * S * q.element_size())))  # heads per group
    q = q * D ** -0.5  # a power of two for D = 64, 128: exact
    out = torch.empty_like(q)
    for b in range(B):
        kb, vb = k[b], v[b]
        if rep > 1:
            kb, vb = kb.repeat_interleave(rep, 0), vb.repeat_interleave(rep, 0)  # [H, S, D]
        for h in range(0, H, G):
            qh, kh, vh = q[b, h:h + G], kb[h:h + G], vb[h:h + G]  # [G, T, D], [G, S, D], [G, S, D]
            kt = kh.transpose(1, 2)  # [G, D, S]
            s = qh @ kt if bias is None else torch.baddbmm(bias[b], qh, kt)  # [G, T, S]
            torch.bmm(s.softmax(-1), vh, out=out[b, h:h + G])
    return out


def attention(q, k, v, mask: Mask | None, flex: bool | None = None,
              compiled: bool = True) -> torch.Tensor:
    """q [B,H,Tq,D], k/v [B,KV,S,D], H % KV == 0 (grouped-query) -> softmax(q k^T / sqrt(D)) v.
    `flex` forces a path, `compiled=False` runs flex unfused (tests); None: `use_flex` decides."""
    if flex if flex is not None else use_flex(q):
        return _flex(q, k, v, mask, compiled)
    return _eager(q, k, v, mask)


def _flex(q, k, v, mask: Mask | None, compiled: bool):
    if torch.is_autocast_enabled(q.device.type):
        # flex is not on autocast's list (SDPA is): cast as autocast casts SDPA, or q and k (fp32
        # after RoPE) would meet a bf16 v, and every call would compile again for the other dtype
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    block_mask = None if mask is None else mask.block_mask(q.size(2), k.size(2))
    fn = (_flex_compiled_cuda if q.is_cuda else _flex_compiled) if compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=k.size(1) != q.size(1))


def _eager(q, k, v, mask: Mask | None):
    gqa = k.size(1) != q.size(1)
    if mask is not None and mask.kv_len is not None:
        k, v = k[:, :, :mask.kv_len], v[:, :, :mask.kv_len]  # [B, KV, kv_len, D]: written slots
        if q.size(2) == 1 and mask.doc_q is None:
            mask = None  # an unpadded batch's decode query sees all of them
    S = k.size(2)
    low_precision_inference = (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
                               and not (torch.is_grad_enabled() and q.requires_grad))
    if low_precision_inference and (mask is None or mask.documents(S) is None):
        return per_head_attention(q, k, v, None if mask is None else mask.additive(S, q.dtype))
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    # the ordinary lower triangle (query i at slot i, no documents)
    if mask.doc_q is None and mask.q_slot.size(1) == S and mask.q_slot[0, 0].item() == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    docs = mask.documents(S)
    if docs is not None:
        # a packed row: causal attention per document, the block-diagonal mask's numbers at a
        # fraction of the work. Split, not slice: a slice's backward zero-fills a full-size gradient
        sizes = [b - a for a, b in docs]
        parts = zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2))
        return torch.cat([F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa)
                          for qd, kd, vd in parts], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(S), enable_gqa=gqa)
