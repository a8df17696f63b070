"""
Ask an InternVL3 checkpoint about images (or plain text). Only the answer goes to stdout, streamed
as it is generated; everything else (prompt, timing, scores) goes to stderr.

    python sample.py --ckpt InternVL3-1B --image photo.jpg --prompt "Describe the image."
    python sample.py --ckpt InternVL3-1B-hf --image a.png --image b.png --prompt "What differs?" \
        --show-prompt
    python sample.py --ckpt out/toy --prompt "What is 2 + 3?" --temperature 0.7 --top-p 0.9 --seed 1
    python sample.py --ckpt InternVL3-8B --image q.png --prompt "..." --best-of 8 \
        --temperature 0.7 --critic VisualPRM-8B

Best-of-N (InternVL3 §2.4): --best-of N samples N answers in one batch (prompt prefilled once); a
critic scores them (majority vote, or a VisualPRM-style checkpoint: mean step score; outcome:PATH =
last step; vote:PATH = majority weighted by mean step score); the best is printed. --show-scores
lists every candidate on stderr.

Reads either checkpoint layout (OpenGVLab's or transformers' -hf), one file or shards, locally.
"""

import argparse
import os
import sys
import time

import torch
from PIL import Image

from nanovl3.chat import ASSISTANT, SEP, USER, Tokenizer, render_prompt
from nanovl3.common import UserError, eprint, user_errors
from nanovl3.critic import best_of_n, final_answer, load_critic, score_responses
from nanovl3.generate import generate
from nanovl3.image import find_grid, load_images
from nanovl3.model import InternVL

# -----------------------------------------------------------------------------
# arguments

parser = argparse.ArgumentParser(description="Sample from an InternVL3 checkpoint.")
parser.add_argument("--ckpt", required=True,
                    help="checkpoint directory (config.json, safetensors, tokenizer.json)")
parser.add_argument("--image", action="append", default=[],
                    help="image file; repeat for several images")
parser.add_argument("--prompt", required=True,
                    help="the question; <image> tags place images (else they go first)")
# sampling
parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
parser.add_argument("--max-new-tokens", type=int, default=512, help="most tokens to generate")
parser.add_argument("--seed", type=int, default=0, help="sampling seed")
# Best-of-N
parser.add_argument("--best-of", type=int, default=1,
                    help="sample N answers and print the one the critic prefers")
parser.add_argument("--critic", default="majority",
                    help="majority | PRM checkpoint dir (mean step score) | outcome:DIR (last "
                         "step's score) | vote:DIR (majority vote weighted by the mean step score)")
parser.add_argument("--show-scores", action="store_true",
                    help="with --best-of: list every candidate on stderr")
# images
parser.add_argument("--max-tiles", type=int, default=-1,
                    help="most 448-px tiles per image, thumbnail excluded (-1 = the checkpoint's "
                         "max_dynamic_patch)")
parser.add_argument("--split-tiles", action="store_true",
                    help="share --max-tiles among the images as training does (toy checkpoints), "
                         "instead of the model card's full budget for every image")
# runtime
parser.add_argument("--device", default=None,
                    help="cpu | cuda | cuda:N (default: cuda if available)")
