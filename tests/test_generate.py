"""
Generation: KV-cache decoding equals a full recompute; batched rows equal rows sampled alone.

    python -m pytest -q tests/test_generate.py
"""

import copy
import re

import pytest
import torch

import nanovl3.generate
from nanovl3.chat import render_prompt, train_tokenizer
from nanovl3.common import UserError
from nanovl3.config import preset
from nanovl3.generate import chat, generate
from nanovl3.model import InternVL, v2pe_position_ids

IMG = 1000


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = preset("toy")
    cfg.image_token_id = IMG
    m = InternVL(cfg).eval()
    m.init_weights(std=0.3)  # large enough: sampling not near-uniform, greedy not stalling
    return m


def prompt_with_image(model, n_tiles, seed):
    g = torch.Generator().manual_seed(seed)
    n = model.cfg.num_image_token * n_tiles
    ids = torch.randint(10, 900, (9 + n,), generator=g)
    ids[3:3 + n] = IMG
    size = model.cfg.vision.image_size
    return ids.tolist(), torch.randn(n_tiles, 3, size, size, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kv_cache_equals_recompute(model, dtype):
    """fp64 isolates the cache logic from rounding (bound 1e-9); fp32: within 1e-5 of the logits'
    largest magnitude, same tokens."""
    model = copy.deepcopy(model).to(dtype)
    ids, pix = prompt_with_image(model, 2, seed=0)
    pix = pix.to(dtype)
    step_logits = []
    hook = model.language_model.lm_head.register_forward_hook(lambda m, i, o:
                                                               step_logits.append(o.detach()))
    try:
        new = generate(model, [ids], pix, max_new_tokens=16, temperature=0.0)[0]
    finally:
        hook.remove()
    assert len(new) == 16
    full = torch.tensor([ids + new])
    with torch.no_grad():
        recomputed = model(full, pix)[0]  # [T, V]
    # step k's logits predict new[k]: prefill gives the first, each decode step the next
    for k, logits in enumerate(step_logits):
        want = recomputed[len(ids) - 1 + k]
        # fp32: relative to the logits' scale (up to ~18 here); the rounding differs by CPU kernel
        bound = 1e-9 if dtype == torch.float64 else 1e-5 * want.abs().max().item()
        assert (logits.reshape(-1) - want).abs().max().item() <= bound
        assert int(want.argmax()) == new[k]


def test_batch_rows_equal_rows_alone(model):
    """Prompts of different lengths (left padding), each with its own image; greedy and sampled."""
    (a, pa), (b, pb) = prompt_with_image(model, 1, seed=1), prompt_with_image(model, 2, seed=2)
    b = b[:-4]  # different lengths
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_k=50, top_p=0.9, seed=7)):
        batch = generate(model, [a, b], torch.cat([pa, pb]), max_new_tokens=12, **kw)
        seed = kw.get("seed", 0)
        alone_a = generate(model, [a], pa, max_new_tokens=12, **{**kw, "seed": seed})
        alone_b = generate(model, [b], pb, max_new_tokens=12, **{**kw, "seed": seed + 1})
        assert batch == alone_a + alone_b


def test_best_of_n_rows_equal_rows_alone(model):
    ids, pix = prompt_with_image(model, 1, seed=3)
    rows = generate(model, [ids], pix, max_new_tokens=10, temperature=1.0, seed=11, num_samples=4)
    assert len(rows) == 4 and len({tuple(r) for r in rows}) > 1  # different samples
    for r in range(4):
        assert rows[r] == generate(model, [ids], pix, max_new_tokens=10, temperature=1.0,
                                   seed=11 + r)[0]


