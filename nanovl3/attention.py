"""
One attention function for the whole model, written by hand so torch.compile can fuse it.

    attention(q, k, v, mask) -> out        q [B,H,Tq,D]   k, v [B,KV,S,D]   out [B,H,Tq,D]

`mask` says who may attend to whom; `None` means full bidirectional attention (the ViT). For the LLM a `Mask`
carries the three rules that every case reduces to:
  causal    key slot j is visible from query i only if j <= q_slot[i]   (q_slot = where query i sits in the KV buffer)
  documents key j is visible only if doc_kv[j] == doc_q[i]             (packed samples, left padding: pad = -1)
  length    slots never written are never visible (they are in the future of every query, so causality covers them)

Two paths compute the same numbers:
  flex   torch.nn.attention.flex_attention with a block mask built from the rules; torch.compile fuses it into
         one kernel that skips fully-masked blocks (packed sequences cost what their documents cost).
  eager  scaled_dot_product_attention with the same rules: is_causal when possible, one causal call per document for
         a packed row, else a dense boolean mask. A decode step reads only the written slots (`Mask.kv_len`), with no
         mask at all when there is no padding. bf16/fp16 inference on CPU (packed rows aside) goes one head at a
         time through two matmuls (`per_head_attention`: 2x ATen's CPU kernel on a ViT tile, 5x on a decode step).
`use_flex` picks one (see there for why). Tests check both agree to 1e-5.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# torch.compile(flex_attention) compiles lazily. On CPU with static shapes, once per shape: with dynamic=True,
# torch 2.13's CPU flex kernel fails to build (an Inductor C++ codegen error, cur_kvSplitSize undeclared); CPU
# training takes the eager path and a prompt is prefilled once, so few shapes occur there. On CUDA with dynamic
# shapes: the ViT's batch (tiles per step) and the prompts' lengths change all the time, and once dynamo's
# recompile limit (8) is hit, flex quietly runs unfused, materialising every score (measured on an H100 with static
# shapes: SFT at 2.4k tok/s, slower than the 2-core CPU's 5.9k).
_flex_compiled = torch.compile(flex_attention, dynamic=False)
_flex_compiled_cuda = torch.compile(flex_attention, dynamic=True)

# On CPU, compiling flex costs ~16 s the first time and a few s per new shape family, so it only pays off when the
# user asked for compilation (sample.py --compile, train.py --compile). Set by `enable_cpu_flex`.
_CPU_FLEX = False


def enable_cpu_flex(on: bool = True):
    global _CPU_FLEX
    _CPU_FLEX = on


def use_flex(q: torch.Tensor) -> bool:
    """Choose the path, in one place.

    - a single query row (decode): the eager path; flex has nothing to fuse and a block mask per step costs more.
    - CUDA: flex (compiled), forward and backward.
    - CPU: torch 2.13 has no flex_attention backward on CPU (NotImplementedError), so training takes the eager
      path; inference takes compiled flex (~5x SDPA with a dense mask) only when compilation was asked for.
    """
    if q.size(-2) == 1:
        return False
    if q.is_cuda:
        return True
    needs_grad = torch.is_grad_enabled() and q.requires_grad
    return _CPU_FLEX and not needs_grad


@dataclass
class Mask:
    """Causal attention over a KV buffer of S slots, optionally split into documents.

    q_slot  LongTensor [B,Tq]  slot of each query in the KV buffer (0..Tq-1 for a plain forward, offset in decode)
    doc_q   LongTensor [B,Tq] or None   document id of each query (None: one document)
    doc_kv  LongTensor [B,S]  or None   document id of each key slot
    kv_len  int or None   slots >= kv_len are not written yet (decode): eager attention reads only [0, kv_len).
            None keeps the whole buffer, so shapes stay fixed for a compiled decode step.
    """
    q_slot: torch.Tensor
    doc_q: torch.Tensor | None = None
    doc_kv: torch.Tensor | None = None
    kv_len: int | None = None

    def dense(self, S: int) -> torch.Tensor:
        """bool [B,1,Tq,S]: True where attention is allowed. Built once per mask and shared by every layer."""
        cached = getattr(self, "_dense", None)
        if cached is not None and cached.size(-1) == S:
            return cached
        kv = torch.arange(S, device=self.q_slot.device)
        allowed = kv[None, None, :] <= self.q_slot[:, :, None]  # [B,Tq,S]
        if self.doc_q is not None:
            allowed = allowed & (self.doc_q[:, :, None] == self.doc_kv[:, None, :S])
        allowed = allowed[:, None]  # [B,1,Tq,S]: broadcast over heads
        if not torch.compiler.is_compiling():  # a compiled step recomputes it (fused, free) rather than store it
            self._dense = allowed
        return allowed

    def additive(self, S: int, dtype) -> torch.Tensor:
        """[B,1,Tq,S] of dtype: 0 where attention is allowed, -inf elsewhere (added to the scores). Built once."""
        cached = getattr(self, "_additive", None)
        if cached is None or cached.size(-1) != S or cached.dtype != dtype:
            zero = torch.zeros((), dtype=dtype, device=self.q_slot.device)
            cached = self._additive = zero.masked_fill(~self.dense(S), float("-inf"))
        return cached

    def documents(self, S: int) -> list[tuple[int, int]] | None:
        """[(start, end)] of the documents of ONE packed row with no cache (queries = keys), else None.

        Documents are runs of equal doc ids; computed once and shared by all layers (one host sync per forward).
        """
        if self.doc_q is None or self.doc_q.size(0) != 1 or self.q_slot.size(1) != S or self.q_slot[0, 0].item() != 0:
            return None
        if not hasattr(self, "_documents"):
            d = self.doc_q[0]
            starts = [0] + (torch.nonzero(d[1:] != d[:-1]).flatten() + 1).tolist()
            self._documents = list(zip(starts, starts[1:] + [S]))
        return self._documents

    def is_plain_causal(self, S: int) -> bool:
        """True when the mask is the ordinary lower triangle (query i at slot i, no documents)."""
        return self.doc_q is None and self.q_slot.size(1) == S and self.q_slot[0, 0].item() == 0

    def block_mask(self, Tq: int, S: int):
        """flex_attention's BlockMask of the rules, built once per mask and shared by every layer."""
        cached = getattr(self, "_block_mask", None)
        if cached is None or cached.shape[-2:] != (Tq, S):
            cached = self._block_mask = self._build_block_mask(Tq, S)
        return cached

    # built eagerly, also inside a compiled model (one graph break per forward): traced with dynamic shapes, torch
    # 2.11's Inductor cannot split the padded length into 128-blocks (CantSplit, seen with train.py --compile on CUDA)
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
    q_slot = torch.arange(T, device=device).expand(B, T)
    return Mask(q_slot, doc_ids, doc_ids)