parser.add_argument("--dtype", default=None,
                    help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
parser.add_argument("--show-prompt", action="store_true",
                    help="print the rendered prompt and token counts to stderr")
args = parser.parse_args()


class StreamPrinter:
    """Print row 0's text as it grows, holding back a trailing partial UTF-8 character (BPE)."""

    def __init__(self, tok: Tokenizer, stop_ids):
        self.tok, self.stop, self.ids, self.printed, self.done = tok, set(stop_ids), [], "", False
        self.t_first, self.n = None, 0  # 1st token ends prefill; n counts every sampled one

    def __call__(self, tokens):
        self.n += 1
        if self.t_first is None:
            self.t_first = time.time()
        if self.done or tokens[0] in self.stop:
            self.done = True
            return
        self.ids.append(tokens[0])
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def load_tiles(paths: list[str], cfg) -> tuple[list[torch.Tensor], list[int]]:
    """Image files -> tiles [N_k,3,S,S] per image and N_k, cut for config `cfg` and --max-tiles."""
    return load_images(paths, cfg, None if args.max_tiles < 0 else args.max_tiles,
                       split=args.split_tiles)


def best_of(model, tok, ids, pixel_values, critic):
    """Sample --best-of answers in one batch (no streaming); print the one the critic rates best."""
    n = args.best_of
    t1 = time.time()
    rows = generate(model, [ids], pixel_values, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, stop_ids=tok.stop_ids, num_samples=n, compile=args.compile)
    answers = [tok.decode(r) for r in rows]
    t2 = time.time()

    # the critic sees the question as the policy did, <image> tags in place: cut from the unexpanded
    # prompt (ending USER + question + SEP + ASSISTANT), so images that render_prompt put first stay
    shown = render_prompt(args.prompt, [1] * len(args.image), expand=False)
    question = shown[shown.rindex(USER) + len(USER):-len(SEP + ASSISTANT)]
    prm_pixels, prm_tiles = None, []
    if critic.model is not None and args.image:  # the PRM cuts tiles for its own config
        weight = critic.model.language_model.lm_head.weight
        tiles, prm_tiles = load_tiles(args.image, critic.model.cfg)
        prm_pixels = torch.cat(tiles).to(device=weight.device, dtype=weight.dtype)
    scores = score_responses(critic, question, answers, prm_pixels, prm_tiles)
    best = best_of_n(scores)
    t3 = time.time()

    sys.stdout.write(answers[best] + "\n")
    if args.show_scores:
        for i, (a, s) in enumerate(zip(answers, scores)):
            mark = "*" if i == best else " "
            eprint(f"{mark} candidate {i}: score {s:.4f} | answer {final_answer(a)[:40]!r} | "
                   f"{a[:80]!r}")
    eprint(f"[best of {n}: sampled {sum(map(len, rows))} tokens in {t2 - t1:.2f}s | "
           f"critic {args.critic}: {t3 - t2:.2f}s | chose candidate {best}]")


def main():
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.best_of < 1:
        raise UserError("--best-of must be at least 1")
    if args.best_of > 1 and args.temperature <= 0:
        raise UserError(f"--best-of {args.best_of} needs --temperature > 0 (greedy answers would "
                        "all be the same)")
    t0 = time.time()
    model = InternVL.from_pretrained(args.ckpt, dtype=args.dtype, device=args.device)
    tok = Tokenizer.from_dir(args.ckpt)
    cfg = model.cfg
    device, dtype = (model.language_model.lm_head.weight.device,
                     model.language_model.lm_head.weight.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    eprint(f"loaded {args.ckpt}: {n_params / 1e6:.1f}M parameters, {dtype}, {device} "
           f"({time.time() - t0:.1f}s)")
    # loaded now, so that a bad --critic fails before sampling
    critic = load_critic(args.critic, args.dtype, args.device) if args.best_of > 1 else None

    # ---- images -> tiles
    max_tiles = cfg.max_dynamic_patch if args.max_tiles < 0 else args.max_tiles
    tiles, num_tiles = load_tiles(args.image, cfg)
    pixel_values = torch.cat(tiles).to(device=device, dtype=dtype) if tiles else None

    # ---- prompt
    prompt = render_prompt(args.prompt, num_tiles, tokens_per_tile=cfg.num_image_token)
    ids = tok.encode(prompt)
    if args.show_prompt:
        eprint(render_prompt(args.prompt, num_tiles, tokens_per_tile=cfg.num_image_token,
                             expand=False))
        for k, (path, n) in enumerate(zip(args.image, num_tiles)):
            w, h = Image.open(path).size
            cols, rows = find_grid(w, h, 1, max_tiles, cfg.vision.image_size)
            thumb = " + thumbnail" if n > cols * rows else ""
            eprint(f"image {k + 1}: {os.path.basename(path)} {w}x{h} -> {cols}x{rows} "
                   f"tiles{thumb} = {n} tiles, {n * cfg.num_image_token} image tokens")
        eprint(f"prompt: {len(ids)} tokens")

    if args.best_of > 1:
        best_of(model, tok, ids, pixel_values, critic)
        return

    # ---- generate, streaming row 0 to stdout
    printer = StreamPrinter(tok, tok.stop_ids)
    t1 = time.time()
    generate(model, [ids], pixel_values, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
             stop_ids=tok.stop_ids, stream=printer, compile=args.compile)
    t2 = time.time()
    sys.stdout.write("\n")
    n_decode = printer.n - 1  # the first token came from prefill
    eprint(f"[prefill {len(ids)} tokens: {printer.t_first - t1:.2f}s | decode {n_decode} tokens: "
           f"{n_decode / max(t2 - printer.t_first, 1e-9):.1f} tokens/s]")


if __name__ == "__main__":
    with user_errors():
        main()
