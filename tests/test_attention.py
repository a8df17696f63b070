"""
The flex_attention and the eager (SDPA) paths give the same numbers for every mask the model uses.

    python -m pytest -q tests/test_attention.py

Compiled flex on CPU costs ~20 s of compilation the first time; the rest is fast.
"""

import copy

import pytest
import torch

from nanovl3 import attention as A
from nanovl3.config import preset
from nanovl3.model import InternVL


def qkv(B=2, H=4, KV=2, T=40, S=None, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = S or T
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, KV, S, D, generator=g),
            torch.randn(B, KV, S, D, generator=g))


def reference_attention(q, k, v, allowed):
    """Plain math: softmax over allowed keys (bool [B,1,Tq,S] or None), GQA by repeating k/v."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v


def masks(B, T, device="cpu"):
    # packed + tail pad; left padding of a generation batch
    docs = torch.tensor([[0] * 10 + [1] * 25 + [-1] * 5, [0] * 40], device=device)[:B, :T]
    left = torch.tensor([[-1] * 6 + [0] * 34, [0] * 40], device=device)[:B, :T]
    return {
        "full": None,
        "causal": A.causal_mask(B, T, device),
        "packed": A.causal_mask(B, T, device, docs),
        "left_pad": A.causal_mask(B, T, device, left),
    }


@pytest.mark.parametrize("kind", ["full", "causal", "packed", "packed_row", "left_pad"])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["flex-eager", "flex-compiled"])
def test_flex_equals_eager(kind, compiled):
    """packed: two rows (dense mask); packed_row: one row (eager: one causal call per document)."""
    B = 1 if kind == "packed_row" else 2
    q, k, v = qkv(B=B)
    mask = masks(B, 40)["packed" if kind == "packed_row" else kind]
    if kind == "packed_row":
        assert mask.documents(40) == [(0, 10), (10, 35), (35, 40)]
    eager = A.attention(q, k, v, mask, flex=False)
    flex = A.attention(q, k, v, mask, flex=True, compiled=compiled)
    want = reference_attention(q, k, v, None if mask is None else mask.dense(40))
    assert (eager - want).abs().max().item() <= 1e-5
    assert (flex - eager).abs().max().item() <= 1e-5


def test_decode_mask_over_a_cache_buffer():
    """One query at slot 29 of a 40-slot buffer: sees slots 0..29 of its own document only."""
    q, k, v = qkv(T=1, S=40)
    doc = torch.zeros(2, 40, dtype=torch.long)
    doc[0, :4] = -1  # row 0 was left-padded
    mask = A.Mask(torch.full((2, 1), 29), torch.zeros(2, 1, dtype=torch.long), doc)
    allowed = mask.dense(40)
    assert allowed[0, 0, 0].tolist() == [False] * 4 + [True] * 26 + [False] * 10
    got = A.attention(q, k, v, mask)
    assert (got - reference_attention(q, k, v, allowed)).abs().max().item() <= 1e-5


def test_path_choice():
    """flex only on CUDA and never for one query row; the CPU always takes the eager path."""
    q = torch.randn(1, 2, 8, 4)
    assert not A.use_flex(q)
    assert not A.use_flex(q[:, :, :1])


# CUDA takes compiled flex in training too (forward and backward); these run on a GPU, not in CI
cuda = pytest.mark.cuda  # skipped without CUDA (conftest.py)


@cuda
@pytest.mark.parametrize("kind", ["full", "causal", "packed", "left_pad"])
def test_cuda_flex_equals_eager_with_grads(kind):
    """Compiled flex's outputs and gradients equal eager's (fp32; Triton may round dots to TF32)."""
    q, k, v = (t.cuda() for t in qkv())
    mask = masks(2, 40, "cuda")[kind]
    outs, grads = [], []
    for flex in (False, True):
        qkv_ = [t.clone().requires_grad_() for t in (q, k, v)]
        out = A.attention(*qkv_, mask, flex=flex)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in qkv_])
    assert (outs[0] - outs[1]).abs().max().item() <= 2e-3
    for g_eager, g_flex in zip(*grads):
        assert (g_eager - g_flex).abs().max().item() <= 5e-3 * max(1.0, g_eager.abs().max().item())


@cuda
def test_cuda_flex_stays_compiled(monkeypatch):
    """Training's shapes change every step (tiles per batch, packed lengths) and run under bf16
    autocast, where q and k leave RoPE in fp32 beside a bf16 v. Compiled flex must absorb that
    without reaching dynamo's recompile limit, past which it silently runs unfused (here: errs)."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    for step, tiles in enumerate([3, 7, 12, 5, 9, 16, 2, 11, 4, 13]):
        for autocast in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                vit = [t.cuda().requires_grad_() for t in qkv(B=tiles, H=4, KV=4, T=17, seed=step)]
                A.attention(*vit, None).float().sum().backward()  # the ViT: bidirectional per tile
                T = 40 + 24 * step  # the LLM: one packed row of three documents
                q, k, v = [t.cuda().requires_grad_() for t in qkv(B=1, T=T, seed=step)]
                docs = (torch.arange(T, device="cuda") * 3 // T)[None]  # [1, T]
                out = A.attention(q, k, v.bfloat16() if autocast else v,
                                  A.causal_mask(1, T, "cuda", docs))
                out.float().sum().backward()
                assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
                assert q.grad is not None and v.grad is not None


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["flex-eager", "flex-compiled"])
def test_model_flex_equals_eager(compiled, monkeypatch):
    """Whole model (ViT bidirectional + LLM causal and packed) through either path."""
    torch.manual_seed(0)
    cfg = preset("toy")
    cfg.image_token_id = 1000
    model = InternVL(cfg).eval()
    model.init_weights(std=0.2)
    n = cfg.num_image_token
    ids = torch.randint(0, 900, (1, 2 * n + 20))
    ids[0, 5:5 + 2 * n] = cfg.image_token_id
    pix = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    docs = torch.cat([torch.zeros(1, 30), torch.ones(1, 2 * n - 10)], 1).long()
    with torch.no_grad():
        eager = [model(ids, pix), model(ids, pix, doc_ids=docs)]
        monkeypatch.setattr(A, "use_flex", lambda q: q.size(-2) > 1)
        if not compiled:
            monkeypatch.setattr(A, "_flex_compiled", A.flex_attention)
        flex = [model(ids, pix), model(ids, pix, doc_ids=docs)]
    for e, f in zip(eager, flex):  # 1e-5 per call (above); through 7 layers, the parity bound
        assert (e - f).abs().max().item() <= 1e-4
    assert (eager[0] - eager[1]).abs().max().item() > 1e-3  # the packed mask does change attention


