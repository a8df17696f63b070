"""
Mixed Preference Optimization after SFT (InternVL3 §2.3, arXiv 2504.10479; MPO, arXiv 2411.10442).

    python mpo.py --init-from runs/toy/ckpt --data runs/reasoning/pairs/meta.json --out-dir runs/mpo
    torchrun --nproc-per-node 2 mpo.py --init-from ... --data ...      # DDP, same script
    torchrun --nproc-per-node 2 mpo.py --fsdp ...    # FSDP2: policy and reference sharded

Data: the MMPR format (OpenGVLab/MMPR): meta.json {name: {root, annotation, repeat_time, ...}} +
JSONL lines {"image", "question", "chosen", "rejected"}. Each step takes --batch-size pairs per
process; chosen and rejected answers run as ONE padded batch of 2B rows through the policy and a
frozen copy of the starting checkpoint (the reference). The loss (losses.py mpo_loss) mixes
    preference  DPO: chosen must gain more log-probability over the reference than rejected
    quality     BCO: rewards pushed above (chosen) or below (rejected) δ, the running mean reward
    generation  SFT: next-token loss on the chosen answer
with weights 0.8 / 0.2 / 1.0, β = 0.1 (InternVL3 1B recipe). Logged: rewards, margin, preference
accuracy. <out-dir>/ckpt loads in sample.py; --resume continues exactly (δ included).
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
from nanovl3.checkpoint import load_train_state
from nanovl3.common import ArgumentParser, UserError, print0, user_errors
from nanovl3.data import SampleStream, collate_padded, read_meta
from nanovl3.evaluate import evaluate, load_eval_items
from nanovl3.losses import RunningMean, lm_loss, mpo_loss, sequence_logps
from nanovl3.model import InternVL
from nanovl3.training import (Session, add_common_args, all_reduce_mean, data_config, lr_factor,
                              make_optimizer, param_groups, set_lr, shard)

# -----------------------------------------------------------------------------
# arguments

parser = ArgumentParser(description="nanovl3 MPO: preference training from a checkpoint",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# the official 1B recipe: lr 2e-7 at a batch of 256 pairs; the toy's batch of 8 wants more
add_common_args(parser, out_dir="runs/mpo", lr=2e-5, log_interval=10, eval_per_type=-1)
add = parser.add_argument
add("--init-from", default="", help="checkpoint directory to start from (ours or official)")
add("--ref-from", default="", help="reference model directory (default: --init-from)")
add("--data", default="", help="preference meta.json (MMPR format)")
add("--eval-file", default="", help="held-out questions jsonl, evaluated at the end (optional)")
# the loss (InternVL3 §2.3; MPO arXiv 2411.10442 §3.2)
add("--beta", type=float, default=0.1, help="β: scale of the implicit reward β·log(π/π_ref)")
add("--pref-weight", type=float, default=0.8, help="weight of the preference (DPO) term")
add("--quality-weight", type=float, default=0.2, help="weight of the quality (BCO) term")
add("--gen-weight", type=float, default=1.0, help="weight of the generation (SFT NLL) term")
add("--steps", type=int, default=200, help="optimizer steps")
add("--batch-size", type=int, default=8, help="preference pairs per process and micro-step")
args = parser.parse_args()


def check_args():
    if not args.init_from and not args.resume:
        raise UserError("--init-from: give the checkpoint directory MPO starts from (usually an "
                        "SFT checkpoint)")
    if not args.data:
        raise UserError("--data: give the preference meta.json (MMPR format)")
    if args.beta <= 0:
        raise UserError(f"--beta must be > 0, got {args.beta}")
    if min(args.pref_weight, args.quality_weight, args.gen_weight) < 0 or \
            not (args.pref_weight or args.quality_weight or args.gen_weight):
        raise UserError("--pref-weight, --quality-weight, --gen-weight must be >= 0 and not all 0")
    if args.batch_size < 1 or args.grad_accum < 1 or args.steps < 1:
        raise UserError("--steps, --batch-size and --grad-accum must be >= 1")
    if args.eval_file and not os.path.isfile(args.eval_file):  # found out now, not after training
        raise UserError(f"--eval-file {args.eval_file}: no such file")


def make_stream(S: Session, tok: Tokenizer) -> SampleStream:
    """Every dataset of the meta file is preference data (MMPR's meta.json has no 'kind')."""
    specs = read_meta(args.data)
    for spec in specs:
        if spec.kind not in ("sft", "preference"):
            raise UserError(f"{args.data}: dataset '{spec.name}' has kind '{spec.kind}', not "
                            "preference data")
        spec.kind = "preference"
    dcfg = data_config(S.raw.cfg, args.max_tiles, args.max_seq_len)
    return SampleStream(specs, tok, dcfg, seed=args.seed, rank=S.rank, world_size=S.world,
                        skip_bad=args.skip_bad_samples)


# -----------------------------------------------------------------------------
# one micro-step: B pairs -> the MPO loss


def micro_step(S: Session, tok, ref_model, running: RunningMean,
               pairs: list) -> tuple[torch.Tensor, dict, int]:
    """pairs [(chosen, rejected)] -> (loss, stats, tokens). Rows 0..B-1 are the chosen answers,
    B..2B-1 the rejected ones; the tiles are in the same order (every chosen sample's first)."""
    B = len(pairs)
    batch = collate_padded([c for c, _ in pairs] + [r for _, r in pairs], tok.pad_id,
                           S.raw.cfg.vision.image_size)
    batch = {k: v.to(S.device) for k, v in batch.items()}
    inputs = (batch["input_ids"], batch["pixel_values"], batch["image_flags"],
              batch["position_ids"], batch["doc_ids"])
    with S.autocast():
        logits = S.model(*inputs)  # [2B, T, V]
        logps = sequence_logps(logits, batch["labels"])  # [2B]
        nll = lm_loss(logits[:B], batch["labels"][:B])  # token mean over the chosen answers
        with torch.no_grad():
            ref = sequence_logps(ref_model(*inputs), batch["labels"])  # [2B]
        loss, stats = mpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], nll, running, args.beta,
                               (args.pref_weight, args.quality_weight, args.gen_weight))
    return loss, stats, int((batch["doc_ids"] >= 0).sum())


