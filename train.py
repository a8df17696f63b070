"""
Train InternVL3: native multimodal pre-training, then SFT with InternVL2.5's techniques; one loop.

    python train.py --quick               # a minute on 2 CPU cores: small toy world -> runs/quick
    python train.py                       # the toy recipe, ~10 min on 2 CPU cores -> runs/toy
    python train.py --stage sft --init-from runs/toy/ckpt --sft-meta my/meta.json --sft-steps 2000
    torchrun --nproc-per-node 2 train.py  # DDP (gloo on CPU, nccl on CUDA), same script
    torchrun --nproc-per-node 8 train.py --fsdp --grad-checkpoint ...   # FSDP2: sharded states

Stages (InternVL3 §2.2-2.3, arXiv 2504.10479):
  pretrain  "native multimodal pre-training": all parameters trained jointly from the start on
            interleaved image-text documents mixed with pure text (language : multimodal = 1 : 3),
            loss on text tokens only; optional V2PE (a random visual position step δ per image).
  sft       loss on assistant tokens only, square-root averaging, random JPEG compression, samples
            packed per sequence, block-diagonal causal mask (InternVL2.5 §4, arXiv 2412.05271).
Checkpoints (`<out-dir>/ckpt`) load directly in sample.py and resume exactly with --resume.
"""

import argparse
import json
import os
import random
import sys
import time

import torch
from tqdm import tqdm

from data import toyworld
from nanovl3.chat import Tokenizer
from nanovl3.checkpoint import load_train_state
from nanovl3.common import ArgumentParser, UserError, print0, user_errors
from nanovl3.config import preset
from nanovl3.data import PackedStream, SampleStream, collate_packed, read_meta
from nanovl3.evaluate import evaluate, load_eval_items, text_perplexity
from nanovl3.layers import drop_path_rates
from nanovl3.losses import lm_loss, loss_weight_sum
from nanovl3.model import InternVL, v2pe_packed_positions
from nanovl3.training import (POSITIVE, Session, add_common_args, all_reduce_mean, data_config,
                              flops_per_tile, flops_per_token, lr_factor, make_optimizer,
                              measure_peak_flops, param_groups, set_lr)

# -----------------------------------------------------------------------------
# arguments

