"""
Ask an InternVL3 checkpoint about images (or plain text). Only the answer goes to stdout, streamed
as it is generated; everything else (prompt, timing, scores) goes to stderr.

    python sample.py --ckpt InternVL3-1B --image photo.jpg --prompt "Describe the image."
    python sample.py --ckpt InternVL3-1B-hf --image a.png --image b.png --prompt "What differs?" \
        --show-prompt
    python sample.py --ckpt out/toy --prompt "What is 2 + 3?" --temperature 0.7 --top-p 0.9 --seed 1
    python sample.py --ckpt InternVL3-8B --image q.png --prompt "..." --best-of 8 \
        --temperature 0.7 --critic VisualPRM-8B
    printf 'What is it?\nWhat colour?\n' | python sample.py --ckpt InternVL3-1B --image a.png --chat
    python sample.py --ckpt InternVL3-1B --video clip.gif --num-frames 8 --prompt "What happens?"
    python sample.py --ckpt InternVL3-1B --image a.png --prompt "Find <ref>the cat</ref>" \
        --draw-boxes boxes.png

--chat: each stdin line is a user turn; each answer (stripped) is one stdout line; EOF ends it.
Every turn re-renders the conversation as upstream `chat` with `history` (generate.chat); the
images attach to the first turn. A prompt marker, streaming and timings only when stdin is a tty.
--video: uniformly sampled frames of an animated GIF / WebP / APNG or a directory of frames, one
tile each, asked as "Frame1: <image>\n..." (the InternVL3 model card's `load_video`).
--draw-boxes: the answer's <ref>label</ref><box>[[x1, y1, x2, y2]]</box> boxes (0..1000 of the
image, InternVL's grounding format) drawn on the first image; malformed boxes are reported.

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

from nanovl3.chat import Tokenizer, add_image_tags, parse_boxes, render_prompt
from nanovl3.common import (ArgumentParser, UserError, atomic_path, check_values, eprint,
                            user_errors)
from nanovl3.critic import best_of_n, final_answer, load_critic, score_responses
from nanovl3.generate import SAMPLING_RULES, chat, generate
from nanovl3.image import draw_boxes, find_grid, load_images, load_video, open_image, tile_budget
from nanovl3.model import InternVL

# -----------------------------------------------------------------------------
# arguments

parser = ArgumentParser(description="Sample from an InternVL3 checkpoint.")
parser.add_argument("--ckpt", required=True,
                    help="checkpoint directory (config.json, safetensors, tokenizer.json)")
parser.add_argument("--image", action="append", default=[],
                    help="image file; repeat for several images")
parser.add_argument("--prompt",
                    help="the question; <image> tags place images (else they go first)")
parser.add_argument("--chat", action="store_true",
                    help="multi-turn: one question per stdin line, one answer per stdout line, "
                         "e.g. printf 'Q1\\nQ2\\n' | python sample.py --ckpt C --chat")
parser.add_argument("--video", metavar="PATH",
                    help="animated GIF / WebP / APNG or a directory of frame images, "
                         "e.g. --video clip.gif --prompt 'What happens?'")
parser.add_argument("--num-frames", type=int, default=8, metavar="N",
                    help="--video frames sampled uniformly (default 8), e.g. --num-frames 16")
parser.add_argument("--draw-boxes", metavar="OUT.png",
                    help="draw the answer's <ref>label</ref><box>[[x1, y1, x2, y2]]</box> boxes "
                         "(0-1000) on the first image, e.g. --draw-boxes boxes.png")
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
                    help="most tiles per image, thumbnail excluded (-1 = the checkpoint's "
                         "max_dynamic_patch)")
parser.add_argument("--split-tiles", action=argparse.BooleanOptionalAction,
                    help="share --max-tiles among the images as training does, or give every "
                         "image all of it as the model card does (default: the checkpoint's "
                         "split_tiles; true for toy checkpoints)")
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
    """Print row 0's text as it grows, holding back a trailing partial UTF-8 character (BPE);
    echo=False only collects the ids."""

    def __init__(self, tok: Tokenizer, stop_ids, echo: bool = True):
        self.tok, self.stop, self.ids, self.printed, self.done = tok, set(stop_ids), [], "", False
        self.echo = echo
        self.t_first, self.n = None, 0  # 1st token ends prefill; n counts every sampled one

    def __call__(self, tokens):
        self.n += 1
        if self.t_first is None:
            self.t_first = time.time()
        if self.done or tokens[0] in self.stop:
            self.done = True
            return
        self.ids.append(tokens[0])
        if not self.echo:
            return
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def finish(self):
        """The rest, with the newline: a held-back byte that never completed prints as U+FFFD."""
        if self.echo:
            sys.stdout.write(self.tok.decode(self.ids)[len(self.printed):])
        sys.stdout.write("\n")
        sys.stdout.flush()


def sampling() -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, compile=args.compile)


def load_visual(cfg, show: bool = False) -> tuple[torch.Tensor | None, list[int]]:
    """--image files or --video frames -> (tiles [N,3,S,S] fp32 or None, tiles per image), cut
    for config `cfg` (its tile size; --max-tiles); show=True lists what was cut on stderr."""
    if args.video:
        frames, index, total = load_video(args.video, args.num_frames, cfg.vision.image_size)
        if show:
            eprint(f"video {os.path.basename(args.video)}: {total} frames -> frames {index}, "
                   f"1 tile each = {cfg.num_image_token} image tokens per frame")
        return frames, [1] * len(index)
    max_num = None if args.max_tiles < 0 else args.max_tiles
    tiles, num_tiles = load_images(args.image, cfg, max_num, args.split_tiles)
    per_image = tile_budget(cfg, len(args.image), max_num, args.split_tiles)
    for k, (path, n) in enumerate(zip(args.image, num_tiles) if show else []):
        w, h = Image.open(path).size
        cols, rows = find_grid(w, h, 1, per_image, cfg.vision.image_size)
        thumb = " + thumbnail" if n > cols * rows else ""
        eprint(f"image {k + 1}: {os.path.basename(path)} {w}x{h} -> {cols}x{rows} "
               f"tiles{thumb} = {n} tiles, {n * cfg.num_image_token} image tokens")
    return (torch.cat(tiles) if tiles else None), num_tiles


def box_format() -> str:
    ext = os.path.splitext(args.draw_boxes)[1].lower()
    if ext not in Image.registered_extensions():
        raise UserError(f"--draw-boxes {args.draw_boxes}: unknown image extension (use .png)")
    return Image.registered_extensions()[ext]


def draw_answer(tok, ids: list[int]):
    """--draw-boxes: the answer's grounding boxes on the first image, written atomically."""
    # decoded with special tokens kept: <ref> and <box> are added tokens in InternVL's tokenizer
    boxes, problems = parse_boxes(tok.decode(ids, skip_special_tokens=False))
    for p in problems:
        eprint(f"warning: --draw-boxes: skipped a malformed box: {p}")
    img = draw_boxes(open_image(args.image[0]), boxes)
    with atomic_path(args.draw_boxes) as tmp:
        img.save(tmp, format=box_format())
    eprint(f"drew {len(boxes)} boxes on {args.image[0]} -> {args.draw_boxes}")


