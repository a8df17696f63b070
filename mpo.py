"""
Mixed Preference Optimization (MPO) after SFT: InternVL3 arXiv 2504.10479 §2.3, InternVL2.5-MPO arXiv 2411.10442.

    python mpo.py --init-from runs/toy/ckpt --data runs/reasoning/pairs/meta.json --out-dir runs/mpo
    torchrun --nproc-per-node 2 mpo.py --init-from ... --data ...      # DDP, same script

Data: MMPR format (SPEC §7.4): meta.json {name: {root, annotation, repeat_time, ...}} + JSONL lines
{"image", "question", "chosen", "rejected"}. Every step takes --batch-size pairs per process; the chosen and the
rejected answers run as ONE padded batch of 2B rows through the policy and through a frozen copy of the starting
checkpoint (the reference). The loss (nanovl3/losses.py mpo_loss) mixes
    preference  DPO: the chosen answer must gain more log-probability over the reference than the rejected one
    quality     BCO: each answer's reward is pushed above (chosen) or below (rejected) δ, the running mean reward
    generation  SFT: next-token loss on the chosen answer
with weights 0.8 / 0.2 / 1.0 and β = 0.1 (the InternVL3 1B recipe). Logged: rewards, margin, preference accuracy.
The checkpoint <out-dir>/ckpt loads in sample.py and --resume continues exactly (δ included).
"""

import argparse
import copy
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from nanovl3.chat import Tokenizer
from nanovl3.common import UserError, atomic_path, pick_dtype, print0, user_errors
from nanovl3.data import SampleStream, collate_padded, read_meta
from nanovl3.losses import RunningMean, lm_loss, mpo_loss, sequence_logps
from nanovl3.model import InternVL
from nanovl3.training import (Logger, all_reduce_mean, data_config, dist_init, evaluate, load_eval_items,
                              load_train_state, lr_factor, make_optimizer, param_groups, restore_run, save_run,
                              set_lr)

# -----------------------------------------------------------------------------
# arguments