def test_stop_tokens_and_streaming(model):
    ids, pix = prompt_with_image(model, 1, seed=4)
    free = generate(model, [ids], pix, max_new_tokens=12)[0]
    streamed = []
    stopped = generate(model, [ids], pix, max_new_tokens=12, stop_ids=[free[5]],
                       stream=streamed.append)[0]
    first = free.index(free[5])
    assert stopped == free[:first]  # cut before the stop token
    assert [s[0] for s in streamed] == free[:first + 1]  # streaming saw every token, stop included


def test_prompt_too_long(model):
    ids = list(range(10, 20)) * 400
    with pytest.raises(UserError, match="prompt too long: 4000 prompt tokens"):
        generate(model, [ids], None, max_new_tokens=200)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(max_new_tokens=2.5),
                                dict(temperature=-1.0), dict(temperature=float("nan")),
                                dict(temperature=float("inf")), dict(temperature="0.7"),
                                dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                dict(num_samples=0), dict(max_new_tokens=True)])
def test_nonsense_sampling_values_are_named(model, kw):
    (key, value), = kw.items()
    with pytest.raises(ValueError, match="^" + re.escape(f"{key}={value!r}: must be ")):
        generate(model, [[10, 11, 12]], None, **kw)


@pytest.mark.parametrize("prompts", [[], [[10, 11], []]])
def test_empty_prompts_are_named(model, prompts):
    with pytest.raises(ValueError, match="prompts: need at least one prompt"):
        generate(model, prompts, None, max_new_tokens=2)


def test_image_token_count_mismatch(model):
    ids, pix = prompt_with_image(model, 2, seed=5)
    with pytest.raises(UserError, match=r"32 <IMG_CONTEXT> tokens but the tiles give 16 features"):
        model(torch.tensor([ids]), pix[:1])


def test_v2pe_delta_one_is_plain_positions(model):
    ids, pix = prompt_with_image(model, 2, seed=6)
    t = torch.tensor(ids)
    pos = v2pe_position_ids(t, IMG, [1.0])
    assert torch.equal(pos, torch.arange(len(ids), dtype=torch.float32))
    with torch.no_grad():
        assert torch.equal(model(t[None], pix, position_ids=pos[None]), model(t[None], pix))
    # δ = 1/4: visual positions advance by 1/4, the next text token resumes at ceil(last) + 1
    n = 2 * model.cfg.num_image_token
    quarter = v2pe_position_ids(t, IMG, [0.25])
    assert quarter[3:3 + n].tolist() == [2 + 0.25 * (k + 1) for k in range(n)]
    assert quarter[3 + n].item() == 2 + n // 4 + 1
    with torch.no_grad():
        assert (model(t[None], pix, position_ids=quarter[None])
                - model(t[None], pix)).abs().max() > 1e-3


def test_generate_with_v2pe_delta_equals_recompute(model):
    """generate(v2pe_delta=δ) on a left-padded batch: each row's greedy tokens equal a full
    recompute with V2PE positions for the prompt and +1 per new token; δ = 1: the default path."""
    prompts = [prompt_with_image(model, 1, seed=s) for s in (7, 8)]
    # a longer second prompt: the first is left-padded
    prompts[1] = (prompts[1][0][:6] + prompts[1][0][6 + model.cfg.num_image_token:][:2]
                  + prompts[1][0][6:], prompts[1][1])
    ids = [p for p, _ in prompts]
    pix = torch.cat([x for _, x in prompts])
    plain = generate(model, ids, pix, max_new_tokens=6)
    assert generate(model, ids, pix, max_new_tokens=6, v2pe_delta=1.0) == plain
    got = generate(model, ids, pix, max_new_tokens=6, v2pe_delta=1 / 16)
    assert got != plain   # δ changes the positions the model sees
    for (p, x), new in zip(prompts, got):
        seq = list(p)
        with torch.no_grad():
            for _ in range(6):
                pos = v2pe_position_ids(torch.tensor(p), IMG, 1 / 16)
                pos = torch.cat([pos, pos[-1] + torch.arange(1, len(seq) - len(p) + 1)])
                logits = model(torch.tensor([seq]), x, position_ids=pos[None])
                seq.append(int(logits[0, -1].argmax()))
        assert seq[len(p):] == new


