"""
Generation: prefill once into a preallocated KV cache, then decode one token at a time.

    generate(model, prompts, pixel_values, ...) -> list of new-token lists, one per row

- prompts of different lengths are left-padded; padding is its own "document" (id -1) that real
  tokens never attend to, and positions count real tokens only (as transformers does).
- num_samples > 1 (Best-of-N): the prompt is prefilled ONCE and its cache rows copied N times.
- sampling: greedy (temperature 0), temperature, top-k, top-p; row r has its own generator seeded
  seed + r, so a row samples the same tokens alone or in a batch.
- eager decode (nanovl3.fast's CPU paths) reads only the written slots (Mask.kv_len). compile=True
  keeps fixed shapes, compiled once per cache size rounded up to 256 slots.
- the only host syncs: streaming and stop checks (every step; every 8 on CUDA unless streaming).
- chat(): one turn of a multi-turn conversation, as upstream `chat` with `history`.
Shapes: B prompts, R = B*num_samples rows, L padded prompt length, S = L+max_new_tokens, V vocab"""

import math
from numbers import Integral, Real
from typing import Callable

import torch

from nanovl3.attention import Mask, causal_mask
from nanovl3.chat import add_image_tags, render_prompt
from nanovl3.common import UserError, check_values
from nanovl3.fast import speed_up
from nanovl3.model import v2pe_position_ids
from nanovl3.text import KVCache


