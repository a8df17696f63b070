"""Held-out evaluation: greedy answers to questions with exact answers, and perplexity on pure text.

    items = load_eval_items("data/toy/eval/eval.jsonl")
    res = evaluate(model, tok, items)  # {"types": {type: {"accuracy", "n", "correct"}}, "examples"}
    ppl = text_perplexity(model, tok, "data/toy/eval/text.jsonl")

Answers are graded by the project's one rule, `critic.is_correct` (the last "The answer is X."
line, or the whole reply, normalised).
Tests: python -m pytest -q tests/test_train.py"""

import math
import os
from collections import Counter

import torch

from nanovl3.chat import render_prompt
from nanovl3.common import UserError, read_jsonl
from nanovl3.critic import is_correct
from nanovl3.generate import generate
from nanovl3.image import load_images
from nanovl3.losses import lm_loss


def load_eval_items(path: str) -> list[dict]:
    """eval.jsonl lines {image (path | list | absent), question, answer, type, cot}; image paths
    relative to the file."""
    root = os.path.dirname(os.path.abspath(path))
    items = []
    for lineno, d in read_jsonl(path):
        missing = [k for k in ("question", "answer", "type") if k not in d]
        if missing:
            raise UserError(f"{path}:{lineno}: eval line is missing {', '.join(missing)}")
        images = d.get("image") or []
        images = [images] if isinstance(images, str) else images
        items.append({**d, "image": [os.path.join(root, p) for p in images]})
    if not items:
        raise UserError(f"{path}: no evaluation questions")
    return items


@torch.no_grad()
def text_perplexity(model, tok, path: str, limit: int = 200) -> float:
    """exp(mean next-token CE) on the first `limit` held-out pure-text jsonl lines {"text": ...}."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses, n = 0.0, 0
    for lineno, d in read_jsonl(path)[:limit]:
        if not isinstance(d.get("text"), str):
            raise UserError(f"{path}:{lineno}: a text line needs a 'text' string")
        ids = torch.tensor([tok.encode(d["text"]) + [tok.endoftext_id]], device=device)  # [1, T]
        losses += lm_loss(model(ids), ids).item() * (ids.size(1) - 1)
        n += ids.size(1) - 1
    model.train(was_training)
    return math.exp(losses / max(n, 1))


@torch.no_grad()
def evaluate(model, tok, items: list[dict], batch_size: int = 16, max_per_type: int = -1,
             short_tokens: int = 8, cot_tokens: int = 96, v2pe_delta: float = 1.0) -> dict:
    """Greedy answers to held-out questions -> {type: {"accuracy", "n", "correct"}} (+ "examples").
    Questions are batched (left padding); chain-of-thought questions get a longer budget and are
    scored on their final 'The answer is X.' line."""
    cfg = model.cfg
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    if max_per_type > 0:  # the first max_per_type questions of each type
        seen, kept = Counter(), []
        for it in items:
            seen[it["type"]] += 1
            if seen[it["type"]] <= max_per_type:
                kept.append(it)
        items = kept
    was_training = model.training
    model.eval()
    results, examples = {}, []
    for cot in (False, True):
        group = [it for it in items if bool(it.get("cot")) == cot]
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            prompts, tiles = [], []
            for it in batch:
                t, num_tiles = load_images(it["image"], cfg, split=True)  # the budget as trained
                tiles += t
                prompts.append(tok.encode(render_prompt(it["question"], num_tiles,
                                                        cfg.num_image_token)))
            pix = torch.cat(tiles).to(device=device, dtype=dtype) if tiles else None
            outs = generate(model, prompts, pix, max_new_tokens=cot_tokens if cot else short_tokens,
                            stop_ids=tok.stop_ids, v2pe_delta=v2pe_delta)
            for it, out in zip(batch, outs):
                text = tok.decode(out)
                r = results.setdefault(it["type"], {"n": 0, "correct": 0})
                r["n"] += 1
                r["correct"] += int(is_correct(text, it["answer"]))
                if len(examples) < 4 or (cot and len(examples) < 6):
                    examples.append({"question": it["question"], "answer": it["answer"],
                                     "response": text})
    for r in results.values():
        r["accuracy"] = r["correct"] / r["n"]
    model.train(was_training)
    return {"types": results, "examples": examples}
