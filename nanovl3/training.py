"""
The pieces every training script shares (train.py for pre-training and SFT, mpo.py for preference training):
torchrun/DDP setup, parameter groups (freeze, per-group learning rates), warmup + cosine schedule, atomic resumable
checkpoints, the dense log line + JSONL metrics, MFU, and held-out evaluation.

Nothing here owns a training loop: each script reads top to bottom as args -> init -> data -> model -> loop.
"""

import json
import math
import os
import random
import time
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist

from nanovl3.common import UserError, atomic_path, print0
from nanovl3.losses import lm_loss

# -----------------------------------------------------------------------------
# distributed (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)


def dist_init(device_name: str | None = None):
    """-> (ddp, rank, world_size, device). gloo on CPU, nccl on CUDA; a plain run is rank 0 of 1."""
    from nanovl3.common import pick_device
    if "RANK" not in os.environ:
        return False, 0, 1, pick_device(device_name)
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True, rank, world, device


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


# -----------------------------------------------------------------------------
# parameters and optimizer

GROUPS = {"vit": "vision_model.", "mlp": "mlp1.", "llm": "language_model."}


def param_groups(model, freeze: set[str], lrs: dict[str, float], weight_decay: float) -> list[dict]:
    """AdamW groups per module (vit / mlp / llm), each with its own lr; decay only on matrices.

    Frozen groups get requires_grad=False and no optimizer state.
    """
    bad = set(freeze) - set(GROUPS)
    if bad:
        raise UserError(f"--freeze: unknown part(s) {sorted(bad)} (use a comma list of {', '.join(GROUPS)})")
    groups, seen = [], set()
    for name, prefix in GROUPS.items():
        decay, no_decay = [], []
        for pname, p in model.named_parameters():
            if not pname.startswith(prefix) or id(p) in seen:
                continue
            seen.add(id(p))  # tied embeddings appear twice
            p.requires_grad_(name not in freeze)
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": lrs[name], "base_lr": lrs[name], "weight_decay": wd,
                               "name": name})
    if not groups:
        raise UserError("--freeze: every part is frozen; nothing to train")
    return groups


def make_optimizer(groups, device, betas=(0.9, 0.95)):
    return torch.optim.AdamW(groups, betas=betas, eps=1e-8, fused=device.type == "cuda")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0 (the official recipe: cosine, warmup_ratio 0.03)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, factor: float):
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


# -----------------------------------------------------------------------------
# checkpoints: a directory sample.py loads directly + the training state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, model, tokenizer, train_state: dict):
    """Write `path/` atomically: config.json + model.safetensors (original layout) + tokenizer.json + train_state.pt.

    Written into a temporary directory and renamed into place, so a crash or Ctrl-C mid-write leaves the previous
    checkpoint intact and loadable.
    """
    with atomic_path(path) as tmp:
        model.save_pretrained(tmp, layout="original", tokenizer=tokenizer)
        torch.save(train_state, os.path.join(tmp, "train_state.pt"))


def data_config(cfg, max_tiles: int, max_seq_len: int):
    """The DataConfig a model config implies (tile size, tokens per tile, thumbnail); max_tiles -1 = the config's."""
    from nanovl3.data import DataConfig
    return DataConfig(tokens_per_tile=cfg.num_image_token, image_size=cfg.vision.image_size,
                      max_dynamic_patch=cfg.max_dynamic_patch if max_tiles < 0 else max_tiles,
                      use_thumbnail=cfg.use_thumbnail, max_seq_len=max_seq_len)


def save_run(path: str, model, tokenizer, stream, train_state: dict, rank: int, world: int):
    """save_checkpoint from rank 0 with every rank's data cursor and RNG state (each rank draws its own data).
    Every rank must call it (it gathers)."""
    data, rngs = [stream.state_dict()], [rng_state()]
    if world > 1:
        data, rngs = [None] * world, [None] * world
        dist.all_gather_object(data, stream.state_dict())
        dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        save_checkpoint(path, model, tokenizer, {**train_state, "data": data, "rng": rngs, "world_size": world})
    if world > 1:
        dist.barrier()