@pytest.mark.parametrize("kind", ["full", "causal", "left_pad"])
def test_per_head_low_precision_path(kind):
    """bf16 inference on CPU goes one head at a time (per_head_attention): within bf16 rounding of
    the fp32 math, and as close to it as ATen's own bf16 kernel is."""
    q, k, v = qkv()
    mask = masks(2, 40)[kind]
    want = reference_attention(q, k, v, None if mask is None else mask.dense(40))
    with torch.no_grad():
        got = A.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask).float()
        sdpa = A.F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                                enable_gqa=True, attn_mask=None if mask is None
                                                else mask.dense(40)).float()
    assert (got - want).abs().max().item() <= 4 * max((sdpa - want).abs().max().item(), 2 ** -8)


@pytest.mark.parametrize("padded", [False, True])
def test_per_head_decode_step(padded):
    """A bf16 decode step (one query, 3 query heads per kv head, folded into rows of one product):
    within bf16 rounding of the fp32 math over the written slots, with and without left padding."""
    q, k, v = qkv(H=6, T=1, S=40)
    doc = torch.zeros(2, 40, dtype=torch.long)
    if padded:
        doc[0, :7] = -1
    mask = A.Mask(torch.full((2, 1), 29), torch.zeros(2, 1, dtype=torch.long) if padded else None,
                  doc if padded else None, kv_len=30)
    allowed = (torch.arange(40) <= 29) & (doc == 0)  # [B, S]
    want = reference_attention(q, k, v, allowed[:, None, None, :])
    with torch.no_grad():
        got = A.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask).float()
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 2 ** -6