parser = argparse.ArgumentParser(description="nanovl3 MPO: preference training from a checkpoint",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--init-from", default="", help="checkpoint directory to start from (ours or official)")
parser.add_argument("--ref-from", default="", help="reference model directory (default: --init-from)")
parser.add_argument("--data", default="", help="preference meta.json (MMPR format)")
parser.add_argument("--out-dir", default="runs/mpo", help="checkpoint, metrics.jsonl and eval.json go here")
parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt exactly")
parser.add_argument("--seed", type=int, default=0, help="seed of the data order and augmentation")
parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
parser.add_argument("--dtype", default=None, help="autocast dtype on CUDA (default bfloat16); CPU trains in fp32")
parser.add_argument("--compile", action="store_true", help="torch.compile the policy")
# the loss (SPEC §7.1)
parser.add_argument("--beta", type=float, default=0.1, help="β: scale of the implicit reward β·log(π/π_ref)")
parser.add_argument("--pref-weight", type=float, default=0.8, help="weight of the preference (DPO) term")
parser.add_argument("--quality-weight", type=float, default=0.2, help="weight of the quality (BCO) term")
parser.add_argument("--gen-weight", type=float, default=1.0, help="weight of the generation (SFT NLL) term")
# optimisation
parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per process and micro-step")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
parser.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (official 1B: 2e-7 at batch 256)")
parser.add_argument("--freeze", default="", help="comma list of parts to freeze: vit,mlp,llm")
parser.add_argument("--weight-decay", type=float, default=0.05)
parser.add_argument("--warmup-ratio", type=float, default=0.03, help="share of the steps for linear warmup")
parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (-1 = off)")
parser.add_argument("--max-seq-len", type=int, default=2048, help="longest sample, in tokens")
parser.add_argument("--max-tiles", type=int, default=-1, help="tiles per image (-1 = config max_dynamic_patch)")
parser.add_argument("--skip-bad-samples", action="store_true", help="count and skip bad data lines, don't stop")
# logging / evaluation
parser.add_argument("--log-interval", type=int, default=10, help="steps between log lines")
parser.add_argument("--ckpt-interval", type=int, default=100, help="steps between checkpoints")
parser.add_argument("--eval-file", default="", help="held-out questions jsonl, evaluated at the end (optional)")
parser.add_argument("--eval-per-type", type=int, default=-1, help="held-out questions per type (-1 = all)")
parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (tests, or to resume)")
args = parser.parse_args()


def check_args():
    if not args.init_from and not args.resume:
        raise UserError("--init-from: give the checkpoint directory MPO starts from (usually an SFT checkpoint)")
    if not args.data:
        raise UserError("--data: give the preference meta.json (MMPR format)")
    if args.beta <= 0:
        raise UserError(f"--beta must be > 0, got {args.beta}")
    if min(args.pref_weight, args.quality_weight, args.gen_weight) < 0 or \
            not (args.pref_weight or args.quality_weight or args.gen_weight):
        raise UserError("--pref-weight, --quality-weight, --gen-weight must be >= 0 and not all 0")
    if args.batch_size < 1 or args.grad_accum < 1 or args.steps < 1:
        raise UserError("--steps, --batch-size and --grad-accum must be >= 1")


def make_stream() -> SampleStream:
    """Every dataset of the meta file is preference data (MMPR's meta.json has no 'kind')."""
    specs = read_meta(args.data)
    for spec in specs:
        if spec.kind not in ("sft", "preference"):
            raise UserError(f"{args.data}: dataset '{spec.name}' has kind '{spec.kind}', not preference data")
        spec.kind = "preference"
    dcfg = data_config(raw.cfg, args.max_tiles, args.max_seq_len)
    return SampleStream(specs, tok, dcfg, seed=args.seed, rank=rank, world_size=world, skip_bad=args.skip_bad_samples)


# -----------------------------------------------------------------------------
# one micro-step: B pairs -> the MPO loss


def micro_step(pairs: list) -> tuple[torch.Tensor, dict, int]:
    """pairs [(chosen, rejected)] -> (loss, stats, tokens). Rows 0..B-1 are the chosen answers, B..2B-1 the
    rejected ones; the tiles are those of every chosen sample, then of every rejected one (the same images twice)."""
    B = len(pairs)
    batch = collate_padded([c for c, _ in pairs] + [r for _, r in pairs], tok.pad_id, raw.cfg.vision.image_size)
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = (batch["input_ids"], batch["pixel_values"], batch["image_flags"], batch["position_ids"], batch["doc_ids"])
    with autocast:
        logits = model(*inputs)  # [2B, T, V]
        logps = sequence_logps(logits, batch["labels"])  # [2B]
        nll = lm_loss(logits[:B], batch["labels"][:B])  # token mean over the chosen answers
        with torch.no_grad():
            ref = sequence_logps(ref_model(*inputs), batch["labels"])  # [2B]
        loss, stats = mpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], nll, running, args.beta,
                               (args.pref_weight, args.quality_weight, args.gen_weight))
    return loss, stats, int((batch["doc_ids"] >= 0).sum())


def save(step: int):
    save_run(os.path.join(args.out_dir, "ckpt"), raw, tok, stream, {
        "stage": "mpo", "step": step, "optimizer": optimizer.state_dict(), "running": running.state_dict(),
        "args": vars(args)}, rank, world)


# -----------------------------------------------------------------------------
# main

