"""
Train InternVL3: native multimodal pre-training, then SFT with the InternVL2.5 techniques. One script, one loop.

    python train.py                                  # the whole toy recipe on CPU in minutes: data, pretrain, SFT, eval
    python train.py --stage sft --init-from runs/toy/ckpt --sft-meta my/meta.json --sft-steps 2000
    torchrun --nproc-per-node 2 train.py             # DDP (gloo on CPU, nccl on CUDA), same script

Stages (InternVL3 arXiv 2504.10479 §2.2-2.3):
  pretrain  "native multimodal pre-training": every parameter trained jointly from the start on interleaved
            image-text documents mixed with pure text (language : multimodal = 1 : 3), next-token loss on text
            tokens only; optional V2PE (a random visual position step δ per image).
  sft       loss on assistant tokens only, square-root loss averaging, random JPEG compression, packing of several
            samples per sequence with a block-diagonal causal mask (InternVL2.5 §4, arXiv 2412.05271).
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

from nanovl3.chat import Tokenizer
from nanovl3.common import UserError, atomic_path, pick_dtype, print0, user_errors
from nanovl3.config import preset
from nanovl3.data import PackedStream, SampleStream, collate_packed, read_meta
from nanovl3.losses import lm_loss
from nanovl3.model import InternVL, count_images, v2pe_position_ids
from nanovl3.training import (Logger, all_reduce_mean, data_config, dist_init, evaluate, flops_per_tile,
                              flops_per_token, load_eval_items, load_train_state, lr_factor, make_optimizer,
                              measure_peak_flops, param_groups, restore_run, save_run, set_lr, text_perplexity)

# -----------------------------------------------------------------------------
# arguments

parser = argparse.ArgumentParser(description="nanovl3 training: native pre-training and SFT",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# run
parser.add_argument("--stage", default="all", choices=["all", "pretrain", "sft"], help="all = pretrain, then SFT")
parser.add_argument("--out-dir", default="runs/toy", help="checkpoint, metrics.jsonl and eval.json go here")
parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt exactly")
parser.add_argument("--seed", type=int, default=0, help="seed of init, data order and augmentation")
parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
parser.add_argument("--dtype", default=None, help="autocast dtype on CUDA (default bfloat16); CPU trains in fp32")
parser.add_argument("--compile", action="store_true",
                    help="torch.compile the model (on CUDA it recompiles for new tile counts: see README)")
# model
parser.add_argument("--preset", default="toy", help="model shape when training from scratch (toy, internvl3-1b, ...)")
parser.add_argument("--init-from", default="", help="start from a checkpoint directory (ours or official, any layout)")
parser.add_argument("--init-llm-from", default="",
                    help="post-hoc style: take only the language model from this checkpoint (InternVL or Qwen2 dir)")
parser.add_argument("--freeze", default="", help="comma list of parts to freeze: vit,mlp,llm")
parser.add_argument("--drop-path", type=float, default=0.0, help="ViT stochastic depth rate (official SFT: 0.1)")
# data
parser.add_argument("--data-dir", default="data/toy", help="the toy world (generated here if absent)")
parser.add_argument("--pretrain-meta", default="", help="pre-training meta.json (default: <data-dir>/pretrain)")
parser.add_argument("--sft-meta", default="", help="SFT meta.json (default: <data-dir>/sft)")
parser.add_argument("--eval-file", default="", help="held-out questions jsonl (default: <data-dir>/eval/eval.jsonl)")
parser.add_argument("--eval-text", default="", help="held-out pure text jsonl for perplexity (default: toy's)")
parser.add_argument("--tokenizer", default="", help="tokenizer.json (default: <init-from> or <data-dir>)")
parser.add_argument("--text-ratio", type=float, default=0.25,
                    help="pre-training share of pure-text samples (paper: language:multimodal = 1:3)")
parser.add_argument("--max-seq-len", type=int, default=2048, help="longest sample, in tokens")
parser.add_argument("--max-tiles", type=int, default=-1, help="tiles per image (-1 = config max_dynamic_patch)")
parser.add_argument("--skip-bad-samples", action="store_true", help="count and skip bad data lines, don't stop")
# optimisation
parser.add_argument("--pretrain-steps", type=int, default=250, help="optimizer steps of native pre-training")
parser.add_argument("--sft-steps", type=int, default=2300, help="optimizer steps of SFT")
parser.add_argument("--max-packed-tokens", type=int, default=2048, help="tokens per packed sequence")
parser.add_argument("--max-packed-tiles", type=int, default=48, help="tiles per packed sequence")
parser.add_argument("--grad-accum", type=int, default=1, help="packed sequences per optimizer step (per rank)")
parser.add_argument("--loss-reduction", default="square", choices=["token", "sample", "square"],
                    help="per-token loss weight 1, 1/n or 1/sqrt(n) of a sample's n supervised tokens")
parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (all parts; 3e-3 collapses the toy ViT)")
parser.add_argument("--lr-vit", type=float, default=-1, help="ViT learning rate (-1 = --lr)")
parser.add_argument("--lr-mlp", type=float, default=-1, help="projector learning rate (-1 = --lr)")
parser.add_argument("--lr-llm", type=float, default=-1, help="LLM learning rate (-1 = --lr)")
parser.add_argument("--weight-decay", type=float, default=0.05)
parser.add_argument("--warmup-ratio", type=float, default=0.03, help="share of a stage's steps for linear warmup")
parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (-1 = off)")
parser.add_argument("--v2pe", action="store_true",
                    help="V2PE in the stages run: δ per image drawn from {1,...,1/256}; evaluation uses δ = 1")
parser.add_argument("--v2pe-delta", type=float, default=-1,
                    help="a fixed V2PE δ instead of a random one, in training and in evaluation")
# logging / evaluation
parser.add_argument("--log-interval", type=int, default=25, help="steps between log lines")
parser.add_argument("--eval-interval", type=int, default=-1, help="steps between evaluations (-1 = only at stage ends)")
parser.add_argument("--eval-per-type", type=int, default=100, help="held-out questions per type (-1 = all, 0 = no eval)")
parser.add_argument("--ckpt-interval", type=int, default=100, help="steps between checkpoints")
parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps in total (tests)")
args = parser.parse_args()

V2PE_DELTAS = [1 / 2 ** k for k in range(9)]  # {1, 1/2, ..., 1/256} (InternVL3 §2.1)


def resolve_paths():
    """Fill default data paths from --data-dir, generating the toy world when it is absent."""
    d = args.data_dir
    toy = not (args.pretrain_meta or args.sft_meta)
    if toy:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
        import toyworld
        if rank == 0:
            toyworld.ensure(d)
    if ddp:  # every rank waits here, whether or not it saw the data missing
        torch.distributed.barrier()
    args.pretrain_meta = args.pretrain_meta or os.path.join(d, "pretrain", "meta.json")
    args.sft_meta = args.sft_meta or os.path.join(d, "sft", "meta.json")
    args.eval_file = args.eval_file or os.path.join(d, "eval", "eval.jsonl")
    if not args.eval_text and os.path.isfile(os.path.join(d, "eval", "text.jsonl")):
        args.eval_text = os.path.join(d, "eval", "text.jsonl")
    args.tokenizer = args.tokenizer or (args.init_from if args.init_from and
                                        os.path.isfile(os.path.join(args.init_from, "tokenizer.json")) else d)


# -----------------------------------------------------------------------------
# model


def build_model(tok: Tokenizer, device) -> InternVL:
    if args.init_from:
        model = InternVL.from_pretrained(args.init_from, dtype=torch.float32, device=device)
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
        raise UserError(f"--tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {cfg.text.vocab_size}")
    if args.init_llm_from:
        load_llm_only(model, args.init_llm_from, device)
    cfg.vision.drop_path_rate = args.drop_path
    for i, block in enumerate(model.vision_model.encoder.layers):
        block.drop_path_rate = args.drop_path * i / max(len(model.vision_model.encoder.layers) - 1, 1)
    return model


def load_llm_only(model: InternVL, path: str, device):
    """Post-hoc recipe: keep our (new) ViT and projector, take the language model from a trained checkpoint."""
    src = InternVL.from_pretrained(path, dtype=torch.float32, device=device)
    if src.cfg.text != model.cfg.text:
        raise UserError(f"--init-llm-from {path}: its language model config differs from --preset {args.preset}")
    model.language_model.load_state_dict(src.language_model.state_dict())


# -----------------------------------------------------------------------------
# one stage: a stream of packs -> optimizer steps


def make_stream(meta: str, text_ratio) -> PackedStream:
    dcfg = data_config(raw.cfg, args.max_tiles, args.max_seq_len)
    specs = read_meta(meta)
    for spec in specs:
        if spec.kind == "preference":
            raise UserError(f"{meta}: dataset '{spec.name}' is preference data (chosen/rejected): train it with mpo.py")
    samples = SampleStream(specs, tok, dcfg, seed=args.seed, rank=rank, world_size=world,
                           text_ratio=text_ratio, skip_bad=args.skip_bad_samples)
    return PackedStream(samples, args.max_packed_tokens, args.max_packed_tiles)


def v2pe_positions(pack, batch, step: int, micro: int) -> torch.Tensor:
    """Per-sample V2PE positions for a pack (a fixed δ, or one drawn per image from V2PE_DELTAS)."""
    rng = random.Random(f"{args.seed}/v2pe/{step}/{micro}/{rank}")  # reproducible on resume
    pos = batch["position_ids"].float()  # [1, T]
    t = 0
    for s in pack:
        ids = s.input_ids
        n_images = count_images(ids, raw.cfg.image_token_id)
        deltas = [args.v2pe_delta if args.v2pe_delta > 0 else rng.choice(V2PE_DELTAS) for _ in range(n_images)]
        pos[0, t:t + len(ids)] = v2pe_position_ids(ids, raw.cfg.image_token_id, deltas)
        t += len(ids)
    return pos


def run_stage(stage: str, steps: int, stream: PackedStream, start_step: int, optimizer, state: dict):
    """Optimizer steps start_step..steps-1 of one stage; returns when the stage ends (or --max-steps is hit)."""
    warmup = max(1, round(args.warmup_ratio * steps))
    use_v2pe = args.v2pe or args.v2pe_delta > 0
    autocast = torch.autocast("cuda", dtype=pick_dtype(args.dtype, device)) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)
    t_last, tokens, tiles = time.time(), 0, 0
    # the bar only on a terminal: logs and CI keep just the dense lines
    bar = tqdm(total=steps, initial=start_step, desc=stage, disable=rank != 0 or not sys.stderr.isatty(), leave=False,
               dynamic_ncols=True)
    for step in range(start_step, steps):
        if out_of_steps():
            break
        set_lr(optimizer, lr_factor(step, steps, warmup))
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            pack = next(stream)
            batch = collate_packed(pack, tok.pad_id, raw.cfg.vision.image_size, loss_reduction=args.loss_reduction)
            if use_v2pe:
                batch["position_ids"] = v2pe_positions(pack, batch, step, micro)
            batch = {k: v.to(device) for k, v in batch.items()}
            tokens += int((batch["doc_ids"] >= 0).sum())
            tiles += int(batch["image_flags"].sum())
            sync = micro == args.grad_accum - 1
            with (model.no_sync() if ddp and not sync else torch.enable_grad()), autocast:
                logits = model(batch["input_ids"], batch["pixel_values"], batch["image_flags"],
                               batch["position_ids"], batch["doc_ids"])
                # Σw averaged over ranks (loss_reduction_all_gather): one global weighted mean under DDP
                denom = all_reduce_mean(batch["loss_weight"][:, 1:].sum()) if ddp else None
                loss = lm_loss(logits, batch["labels"], batch["loss_weight"], denom) / args.grad_accum
            loss.backward()
            loss_sum += (all_reduce_mean(loss.detach()) if ddp else loss).item()  # the global weighted mean
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["total_steps"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        done = step + 1
        logger.log({"stage": stage, "step": done, "loss": loss_sum, "lr": optimizer.param_groups[0]["lr"]})
        if done % args.log_interval == 0 or done == steps:
            dt = time.time() - t_last
            flops = flops_per_token(raw.cfg) * tokens + flops_per_tile(raw.cfg) * tiles  # forward + backward
            eta = (steps - done) * dt / args.log_interval if done % args.log_interval == 0 else 0
            line = (f"{stage} {done:5d}/{steps} | loss {loss_sum:.4f} | lr {optimizer.param_groups[0]['lr']:.2e} | "
                    f"{tokens * world / dt:,.0f} tok/s | {tiles * world / dt:.1f} tiles/s | "
                    f"MFU {100 * flops / dt / peak_flops:.1f}% | ETA {eta:.0f}s")
            if rank == 0:
                bar.write(line)
            logger.log({"stage": stage, "step": done, "tok_per_s": tokens * world / dt, "tiles_per_s": tiles * world / dt,
                        "mfu": flops / dt / peak_flops})
            t_last, tokens, tiles = time.time(), 0, 0
        last = done == steps
        if args.eval_interval > 0 and done % args.eval_interval == 0 and not last:
            run_eval(f"{stage} step {done}")
        if last and stage != stages[-1] and args.eval_per_type != 0:
            run_eval(f"end of {stage}")  # what this stage alone achieved
        if done % args.ckpt_interval == 0 or last:
            save(stage, done, optimizer, stream)
    bar.close()


def out_of_steps() -> bool:
    """--max-steps reached (a deliberately short run: tests, or a stop to be resumed)."""
    return 0 <= args.max_steps <= state["total_steps"]


def save(stage: str, step: int, optimizer, stream: PackedStream):
    save_run(os.path.join(args.out_dir, "ckpt"), raw, tok, stream, {
        "stage": stage, "step": step, "optimizer": optimizer.state_dict(), "args": vars(args),
        "total_steps": state["total_steps"]}, rank, world)


# -----------------------------------------------------------------------------
# evaluation


def run_eval(when: str) -> dict:
    if rank != 0 or not eval_items:
        return {}
    t = time.time()
    res = evaluate(raw, tok, eval_items, max_per_type=args.eval_per_type,
                   v2pe_delta=args.v2pe_delta if args.v2pe_delta > 0 else 1.0)
    types = json.load(open(types_file)) if os.path.isfile(types_file) else {}
    for name, r in res["types"].items():
        r["chance"] = types.get(name, {}).get("chance")
    if args.eval_text:
        res["text_perplexity"] = text_perplexity(raw, tok, args.eval_text)
    res["eval_seconds"] = time.time() - t
    print0(f"eval ({when}, {res['eval_seconds']:.0f}s): " + " | ".join(
        f"{k} {100 * r['accuracy']:.0f}%" for k, r in sorted(res["types"].items()))
        + (f" | text ppl {res['text_perplexity']:.2f}" if "text_perplexity" in res else ""))
    for ex in res["examples"][:3]:
        print0(f"  Q: {ex['question'].splitlines()[-1]!s:.70}  A: {ex['response'][:80]!r}  (gold {ex['answer']})")
    logger.log({"eval": when, **{k: v for k, v in res.items() if k != "examples"}})
    return res


# -----------------------------------------------------------------------------
# main

with user_errors():
    t_start = time.time()
    ddp, rank, world, device = dist_init(args.device)
    resolve_paths()
    tok = Tokenizer.from_dir(args.tokenizer)
    resume_state = load_train_state(os.path.join(args.out_dir, "ckpt")) if args.resume else None
    if resume_state:  # the checkpoint holds the model as it was
        args.init_from, args.init_llm_from = os.path.join(args.out_dir, "ckpt"), ""
    raw = build_model(tok, device)
    raw.train()
    model = raw
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    lrs = {k: (v if v > 0 else args.lr) for k, v in (("vit", args.lr_vit), ("mlp", args.lr_mlp), ("llm", args.lr_llm))}
    groups = param_groups(raw, {p for p in args.freeze.split(",") if p}, lrs, args.weight_decay)
    trainable = [p for g in groups for p in g["params"]]
    eval_items = load_eval_items(args.eval_file) if os.path.isfile(args.eval_file) else []
    types_file = os.path.join(os.path.dirname(args.eval_file), "types.json")
    logger = Logger(args.out_dir, rank)
    peak_flops = measure_peak_flops(device)
    state = {"total_steps": resume_state["total_steps"] if resume_state else 0}

    n_train = sum(p.numel() for p in trainable)
    print0(f"nanovl3 train | {world} process(es) on {device} | {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M "
           f"params, {n_train / 1e6:.2f}M trainable | {raw.cfg.num_image_token} tokens per "
           f"{raw.cfg.vision.image_size}px tile | measured matmul peak {peak_flops / 1e9:.0f} GFLOP/s")
    print0("config: " + json.dumps({k: v for k, v in vars(args).items() if v not in ("", None)}))

    stages = {"all": ["pretrain", "sft"], "pretrain": ["pretrain"], "sft": ["sft"]}[args.stage]
    for stage in stages:
        steps = args.pretrain_steps if stage == "pretrain" else args.sft_steps
        start = 0
        if resume_state:
            if stages.index(stage) < stages.index(resume_state["stage"]):
                continue  # finished before the checkpoint
            if stage == resume_state["stage"]:
                start = resume_state["step"]
        meta = args.pretrain_meta if stage == "pretrain" else args.sft_meta
        stream = make_stream(meta, args.text_ratio if stage == "pretrain" else None)
        optimizer = make_optimizer(groups, device)  # each stage starts its own optimizer and schedule
        if resume_state and stage == resume_state["stage"]:
            restore_run(resume_state, optimizer, stream, rank, world)
            print0(f"resumed {stage} at step {start}")
        if start < steps:
            run_stage(stage, steps, stream, start, optimizer, state)
        if stream.stream.skipped:
            print0(f"{stage}: skipped {stream.stream.skipped} bad samples (last: {stream.stream.last_error})")
        if out_of_steps():
            break
    if eval_items and args.eval_per_type != 0 and rank == 0 and not out_of_steps():
        res = run_eval("final")
        res["wall_seconds"] = time.time() - t_start
        res["command"] = " ".join(sys.argv)
        with atomic_path(os.path.join(args.out_dir, "eval.json")) as tmp, open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        print0("\nheld-out accuracy (chance):")
        for k, r in sorted(res["types"].items()):
            chance = f"{100 * r['chance']:.0f}%" if r.get("chance") else "?"
            print0(f"  {k:12s} {100 * r['accuracy']:5.1f}%  ({chance})  n={r['n']}")
        print0(f"wall time {res['wall_seconds']:.0f}s | checkpoint {os.path.join(args.out_dir, 'ckpt')}")
        with_image = next((it for it in eval_items if it["image"]), None)
        if with_image:
            print0(f"try: python sample.py --ckpt {os.path.join(args.out_dir, 'ckpt')} "
                   f"--image {with_image['image'][0]} --prompt \"{with_image['question'].splitlines()[-1]}\"")
    if ddp:
        # free the DDP wrapper first: its reducer holds the process group, and a gloo group freed from that last
        # reference (later, with the GIL held) can deadlock or abort at exit (pytorch/pytorch#56297)
        del model
        torch.distributed.destroy_process_group()