def test_decode_reads_only_written_slots():
    """kv_len: the same numbers as masking the unwritten slots, with or without padding."""
    q, k, v = qkv(T=1, S=40)
    doc = torch.zeros(2, 40, dtype=torch.long)
    doc[0, :4] = -1
    for doc_q, doc_kv in [(None, None), (torch.zeros(2, 1, dtype=torch.long), doc)]:
        full = A.attention(q, k, v, A.Mask(torch.full((2, 1), 29), doc_q, doc_kv))
        sliced = A.attention(q, k, v, A.Mask(torch.full((2, 1), 29), doc_q, doc_kv, kv_len=30))
        assert (full - sliced).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_linear_paths_are_exact(dtype):
    """fast.py's CPU inference paths (bf16: pre-packed weight; fp32: one row split over threads)
    equal F.linear, and the packed copy follows in-place weight updates."""
    from nanovl3.fast import FastLinear, speed_up
    torch.manual_seed(0)
    lin = speed_up(torch.nn.Sequential(torch.nn.Linear(64, 96))).to(dtype)[0]
    assert type(lin) is FastLinear
    for shape in [(1, 64), (2, 1, 64), (3, 5, 64)]:
        x = torch.randn(*shape, dtype=dtype)
        with torch.no_grad():
            assert torch.equal(lin(x), A.F.linear(x, lin.weight, lin.bias))
    with torch.no_grad():
        lin.weight.mul_(2)  # an optimizer step: the packed copy must be rebuilt
        x = torch.randn(1, 64, dtype=dtype)
        assert torch.equal(lin(x), A.F.linear(x, lin.weight, lin.bias))
        assert torch.equal(copy.deepcopy(lin)(x), lin(x))  # the cache is not copied (oneDNN can't)
    assert list(lin.state_dict()) == ["weight", "bias"]  # nor saved


class QKV(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(64, n, bias=bias)
                                                 for n in (96, 32, 32))

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_products_are_exact(bias):
    """speed_up fuses q/k/v into one bf16 product: equal to the separate products bit for bit,
    following in-place updates of any weight or bias, not copied by deepcopy; a layer called on its
    own (another input) still gets its own product."""
    from nanovl3.fast import speed_up
    torch.manual_seed(0)
    m = speed_up(QKV(bias).bfloat16())
    layers = [m.q_proj, m.k_proj, m.v_proj]
    assert layers[0].fused is layers[2].fused is not None

    def want(x, i):
        return A.F.linear(x, layers[i].weight, layers[i].bias)
    with torch.no_grad():
        for shape in [(1, 1, 64), (2, 7, 64)]:
            x = torch.randn(*shape, dtype=torch.bfloat16)
            got = m(x)
            assert [y.shape[-1] for y in got] == [96, 32, 32]
            assert all(torch.equal(y, want(x, i)) for i, y in enumerate(got))
        layers[2].weight.mul_(2)  # an update of the last weight alone must rebuild the fused copy
        assert torch.equal(m(x)[2], want(x, 2))
        if bias:
            layers[1].bias.add_(1)  # and so must an update of one bias alone
            assert torch.equal(m(x)[1], want(x, 1))
        y = torch.randn(1, 1, 64, dtype=torch.bfloat16)
        assert torch.equal(m.k_proj(y), want(y, 1))
        clone = copy.deepcopy(m)
        assert all(torch.equal(a, b) for a, b in zip(clone(x), m(x)))
    assert all(not k.startswith("_") for k in m.state_dict())  # the caches are never saved