def log_line(done: int, stop: int, window: list, lr: float, tokens: int, dt: float,
             world: int) -> str:
    mean = {k: sum(r[k] for r in window) / len(window) for k in window[0]}
    return (f"mpo {done:5d}/{args.steps} | loss {mean['loss']:.4f} | "
            f"pref acc {mean['accuracy']:.2f} | margin {mean['margin']:+.3f} | "
            f"reward c {mean['reward_chosen']:+.3f} r {mean['reward_rejected']:+.3f} | "
            f"δ {mean['delta']:+.3f} | nll {mean['nll']:.3f} | lr {lr:.2e} | "
            f"{tokens * world / dt:,.0f} tok/s | ETA {(stop - done) * dt / len(window):.0f}s")


# -----------------------------------------------------------------------------
# main

with user_errors():
    check_args()
with user_errors(), Session(args) as S:
    resume_state = load_train_state(os.path.join(args.out_dir, "ckpt")) if args.resume else None
    if resume_state and resume_state.get("stage") != "mpo":
        raise UserError(f"--resume: {args.out_dir}/ckpt was not written by mpo.py")
    start_dir = os.path.join(args.out_dir, "ckpt") if resume_state else args.init_from
    ref_dir = args.ref_from or (resume_state["args"]["init_from"] if resume_state
                                else args.init_from)
    tok = Tokenizer.from_dir(start_dir)
    raw = InternVL.from_pretrained(start_dir, dtype=torch.float32, device=S.device)
    raw.cfg.image_token_id = tok.img_context_id
    raw.train()
    # the reference: a frozen copy of the starting checkpoint, in eval mode (no drop path)
    if ref_dir == start_dir:
        ref_model = copy.deepcopy(raw)
    else:
        ref_model = InternVL.from_pretrained(ref_dir, torch.float32, S.device)
    ref_model.eval().requires_grad_(False)
    if S.fsdp:
        shard(ref_model)
    S.wrap(raw)
    groups = param_groups(raw, {p for p in args.freeze.split(",") if p},
                          {k: args.lr for k in ("vit", "mlp", "llm")}, args.weight_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(groups, S.device)
    stream = make_stream(S, tok)
    running = RunningMean()
    start = 0
    if resume_state:
        S.restore(resume_state, optimizer, stream)
        running.load_state_dict(resume_state["running"])
        start = resume_state["step"]
        print0(f"resumed at step {start} (δ = {running.mean:.4f})")
    n_params = sum(p.numel() for p in raw.parameters())
    print0(f"nanovl3 mpo | {S.world} process(es) on {S.device} | {n_params / 1e6:.2f}M params | "
           f"{args.batch_size * args.grad_accum * S.world} pairs per step | reference {ref_dir}")
    print0("config: " + json.dumps({k: v for k, v in vars(args).items() if v not in ("", None)}))

    warmup = max(1, round(args.warmup_ratio * args.steps))
    stop = args.steps if args.max_steps < 0 else min(args.steps, args.max_steps)
    bar = tqdm(total=args.steps, initial=start, desc="mpo", leave=False,
               disable=S.rank != 0 or not sys.stderr.isatty())
    t_last, tokens, window = time.time(), 0, []
    S.at = f"mpo step {start}"
    for step in range(start, stop):
        set_lr(optimizer, lr_factor(step, args.steps, warmup))
        rec = {}
        for micro in range(args.grad_accum):
            pairs = [next(stream) for _ in range(args.batch_size)]
            with S.no_sync(micro == args.grad_accum - 1):
                loss, stats, n = micro_step(S, tok, ref_model, running, pairs)
                (loss / args.grad_accum).backward()
            tokens += n
            stats["loss"] = all_reduce_mean(loss.detach()).item()
            for k, v in stats.items():
                rec[k] = rec.get(k, 0.0) + v / args.grad_accum
        S.optimizer_step(optimizer, params)
        done, lr = step + 1, optimizer.param_groups[0]["lr"]
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['accuracy']:.2f}")
        S.logger.log({"stage": "mpo", "step": done, "lr": lr, **rec})
        S.at = f"mpo step {done}"
        window.append(rec)
        if done % args.log_interval == 0 or done == stop:
            line = log_line(done, stop, window, lr, tokens, time.time() - t_last, S.world)
            if S.rank == 0:
                bar.write(line)
            t_last, tokens, window = time.time(), 0, []
        if done % args.ckpt_interval == 0 or done == stop:
            S.save(os.path.join(args.out_dir, "ckpt"), tok, stream, optimizer, {
                "stage": "mpo", "step": done, "running": running.state_dict(),
                "args": vars(args)})
    bar.close()
    if stream.skipped:
        print0(f"preference data: {stream.skip_report()}")

    if args.eval_file and args.eval_per_type != 0 and stop == args.steps:
        S.at = "the final evaluation"
        final = S.full_model(S.device)  # under FSDP every rank helps gather it
        if S.rank == 0:
            res = evaluate(final, tok, load_eval_items(args.eval_file),
                           max_per_type=args.eval_per_type)
            S.write_eval(res)
            print0("held-out accuracy after MPO: " + " | ".join(
                f"{k} {100 * r['accuracy']:.1f}% (n={r['n']})"
                for k, r in sorted(res["types"].items())))
    print0(f"wall time {time.time() - S.t_start:.0f}s | checkpoint "
           f"{os.path.join(args.out_dir, 'ckpt')}")
    S.close()