def chat_loop(model, tok, pixel_values, num_tiles):
    """--chat: one turn per stdin line until EOF; only the answers go to stdout."""
    tty, history = sys.stdin.isatty(), []
    while True:
        if tty:
            eprint("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF (Ctrl-D in a terminal)
            if tty:
                eprint()  # end the "> " line
            break
        question = add_image_tags(line.rstrip("\n").rstrip("\r"), len(num_tiles), history,
                                  video=bool(args.video))
        if args.show_prompt:
            eprint(render_prompt(question, num_tiles, history=history,
                                 system_message=model.cfg.system_message, expand=False))
        printer, t1 = StreamPrinter(tok, tok.stop_ids, echo=tty), time.time()
        answer, history = chat(model, tok, question, pixel_values, num_tiles, history,
                               stream=printer, **sampling())
        if not tty:
            sys.stdout.write(answer)  # a terminal saw it streamed
        printer.finish()  # flushed: a calling program waits for this line to write the next
        if tty:
            eprint(f"[{printer.n} tokens in {time.time() - t1:.2f}s]")
        if args.draw_boxes:
            draw_answer(tok, printer.ids)


def best_of(model, tok, ids, pixel_values, question, critic) -> list[int]:
    """Sample --best-of answers in one batch (no streaming); print the one the critic rates best
    and return its ids."""
    n = args.best_of
    t1 = time.time()
    rows = generate(model, [ids], pixel_values, stop_ids=tok.stop_ids, num_samples=n,
                    **sampling())
    answers = [tok.decode(r) for r in rows]
    t2 = time.time()

    # the critic sees the question as the policy did, <image> tags in place; a PRM cuts the tiles
    # for its own config
    prm_pixels, prm_tiles = None, []
    if critic.model is not None and (args.image or args.video):
        weight = critic.model.language_model.lm_head.weight
        prm_pixels, prm_tiles = load_visual(critic.model.cfg)
        prm_pixels = prm_pixels.to(device=weight.device, dtype=weight.dtype)
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
    return rows[best]


def check_flags():
    """Every flag's value, before the model loads; sampling flags by generate's own rules."""
    flags = {"--temperature": "temperature", "--top-k": "top_k", "--top-p": "top_p",
             "--max-new-tokens": "max_new_tokens", "--best-of": "num_samples"}
    check_values({**{f: SAMPLING_RULES[k] for f, k in flags.items()},
                  "--max-tiles": (lambda v: v >= 1 or v == -1,
                                  "at least 1 (or -1 = the checkpoint's max_dynamic_patch)"),
                  "--num-frames": (lambda v: v >= 1, "at least 1")}, args)
    if args.best_of > 1 and args.temperature <= 0:
        raise UserError(f"--best-of {args.best_of} needs --temperature > 0 (greedy answers would "
                        "all be the same)")
    if args.chat and args.best_of > 1:
        raise UserError("--chat cannot be combined with --best-of (Best-of-N answers one --prompt)")
    if args.chat and args.prompt is not None:
        raise UserError("--chat reads the questions from stdin, one per line: drop --prompt")
    if not args.chat and args.prompt is None:
        raise UserError("--prompt is required (or --chat to read questions from stdin)")
    if args.video and args.image:
        raise UserError("--video cannot be combined with --image")
    if args.draw_boxes and not args.image:
        raise UserError("--draw-boxes needs an --image to draw on")
    if args.draw_boxes:
        box_format()  # a bad extension fails now, before the model loads


def main():
    check_flags()
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

    # ---- images or video frames -> tiles
    context, frame_tokens = cfg.text.max_position_embeddings, args.num_frames * cfg.num_image_token
    if args.video and frame_tokens >= context:  # before decoding hundreds of frames
        raise UserError(f"--num-frames {args.num_frames}: {frame_tokens} image tokens "
                        f"({cfg.num_image_token} per frame) do not fit the model's context of "
                        f"{context} tokens")
    pixel_values, num_tiles = load_visual(cfg, show=args.show_prompt)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device=device, dtype=dtype)
    if args.chat:
        chat_loop(model, tok, pixel_values, num_tiles)
        return

    # ---- prompt
    question = add_image_tags(args.prompt, len(num_tiles), video=bool(args.video))
    ids = tok.encode(render_prompt(question, num_tiles, cfg.num_image_token,
                                   system_message=cfg.system_message))
    if args.show_prompt:
        eprint(render_prompt(question, num_tiles, system_message=cfg.system_message,
                             expand=False))
        eprint(f"prompt: {len(ids)} tokens")

    if args.best_of > 1:
        best = best_of(model, tok, ids, pixel_values, question, critic)
        if args.draw_boxes:
            draw_answer(tok, best)
        return

    # ---- generate, streaming row 0 to stdout
    printer = StreamPrinter(tok, tok.stop_ids)
    t1 = time.time()
    generate(model, [ids], pixel_values, stop_ids=tok.stop_ids, stream=printer, **sampling())
    t2 = time.time()
    printer.finish()
    n_decode = printer.n - 1  # the first token came from prefill
    eprint(f"[prefill {len(ids)} tokens: {printer.t_first - t1:.2f}s | decode {n_decode} tokens: "
           f"{n_decode / max(t2 - printer.t_first, 1e-9):.1f} tokens/s]")
    if args.draw_boxes:
        draw_answer(tok, printer.ids)


if __name__ == "__main__":
    with user_errors():
        main()