with user_errors():
    t_start = time.time()
    check_args()
    ddp, rank, world, device = dist_init(args.device)
    resume_state = load_train_state(os.path.join(args.out_dir, "ckpt")) if args.resume else None
    if resume_state and resume_state.get("stage") != "mpo":
        raise UserError(f"--resume: {args.out_dir}/ckpt was not written by mpo.py")
    start_dir = os.path.join(args.out_dir, "ckpt") if resume_state else args.init_from
    ref_dir = args.ref_from or (resume_state["args"]["init_from"] if resume_state else args.init_from)
    tok = Tokenizer.from_dir(start_dir)
    raw = InternVL.from_pretrained(start_dir, dtype=torch.float32, device=device)
    raw.cfg.image_token_id = tok.img_context_id
    raw.train()
    # the reference: a frozen copy of the starting checkpoint, in eval mode (no drop path)
    ref_model = copy.deepcopy(raw) if ref_dir == start_dir else InternVL.from_pretrained(ref_dir, torch.float32,
                                                                                        device)
    ref_model.eval().requires_grad_(False)
    model = torch.compile(raw) if args.compile else raw
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    groups = param_groups(raw, {p for p in args.freeze.split(",") if p}, {k: args.lr for k in ("vit", "mlp", "llm")},
                          args.weight_decay)
    trainable = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(groups, device)
    stream = make_stream()
    running = RunningMean()
    start = 0
    if resume_state:
        restore_run(resume_state, optimizer, stream, rank, world)
        running.load_state_dict(resume_state["running"])
        start = resume_state["step"]
        print0(f"resumed at step {start} (δ = {running.mean:.4f})")
    autocast = torch.autocast("cuda", dtype=pick_dtype(args.dtype, device)) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)
    logger = Logger(args.out_dir, rank)
    print0(f"nanovl3 mpo | {world} process(es) on {device} | {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M "
           f"params | {args.batch_size * args.grad_accum * world} pairs per step | reference {ref_dir}")
    print0("config: " + json.dumps({k: v for k, v in vars(args).items() if v not in ("", None)}))

    warmup = max(1, round(args.warmup_ratio * args.steps))
    stop = args.steps if args.max_steps < 0 else min(args.steps, args.max_steps)
    bar = tqdm(total=args.steps, initial=start, desc="mpo", disable=rank != 0 or not sys.stderr.isatty(), leave=False)
    t_last, tokens, window = time.time(), 0, []
    for step in range(start, stop):
        set_lr(optimizer, lr_factor(step, args.steps, warmup))
        rec = {}
        for micro in range(args.grad_accum):
            pairs = [next(stream) for _ in range(args.batch_size)]
            sync = micro == args.grad_accum - 1
            with model.no_sync() if ddp and not sync else torch.enable_grad():
                loss, stats, n = micro_step(pairs)
                (loss / args.grad_accum).backward()
            tokens += n
            stats["loss"] = (all_reduce_mean(loss.detach()) if ddp else loss).item()
            for k, v in stats.items():
                rec[k] = rec.get(k, 0.0) + v / args.grad_accum
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['accuracy']:.2f}")
        logger.log({"stage": "mpo", "step": done, "lr": optimizer.param_groups[0]["lr"], **rec})
        window.append(rec)
        if done % args.log_interval == 0 or done == stop:
            dt = time.time() - t_last
            mean = {k: sum(r[k] for r in window) / len(window) for k in window[0]}
            line = (f"mpo {done:5d}/{args.steps} | loss {mean['loss']:.4f} | pref acc {mean['accuracy']:.2f} | "
                    f"margin {mean['margin']:+.3f} | reward c {mean['reward_chosen']:+.3f} r "
                    f"{mean['reward_rejected']:+.3f} | δ {mean['delta']:+.3f} | nll {mean['nll']:.3f} | "
                    f"lr {optimizer.param_groups[0]['lr']:.2e} | {tokens * world / dt:,.0f} tok/s | "
                    f"ETA {(stop - done) * dt / len(window):.0f}s")
            if rank == 0:
                bar.write(line)
            t_last, tokens, window = time.time(), 0, []
        if done % args.ckpt_interval == 0 or done == stop:
            save(done)
    bar.close()
    if stream.skipped:
        print0(f"skipped {stream.skipped} bad preference lines (last: {stream.last_error})")

    if args.eval_file and stop == args.steps and rank == 0:
        res = evaluate(raw, tok, load_eval_items(args.eval_file), max_per_type=args.eval_per_type)
        res["wall_seconds"] = time.time() - t_start
        res["command"] = " ".join(sys.argv)
        with atomic_path(os.path.join(args.out_dir, "eval.json")) as tmp, open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        print0("held-out accuracy after MPO: " + " | ".join(
            f"{k} {100 * r['accuracy']:.1f}% (n={r['n']})" for k, r in sorted(res["types"].items())))
    print0(f"wall time {time.time() - t_start:.0f}s | checkpoint {os.path.join(args.out_dir, 'ckpt')}")
    if ddp:
        # free the DDP wrapper first: its reducer holds the process group, and a gloo group freed from that last
        # reference (later, with the GIL held) can deadlock or abort at exit (pytorch/pytorch#56297)
        del model
        torch.distributed.destroy_process_group()