parser = ArgumentParser(description="nanovl3 training: native pre-training and SFT",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
add_common_args(parser, out_dir="runs/toy", lr=1e-3, log_interval=25, eval_per_type=100)
add = parser.add_argument
add("--stage", default="all", choices=["all", "pretrain", "sft"], help="all = pretrain, then SFT")
add("--quick", action="store_true",
    help="about a minute on 2 CPU cores: the defaults of QUICK below (flags given still win)")
# model
add("--preset", default="toy",
    help="model shape when training from scratch (toy, internvl3-1b, ...)")
add("--init-from", default="",
    help="start from a checkpoint directory (ours or official, any layout)")
add("--init-llm-from", default="",
    help="post-hoc style: take only the language model from this checkpoint "
         "(InternVL or Qwen2 dir)")
add("--drop-path", type=float, default=0.0, help="ViT stochastic depth rate (official SFT: 0.1)")
# data
add("--data-dir", default="data/toy", help="the toy world (generated here if absent)")
add("--pretrain-meta", default="", help="pre-training meta.json (default: <data-dir>/pretrain)")
add("--sft-meta", default="", help="SFT meta.json (default: <data-dir>/sft)")
add("--eval-file", default="",
    help="held-out questions jsonl ({image, question, answer, type} lines), or none (default: "
         "<data-dir>/eval/eval.jsonl on the toy world; none with --pretrain-meta/--sft-meta)")
add("--eval-text", default="",
    help="held-out pure text jsonl for perplexity, or none (default: the toy world's)")
add("--tokenizer", default="", help="tokenizer.json (default: <init-from> or <data-dir>)")
add("--text-ratio", type=float, default=0.25,
    help="pre-training share of pure-text samples (paper: language:multimodal = 1:3)")
# optimisation (the shared flags: nanovl3/training.py; --lr 3e-3 collapses the toy ViT)
add("--pretrain-steps", type=int, default=150, help="optimizer steps of native pre-training")
add("--sft-steps", type=int, default=1600, help="optimizer steps of SFT")
add("--max-packed-tokens", type=int, default=2048, help="tokens per packed sequence")
add("--max-packed-tiles", type=int, default=48, help="tiles per packed sequence")
add("--loss-reduction", default="square", choices=["token", "sample", "square"],
    help="per-token loss weight 1, 1/n or 1/sqrt(n) of a sample's n supervised tokens")
add("--lr-vit", type=float, default=-1, help="ViT learning rate (-1 = --lr)")
add("--lr-mlp", type=float, default=-1, help="projector learning rate (-1 = --lr)")
add("--lr-llm", type=float, default=-1, help="LLM learning rate (-1 = --lr)")
add("--v2pe", action="store_true",
    help="V2PE in the stages run: δ per image drawn from {1,...,1/256}; evaluation uses δ = 1")
add("--v2pe-delta", type=float, default=-1,
    help="a fixed V2PE δ instead of a random one, in training and in evaluation")
add("--eval-interval", type=int, default=-1,
    help="steps between evaluations, and at the end of each stage (-1 = only the final one)")
# --quick: a small world of its own, a few hundred steps, a small evaluation: the whole pipeline in
# under a minute. That teaches one skill, colour, so its SFT data is colour close-ups only (held-out
# colour 55-90% over three seeds against 17% chance, n = 20); the other types need the full run
QUICK = dict(data_dir="data/toy-quick", out_dir="runs/quick", pretrain_steps=20, sft_steps=200,
             max_packed_tokens=1024, lr_mlp=3e-3, lr_llm=3e-3, eval_per_type=20, log_interval=50)
FULL_RECIPE = ("the full recipe: python train.py, about 8 minutes on 2 CPU cores (colour 91-99%, "
               "shape 94-98%, counting 65-79% over three seeds)")
if parser.parse_known_args()[0].quick:
    parser.set_defaults(**QUICK)
args = parser.parse_args()

STAGES = {"all": ["pretrain", "sft"], "pretrain": ["pretrain"], "sft": ["sft"]}[args.stage]

# -----------------------------------------------------------------------------
# data paths, model


def resolve_paths(S: Session):
    """Fill default data paths from --data-dir, generating the toy world when it is absent; your
    own data (--pretrain-meta/--sft-meta) needs no toy world, and is evaluated only on an
    --eval-file you give."""
    d, toy = args.data_dir, not (args.pretrain_meta or args.sft_meta)
    if toy and S.rank == 0:
        toyworld.ensure(d, "quick" if args.quick else "full")
    if S.ddp:  # every rank waits here, whether or not it saw the data missing
        torch.distributed.barrier()
    args.pretrain_meta = args.pretrain_meta or os.path.join(d, "pretrain", "meta.json")
    args.sft_meta = args.sft_meta or os.path.join(d, "sft", "meta.json")
    if not args.eval_file:
        args.eval_file = os.path.join(d, "eval", "eval.jsonl") if toy else "none"
    if not args.eval_text and toy and os.path.isfile(os.path.join(d, "eval", "text.jsonl")):
        args.eval_text = os.path.join(d, "eval", "text.jsonl")
    for flag in ("eval_file", "eval_text"):
        if getattr(args, flag) == "none":
            setattr(args, flag, "")
    has_tok = args.init_from and os.path.isfile(os.path.join(args.init_from, "tokenizer.json"))
    args.tokenizer = args.tokenizer or (args.init_from if has_tok else d)


def build_model(tok: Tokenizer, device, resumed: str = "") -> InternVL:
    """The model to train: a resumed run's checkpoint (`resumed`), --init-from's, or a new one of
    --preset (and then --init-llm-from's language model)."""
    if resumed or args.init_from:
        model = InternVL.from_pretrained(resumed or args.init_from, dtype=torch.float32,
                                         device=device)
    else:
        cfg = preset(args.preset)
        cfg.text.vocab_size = tok.vocab_size  # the tokenizer decides the vocabulary
        cfg.text.bos_token_id, cfg.text.eos_token_id = tok.endoftext_id, tok.im_end_id
        torch.manual_seed(args.seed)
        model = InternVL(cfg).to(device)
        model.init_weights()
    cfg = model.cfg
    cfg.image_token_id = tok.img_context_id
    if tok.vocab_size > cfg.text.vocab_size:
        raise UserError(f"--tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
                        f"{cfg.text.vocab_size}")
    if args.init_llm_from and not resumed:
        load_llm_only(model, args.init_llm_from, device)
    cfg.vision.drop_path_rate = args.drop_path
    blocks = model.vision_model.encoder.layers
    for block, rate in zip(blocks, drop_path_rates(args.drop_path, len(blocks))):
        block.drop_path_rate = rate
    return model


def load_llm_only(model: InternVL, path: str, device):
    """Post-hoc recipe: keep our (new) ViT and projector, take a trained checkpoint's LLM."""
    src = InternVL.from_pretrained(path, dtype=torch.float32, device=device)
    if src.cfg.text != model.cfg.text:
        raise UserError(f"--init-llm-from {path}: its language model config differs from --preset "
                        f"{args.preset}")
    model.language_model.load_state_dict(src.language_model.state_dict())


def make_stream(S: Session, tok: Tokenizer, meta: str, text_ratio) -> PackedStream:
    specs = read_meta(meta)
    for spec in specs:
        if spec.kind == "preference":
            raise UserError(f"{meta}: dataset '{spec.name}' is preference data (chosen/rejected): "
                            "train it with mpo.py")
    dcfg = data_config(S.raw.cfg, args.max_tiles, args.max_seq_len)
    samples = SampleStream(specs, tok, dcfg, seed=args.seed, rank=S.rank, world_size=S.world,
                           text_ratio=text_ratio, skip_bad=args.skip_bad_samples)
    return PackedStream(samples, args.max_packed_tokens, args.max_packed_tiles)


# -----------------------------------------------------------------------------
# evaluation


def run_eval(S: Session, tok: Tokenizer, items: list, when: str) -> dict:
    if not items:
        return {}
    model = S.full_model(S.device)  # under FSDP every rank helps gather it
    if S.rank != 0:
        return {}
    t = time.time()
    res = evaluate(model, tok, items, max_per_type=args.eval_per_type,
                   v2pe_delta=args.v2pe_delta if args.v2pe_delta > 0 else 1.0)
    types_file = os.path.join(os.path.dirname(args.eval_file), "types.json")
    types = json.load(open(types_file)) if os.path.isfile(types_file) else {}
    for name, r in res["types"].items():
        r["chance"] = types.get(name, {}).get("chance")
    if args.eval_text:
        res["text_perplexity"] = text_perplexity(model, tok, args.eval_text)
    res["eval_seconds"] = time.time() - t
    ppl = f" | text ppl {res['text_perplexity']:.2f}" if "text_perplexity" in res else ""
    print0(f"eval ({when}, {res['eval_seconds']:.0f}s): " + " | ".join(
        f"{k} {100 * r['accuracy']:.0f}%" for k, r in sorted(res["types"].items())) + ppl)
    for ex in res["examples"][:3]:
        print0(f"  Q: {ex['question'].splitlines()[-1]!s:.70}  A: {ex['response'][:80]!r}  "
               f"(gold {ex['answer']})")
    S.logger.log({"eval": when, **{k: v for k, v in res.items() if k != "examples"}})
    return res


# -----------------------------------------------------------------------------
# one stage: a stream of packs -> optimizer steps


def out_of_steps(state: dict) -> bool:
    """--max-steps reached (a deliberately short run: tests, or a stop to be resumed)."""
    return 0 <= args.max_steps <= state["total_steps"]


def run_stage(S: Session, tok, stage: str, steps: int, stream: PackedStream, start_step: int,
              optimizer, params: list, state: dict, eval_items: list):
    """Optimizer steps start_step..steps-1 of one stage; returns at its end (or at --max-steps)."""
    cfg = S.raw.cfg
    warmup = max(1, round(args.warmup_ratio * steps))
    use_v2pe = args.v2pe or args.v2pe_delta > 0
    t_last, tokens, tiles = time.time(), 0, 0
    # the bar only on a terminal: logs and CI keep just the dense lines
    bar = tqdm(total=steps, initial=start_step, desc=stage, leave=False, dynamic_ncols=True,
               disable=S.rank != 0 or not sys.stderr.isatty())
    S.at = f"{stage} step {start_step}"
    for step in range(start_step, steps):
        if out_of_steps(state):
            break
        set_lr(optimizer, lr_factor(step, steps, warmup))
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            pack = next(stream)
            batch = collate_packed(pack, tok.pad_id, cfg.vision.image_size,
                                   loss_reduction=args.loss_reduction)
            if use_v2pe:
                rng = random.Random(f"{args.seed}/v2pe/{step}/{micro}/{S.rank}")  # same on resume
                batch["position_ids"] = v2pe_packed_positions([s.input_ids for s in pack],
                                                              batch["input_ids"].size(1),
                                                              cfg.image_token_id, rng,
                                                              args.v2pe_delta)
            batch = {k: v.to(S.device) for k, v in batch.items()}
            tokens += int((batch["doc_ids"] >= 0).sum())
            tiles += int(batch["image_flags"].sum())
            with S.no_sync(micro == args.grad_accum - 1), S.autocast():
                logits = S.model(batch["input_ids"], batch["pixel_values"], batch["image_flags"],
                                 batch["position_ids"], batch["doc_ids"])
                # Σw averaged over ranks (loss_reduction_all_gather): one weighted mean under DDP
                denom = None
                if S.ddp:
                    denom = all_reduce_mean(loss_weight_sum(batch["labels"], batch["loss_weight"]))
                loss = lm_loss(logits, batch["labels"], batch["loss_weight"], denom) \
                    / args.grad_accum
            loss.backward()
            loss_sum += all_reduce_mean(loss.detach()).item()  # the global weighted mean
        S.optimizer_step(optimizer, params)
        state["total_steps"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        done, lr = step + 1, optimizer.param_groups[0]["lr"]
        S.logger.log({"stage": stage, "step": done, "loss": loss_sum, "lr": lr})
        S.at = f"{stage} step {done}"
        if done % args.log_interval == 0 or done == steps:
            dt = time.time() - t_last
            flops = flops_per_token(cfg) * tokens + flops_per_tile(cfg) * tiles  # fwd + bwd
            eta = (steps - done) * dt / args.log_interval if done % args.log_interval == 0 else 0
            tok_s, tiles_s, mfu = (tokens * S.world / dt, tiles * S.world / dt,
                                   flops / dt / state["peak"])
            cuda = S.device.type == "cuda"
            mem = torch.cuda.max_memory_allocated(S.device) / 2 ** 30 if cuda else None
            if S.rank == 0:
                bar.write(f"{stage} {done:5d}/{steps} | loss {loss_sum:.4f} | lr {lr:.2e} | "
                          f"{tok_s:,.0f} tok/s | {tiles_s:.1f} tiles/s | MFU {100 * mfu:.1f}% | "
                          + (f"peak mem {mem:.2f} GiB | " if cuda else "") + f"ETA {eta:.0f}s")
            S.logger.log({"stage": stage, "step": done, "tok_per_s": tok_s, "tiles_per_s": tiles_s,
                          "mfu": mfu, "max_memory_gib": mem})
            t_last, tokens, tiles = time.time(), 0, 0
        last = done == steps
        if args.eval_interval > 0 and done % args.eval_interval == 0 and not last:
            run_eval(S, tok, eval_items, f"{stage} step {done}")
        if last and stage != STAGES[-1] and args.eval_interval > 0:
            run_eval(S, tok, eval_items, f"end of {stage}")  # what this stage alone achieved
        if done % args.ckpt_interval == 0 or last:
            S.save(os.path.join(args.out_dir, "ckpt"), tok, stream, optimizer, {
                "stage": stage, "step": done, "args": vars(args),
                "total_steps": state["total_steps"]})
    bar.close()


def report(S: Session, tok, eval_items: list):
    """The final evaluation: eval.json, the table, and a command to try the checkpoint."""
    S.at = "the final evaluation"
    res = S.write_eval(run_eval(S, tok, eval_items, "final"))
    print0("\nheld-out accuracy (chance):")
    for k, r in sorted(res["types"].items()):
        chance = f"{100 * r['chance']:.0f}%" if r.get("chance") else "?"
        print0(f"  {k:12s} {100 * r['accuracy']:5.1f}%  ({chance})  n={r['n']}")
    ckpt = os.path.join(args.out_dir, "ckpt")
    print0(f"wall time {res['wall_seconds']:.0f}s | checkpoint {ckpt}")
    with_image = next((it for it in eval_items if it["image"]), None)
    if with_image:
        print0(f"try: python sample.py --ckpt {ckpt} --image {with_image['image'][0]} "
               f"--prompt \"{with_image['question'].splitlines()[-1]}\"")
    if args.quick:
        print0(FULL_RECIPE)


# -----------------------------------------------------------------------------
# main

RANGES = {"--pretrain-steps": (lambda v: v >= 0, "a count >= 0"),
          "--sft-steps": (lambda v: v >= 0, "a count >= 0"),
          "--max-packed-tokens": POSITIVE, "--max-packed-tiles": POSITIVE,
          "--text-ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
          "--drop-path": (lambda v: 0 <= v < 1, "in [0, 1)"),
          **{f: (lambda v: v > 0 or v == -1, "> 0, or -1") for f in
             ("--v2pe-delta", "--lr-vit", "--lr-mlp", "--lr-llm")}}

with user_errors(), Session(args, RANGES) as S:
    resolve_paths(S)
    tok = Tokenizer.from_dir(args.tokenizer)
    resume_state = load_train_state(os.path.join(args.out_dir, "ckpt")) if args.resume else None
    # a resumed run starts from its checkpoint, the model as it was; args keep what the run was
    # asked (its checkpoints record them: experiments/reasoning.py's trained reads them)
    raw = build_model(tok, S.device, os.path.join(args.out_dir, "ckpt") if resume_state else "")
    raw.train()
    S.wrap(raw)
    lrs = {k: (v if v > 0 else args.lr) for k, v in (("vit", args.lr_vit), ("mlp", args.lr_mlp),
                                                     ("llm", args.lr_llm))}
    groups = param_groups(raw, {p for p in args.freeze.split(",") if p}, lrs, args.weight_decay)
    params = [p for g in groups for p in g["params"]]
    eval_items = load_eval_items(args.eval_file) if args.eval_file else []
    if not eval_items:
        print0("no evaluation (--eval-file none): give a held-out jsonl to measure accuracy")
    state = {"total_steps": resume_state["total_steps"] if resume_state else 0,
             "peak": measure_peak_flops(S.device)}

    n_all, n_train = sum(p.numel() for p in raw.parameters()), sum(p.numel() for p in params)
    print0(f"nanovl3 train | {S.world} process(es) on {S.device} | {n_all / 1e6:.2f}M params, "
           f"{n_train / 1e6:.2f}M trainable | {raw.cfg.num_image_token} tokens per "
           f"{raw.cfg.vision.image_size}px tile | measured matmul peak "
           f"{state['peak'] / 1e9:.0f} GFLOP/s")
    print0("config: " + json.dumps({k: v for k, v in vars(args).items() if v not in ("", None)}))

    for stage in STAGES:
        steps = args.pretrain_steps if stage == "pretrain" else args.sft_steps
        start = 0
        if resume_state:
            if STAGES.index(stage) < STAGES.index(resume_state["stage"]):
                continue  # finished before the checkpoint
            if stage == resume_state["stage"]:
                start = resume_state["step"]
        meta = args.pretrain_meta if stage == "pretrain" else args.sft_meta
        stream = make_stream(S, tok, meta, args.text_ratio if stage == "pretrain" else None)
        optimizer = make_optimizer(groups, S.device)  # each stage: its own optimizer, schedule
        if resume_state and stage == resume_state["stage"]:
            S.restore(resume_state, optimizer, stream)
            print0(f"resumed {stage} at step {start}")
        if start < steps:
            run_stage(S, tok, stage, steps, stream, start, optimizer, params, state, eval_items)
        if stream.stream.skipped:
            print0(f"{stage}: {stream.stream.skip_report()}")
        if out_of_steps(state):
            break
    if eval_items and args.eval_per_type != 0 and S.rank == 0 and not out_of_steps(state):
        report(S, tok, eval_items)
    S.close()