@pytest.mark.slow
def test_compiled_decode_equals_eager_and_follows_new_weights(model):
    """compile=True (fixed shapes, Inductor freezing on CPU) samples the eager path's greedy tokens
    on a left-padded batch, and reads changed weights (freezing must not bake in stale ones)."""
    model = copy.deepcopy(model)
    prompts = [prompt_with_image(model, 1, seed=s) for s in (9, 10)]
    ids = [prompts[0][0], prompts[1][0][:-3]]  # different lengths: the compiled step sees doc masks
    pix = torch.cat([x for _, x in prompts])
    before = generate(model, ids, pix, max_new_tokens=8)
    assert generate(model, ids, pix, max_new_tokens=8, compile=True) == before
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(-1)  # tied to the embeddings: all logits change
    after = generate(model, ids, pix, max_new_tokens=8)
    assert after != before
    assert generate(model, ids, pix, max_new_tokens=8, compile=True) == after


@pytest.mark.slow
def test_compiled_cpu_decode_is_one_graph(model):
    """The compiled step must stay one graph: a break at every Linear (untraceable get_num_threads)
    made CPU compiled decode slower than eager. Batch 1: fast.py's split matrix-vector products."""
    from torch._dynamo.utils import counters
    ids, pix = prompt_with_image(model, 1, seed=11)
    torch._dynamo.reset()
    counters.clear()
    assert (generate(model, [ids], pix, max_new_tokens=6, compile=True)
            == generate(model, [ids], pix, max_new_tokens=6))
    assert not counters["graph_break"], dict(counters["graph_break"])


# -----------------------------------------------------------------------------
# multi-turn chat: upstream `chat` with `history`


def test_chat_rerenders_the_conversation_with_stripped_answers(model, monkeypatch):
    """Each turn's prompt is the whole conversation re-rendered and tokenised afresh: earlier
    questions (the first with its image tags) and their stripped answers, then the new question."""
    tok = train_tokenizer(["What colour is it? red. How many? two."] * 10, vocab_size=300)
    replies, calls = iter([" \n red \n", "two "]), []

    def fake_generate(model, prompts, pixel_values, **kw):
        calls.append((prompts, pixel_values, kw))
        return [tok.encode(next(replies))]

    monkeypatch.setattr(nanovl3.generate, "generate", fake_generate)
    pix, T = torch.zeros(2, 3, 8, 8), model.cfg.num_image_token
    a1, h1 = chat(model, tok, "What colour is it?", pix, [2], max_new_tokens=5)
    a2, h2 = chat(model, tok, "How many?", pix, [2], h1, max_new_tokens=5)
    assert (a1, a2) == ("red", "two")
    assert h2 == [("<image>\nWhat colour is it?", "red"), ("How many?", "two")]
    want = ("<|im_start|>user\n<image>\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n"
            "red<|im_end|>\n<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n")
    shown = render_prompt("How many?", [2], T, h1, expand=False)
    assert shown.endswith(want)  # stripped answer, tags kept in the first question
    assert calls[1][0] == [tok.encode(render_prompt("How many?", [2], T, h1))]
    assert calls[1][0][0].count(tok.img_context_id) == 2 * T  # the image, expanded again
    assert calls[1][1] is pix and calls[1][2]["stop_ids"] == tok.stop_ids
    # video frames: "Frame1: <image>\n..." on the first turn only
    replies = iter(["a fall", "no"])
    _, hv = chat(model, tok, "What happens?", pix, [1, 1], video=True, max_new_tokens=5)
    _, hv = chat(model, tok, "Again?", pix, [1, 1], hv, video=True, max_new_tokens=5)
    assert hv == [("Frame1: <image>\nFrame2: <image>\nWhat happens?", "a fall"), ("Again?", "no")]