def restore_run(state: dict, optimizer, stream, rank: int, world: int):
    """The other half of save_run: optimizer, this rank's data cursor and RNG state."""
    if state["world_size"] != world:
        raise UserError(f"--resume: the checkpoint was written by {state['world_size']} processes, this run has "
                        f"{world}; resume with the same number")
    optimizer.load_state_dict(state["optimizer"])
    stream.load_state_dict(state["data"][rank])
    set_rng_state(state["rng"][rank])


def load_train_state(path: str) -> dict:
    f = os.path.join(path, "train_state.pt")
    if not os.path.isfile(f):
        raise UserError(f"--resume: {path} has no train_state.pt (not a training checkpoint)")
    return torch.load(f, map_location="cpu", weights_only=False)


# -----------------------------------------------------------------------------
# logging


def flops_per_token(cfg) -> float:
    """Training FLOPs per LLM token, 6 * LLM parameters + attention (nanoGPT's estimate); the ViT is counted per tile."""
    t = cfg.text
    per_layer = 2 * t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim \
        + 3 * t.hidden_size * t.intermediate_size
    return 6 * (t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size)


def flops_per_tile(cfg) -> float:
    v = cfg.vision
    P = (v.image_size // v.patch_size) ** 2 + 1
    per_layer = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size
    return 6 * P * v.num_hidden_layers * (per_layer + 2 * P * v.hidden_size)


def measure_peak_flops(device, dtype=torch.float32, n=1024, reps=10, trials=5) -> float:
    """Matmul FLOP/s of this machine, measured (for an honest MFU): the best of a few trials, since a shared host
    that is busy for a moment would otherwise understate the peak and overstate MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.time() - t))
    return best


class Logger:
    """One dense line per interval on rank 0, and every record appended to metrics.jsonl."""

    def __init__(self, out_dir: str, rank: int):
        self.rank = rank
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)

    def log(self, record: dict, line: str | None = None):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if line:
            print0(line)


# -----------------------------------------------------------------------------
# evaluation on held-out questions with exact answers


def load_eval_items(path: str) -> list[dict]:
    """eval.jsonl lines {image (path | list | absent), question, answer, type, cot}; image paths relative to the file."""
    from nanovl3.data import read_jsonl
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
    """exp(mean next-token CE) on held-out pure text: jsonl lines {"text": ...}, the first `limit` of them."""
    from nanovl3.data import read_jsonl
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

    Questions are batched (left padding); chain-of-thought questions get a longer budget and are scored on their
    final 'The answer is X.' line.
    """
    from nanovl3.chat import render_prompt
    from nanovl3.critic import is_correct
    from nanovl3.generate import generate
    from nanovl3.image import load_images
    cfg = model.cfg
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if max_per_type > 0:  # the first max_per_type questions of each type
        seen = Counter()
        kept = []
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
                prompts.append(tok.encode(render_prompt(it["question"], num_tiles, cfg.num_image_token)))
            pix = torch.cat(tiles).to(device=device, dtype=dtype) if tiles else None
            outs = generate(model, prompts, pix, max_new_tokens=cot_tokens if cot else short_tokens,
                            stop_ids=tok.stop_ids, v2pe_delta=v2pe_delta)
            for it, out in zip(batch, outs):
                text = tok.decode(out)
                ok = is_correct(text, it["answer"])  # the project's one grading rule (critic.py)
                r = results.setdefault(it["type"], {"n": 0, "correct": 0})
                r["n"] += 1
                r["correct"] += int(ok)
                if len(examples) < 4 or (cot and len(examples) < 6):
                    examples.append({"question": it["question"], "answer": it["answer"], "response": text})
    for r in results.values():
        r["accuracy"] = r["correct"] / r["n"]
    model.train(was_training)
    return {"types": results, "examples": examples}