def per_head_attention(q, k, v, bias: torch.Tensor | None, budget: int = 4 << 20) -> torch.Tensor:
    """Low-precision attention on CPU for inference: q [B,H,T,D], k/v [B,KV,S,D] -> [B,H,T,D], a few heads at a time.

    ATen's CPU flash kernel computes bf16 attention in fp32 blocks at ~170 GFLOP/s; here both products run on the
    bf16 GEMMs (~800 GFLOP/s), on as many heads at once as keep their [T,S] scores within `budget` bytes (in
    cache): 2x faster on a 1025-patch ViT tile (one head at a time), 1.5x on a 1088-token causal prompt, 2x on a
    320-token one (all heads at once: few, large calls). ATen's kernel is slowest on one bf16 query: a decode step
    of the 1B shape (14 query heads, 2 kv heads, 450 slots) takes 49 us a layer here against its 276 us.
    The numbers are those of transformers' eager attention: bf16 scores, softmax accumulated in fp32, bf16
    probabilities. bias [B,1,T,S] (Mask.additive), or None for bidirectional attention.
    """
    B, H, T, D = q.shape
    S, KV = k.size(2), k.size(1)
    rep = H // KV
    if T == 1 and rep > 1:
        # a decode step: the rep query heads that share a kv head become rep query rows of one product, so the
        # cache is read once and never copied (bias [B,1,1,S] broadcasts over the rows)
        return per_head_attention(q.view(B, KV, rep, D), k, v, bias, budget).view(B, H, 1, D)  # via [B,KV,rep,D]
    G = max(1, min(H, budget // (T * S * q.element_size())))  # heads per group
    q = q * D ** -0.5  # a power of two for D = 64, 128: exact
    out = torch.empty_like(q)
    for b in range(B):
        kb, vb = (k[b], v[b]) if rep == 1 else (k[b].repeat_interleave(rep, 0), v[b].repeat_interleave(rep, 0))
        for h in range(0, H, G):
            qh, kh, vh = q[b, h:h + G], kb[h:h + G], vb[h:h + G]  # [G, T, D], [G, S, D], [G, S, D]
            s = qh @ kh.transpose(1, 2) if bias is None else torch.baddbmm(bias[b], qh, kh.transpose(1, 2))  # [G,T,S]
            torch.bmm(s.softmax(-1), vh, out=out[b, h:h + G])
    return out


def attention(q, k, v, mask: Mask | None, flex: bool | None = None, compiled: bool = True) -> torch.Tensor:
    """q [B,H,Tq,D], k/v [B,KV,S,D] with H % KV == 0 (grouped-query attention); softmax(q k^T / sqrt(D)) v.

    `flex` forces a path (tests); None lets `use_flex` decide. `compiled=False` runs flex unfused (tests only).
    """
    B, H, Tq, D = q.shape
    if flex is None:
        flex = use_flex(q)
    if not flex and mask is not None and mask.kv_len is not None:
        k, v = k[:, :, :mask.kv_len], v[:, :, :mask.kv_len]  # [B, KV, kv_len, D]: only the written slots
    S = k.size(2)
    gqa = k.size(1) != H
    if flex:
        if torch.is_autocast_enabled(q.device.type):
            # flex is not on autocast's list (SDPA is): cast as autocast casts SDPA, or q and k (fp32 after RoPE)
            # would meet a bf16 v, and every call would compile a second time for the other dtype
            dt = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        block_mask = None if mask is None else mask.block_mask(Tq, S)
        fn = (_flex_compiled_cuda if q.is_cuda else _flex_compiled) if compiled else flex_attention
        return fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if mask is not None and mask.kv_len is not None and Tq == 1 and mask.doc_q is None:
        mask = None  # a decode query of an unpadded batch sees every written slot: no mask to build or apply
    per_head = (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
                and not (torch.is_grad_enabled() and q.requires_grad))  # see per_head_attention
    if mask is None:
        if per_head:
            return per_head_attention(q, k, v, None)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if mask.is_plain_causal(S) and not per_head:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    docs = mask.documents(S)
    if docs is not None:
        # a packed row: causal attention inside each document, the same numbers as the block-diagonal mask at a
        # fraction of the work (what flex_attention's block skipping buys, for the path that has a CPU backward)
        # split, not slice: the backward of a split is one cat, while each slice's backward zero-fills a full-size
        # gradient (15 documents x q, k, v x 4 layers: ~3% of bench.py's small training step)
        sizes = [b - a for a, b in docs]
        parts = zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2))
        return torch.cat([F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa)
                          for qd, kd, vd in parts], dim=2)
    if per_head:
        return per_head_attention(q, k, v, mask.additive(S, q.dtype))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(S), enable_gqa=gqa)