# what each sampling keyword accepts; sample.py checks its flags against the same rules
SAMPLING_RULES = {
    "max_new_tokens": (lambda v: isinstance(v, Integral) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: isinstance(v, Real) and 0 <= v < math.inf,
                    "a finite number >= 0 (0 = greedy)"),
    "top_k": (lambda v: isinstance(v, Integral) and v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (lambda v: isinstance(v, Real) and 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "num_samples": (lambda v: isinstance(v, Integral) and v >= 1, "an integer >= 1"),
}


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generators) -> torch.Tensor:
    """logits fp32 [R,V] -> next token ids [R]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # [R, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when those ranked above it already cover top_p of the mass (the first stays)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(probs[r], 1, generator=g)
                      for r, g in enumerate(generators)])


def left_pad(prompts: list[list[int]], device, v2pe_delta: float = 1.0, image_token_id: int = -1):
    """-> ids [B,L], positions [B,L] (real 0..n-1, padding 1), doc [B,L] (0 real, -1 padding).
    v2pe_delta < 1: V2PE positions, each visual token advancing by δ (float)."""
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    doc = torch.full((len(prompts), L), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        doc[i, L - len(p):] = 0
    real = doc == 0
    positions = (real.cumsum(-1) - 1).masked_fill(~real, 1)
    if v2pe_delta != 1.0:
        positions = positions.float()
        for i, p in enumerate(prompts):
            positions[i, L - len(p):] = v2pe_position_ids(ids[i, L - len(p):], image_token_id,
                                                          v2pe_delta)
    return ids.to(device), positions.to(device), doc.to(device)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], pixel_values: torch.Tensor | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_ids=(), num_samples: int = 1,
             stream: Callable[[list[int]], None] | None = None, compile: bool = False,
             v2pe_delta: float = 1.0) -> list[list[int]]:
    """Sample up to max_new_tokens after each prompt -> each row's new tokens, cut before a stop.
    pixel_values [N,3,S,S]: the tiles of every image of every prompt, in prompt order. Rows are
    prompt-major: row r = prompt r // num_samples, sample r % num_samples. stream(tokens) is called
    after every step with each row's token just sampled. v2pe_delta: the fixed V2PE δ of every
    image (1 = plain positions, as the released checkpoints use)."""
    check_values(SAMPLING_RULES, dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_k=top_k, top_p=top_p, num_samples=num_samples),
                 ValueError)
    if not prompts or not all(len(p) for p in prompts):
        raise ValueError("prompts: need at least one prompt, each of at least one token id")
    speed_up(model)
    weight = next(model.parameters())
    device = weight.device
    if pixel_values is not None:  # image.py gives fp32 tiles on the CPU; the model may differ
        pixel_values = pixel_values.to(device, weight.dtype)
    ids, positions, doc = left_pad(prompts, device, v2pe_delta, model.cfg.image_token_id)
    B, L = ids.shape
    S = L + max_new_tokens
    if S > (limit := model.cfg.text.max_position_embeddings):
        raise UserError(f"prompt too long: {L} prompt tokens + {max_new_tokens} new tokens = {S} > "
                        f"the model's context of {limit} tokens (shorten the prompt, use fewer "
                        "tiles or frames, or lower --max-new-tokens)")
    # ---- prefill: the whole prompt in one forward, keys/values written to slots 0..L-1
    x = model.embed(ids, pixel_values)  # [B, L, C]
    # a compiled step is specialised to the cache size: rounded up, similar prompt lengths share one
    cache = KVCache(model.cfg.text, B, -(-S // 256) * 256 if compile else S, device, x.dtype)
    cache.doc[:, :L] = doc
    padded = bool((doc < 0).any())
    mask = causal_mask(B, L, device, doc if padded else None)
    h = model.language_model(x, positions, mask, cache, torch.arange(L, device=device),
                             prefill=True)
    logits = model.language_model.lm_head(h[:, -1]).float()  # [B, V]
    # ---- Best-of-N: copy each prompt's cache row num_samples times instead of prefilling it again
    if num_samples > 1:
        cache.repeat_rows(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        positions = positions.repeat_interleave(num_samples, dim=0)
    R = logits.size(0)
    generators = [torch.Generator(device=device).manual_seed(seed + r) for r in range(R)]
    step = model.step
    if compile and device.type == "cuda":
        step = torch.compile(model.step, mode="reduce-overhead")  # CUDA graphs: one launch per step
        for t in cache.k + cache.v + [cache.doc]:  # graphs replay fixed addresses: update in place
            torch._dynamo.mark_static_address(t)
    elif compile:
        # keeps fast.py's split matrix-vector products (a block of rows per core) without the eager
        # step's per-op Python. Freezing folds the weights' views; weights changed later still count
        step = torch.compile(model.step, options={"freezing": True})
    # ---- decode. Per-step tensors are updated in place: no allocation for mask, slot or positions.
    pos = positions[:, -1:].to(torch.float32, copy=True)  # [R, 1] last real position of each row
    slot = torch.tensor([L - 1], device=device)  # [1] the cache slot this step writes
    q_slot = torch.full((R, 1), L - 1, device=device)  # [R, 1] the same slot, per row (masks)
    doc_q = torch.zeros(R, 1, dtype=torch.long, device=device) if padded else None  # doc masks
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    check_every = 8 if device.type == "cuda" and stream is None else 1  # each check is a host sync
    out, done = [], torch.zeros(R, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generators)  # [R]
        out.append(nxt)
        if stream is not None:
            stream(nxt.tolist())
        if t == max_new_tokens - 1:
            break
        if stop_ids:
            done |= torch.isin(nxt, stop)
            if (t + 1) % check_every == 0 and bool(done.all()):
                break
        slot += 1
        q_slot += 1
        pos += 1
        if padded:
            cache.doc[:, L + t] = 0
        x = model.language_model.model.embed_tokens(nxt[:, None])  # [R, 1, C]
        # eager: read slots 0..L+t only; compiled: the whole buffer, future slots masked (causal)
        mask = Mask(q_slot, doc_q, cache.doc if padded else None,
                    kv_len=None if compile else L + t + 1)
        logits = step(x, pos, mask, cache, slot)
    stop_set = set(stop_ids)
    return [row[:next((i for i, tok in enumerate(row) if tok in stop_set), len(row))]
            for row in torch.stack(out, dim=1).tolist()]  # [R, t]


def chat(model, tok, question: str, pixel_values: torch.Tensor | None = None,
         num_tiles: list[int] = (), history: list[tuple[str, str]] = (), video: bool = False,
         **sampling) -> tuple[str, list[tuple[str, str]]]:
    """One turn -> (answer, history + [(question, answer)]), as upstream `chat` with `history`: the
    whole conversation is rendered and tokenised afresh (no KV cache carried across turns). The
    images (all tiles, every turn) belong to the first turn: their tags go in its question
    (add_image_tags; video: Frame1..N). sampling: generate's keywords (max_new_tokens, ...)."""
    question = add_image_tags(question, len(num_tiles), history, video)
    prompt = render_prompt(question, list(num_tiles), model.cfg.num_image_token, history,
                           model.cfg.system_message)
    new = generate(model, [tok.encode(prompt)], pixel_values, stop_ids=tok.stop_ids, **sampling)[0]
    answer = tok.decode(new).strip()  # upstream: batch_decode(skip_special_tokens), cut, strip
    return answer, list(history) + [(question, answer)]
