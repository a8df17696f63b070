"""What the training scripts (train.py: pre-training, SFT; mpo.py: preference training) share:
common flags, torchrun/DDP setup and teardown, parameter groups (freeze, per-group lr), the warmup +
cosine schedule, the optimizer step, the dense log line + JSONL metrics, MFU, and their eval.json.
Nothing here owns a training loop: each script reads top to bottom as args -> init -> data -> model
-> loop. Checkpoints: checkpoint.py; held-out evaluation: evaluate.py."""

import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from nanovl3.common import UserError, pick_device, pick_dtype, print0, write_json
from nanovl3.data import DataConfig

# -----------------------------------------------------------------------------
# the flags every training script takes

def add_common_args(parser, out_dir: str, lr: float, log_interval: int, eval_per_type: int):
    """Add the shared flags to `parser`, with this script's defaults for the few that differ."""
    add = parser.add_argument
    add("--out-dir", default=out_dir, help="checkpoint, metrics.jsonl and eval.json go here")
    add("--resume", action="store_true", help="continue from <out-dir>/ckpt exactly")
    add("--seed", type=int, default=0, help="seed of init, data order and augmentation")
    add("--device", default=None, help="cpu | cuda (default: cuda if available)")
    add("--dtype", default=None,
        help="autocast dtype on CUDA (default bfloat16); CPU trains in fp32")
    add("--compile", action="store_true",
        help="torch.compile the model (on CUDA it recompiles for new tile counts: see README)")
    add("--freeze", default="", help="comma list of parts to freeze: vit,mlp,llm")
    add("--max-seq-len", type=int, default=2048, help="longest sample, in tokens")
    add("--max-tiles", type=int, default=-1, help="tiles per image (-1 = config max_dynamic_patch)")
    add("--skip-bad-samples", action="store_true", help="count and skip bad data lines, don't stop")
    add("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (per rank)")
    add("--lr", type=float, default=lr, help="peak learning rate")
    add("--weight-decay", type=float, default=0.05)
    add("--warmup-ratio", type=float, default=0.03,
        help="share of a stage's steps for linear warmup")
    add("--clip", type=float, default=1.0, help="gradient norm clip (-1 = off)")
    add("--log-interval", type=int, default=log_interval, help="steps between log lines")
    add("--ckpt-interval", type=int, default=100, help="steps between checkpoints")
    add("--eval-per-type", type=int, default=eval_per_type,
        help="held-out questions per type (-1 = all, 0 = no eval)")
    add("--max-steps", type=int, default=-1,
        help="stop after this many steps in total (tests, or to resume)")


# -----------------------------------------------------------------------------
# distributed (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)

def dist_init(device_name: str | None = None):
    """-> (ddp, rank, world_size, device). gloo on CPU, nccl on CUDA; a plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return False, 0, 1, pick_device(device_name)
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
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
    Frozen groups get requires_grad=False and no optimizer state."""
    if bad := set(freeze) - set(GROUPS):
        raise UserError(f"--freeze: unknown part(s) {sorted(bad)} (use a comma list of "
                        f"{', '.join(GROUPS)})")
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
                groups.append({"params": params, "lr": lrs[name], "base_lr": lrs[name],
                               "weight_decay": wd, "name": name})
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


def data_config(cfg, max_tiles: int, max_seq_len: int):
    """The DataConfig of `cfg` (tile size, tokens per tile, thumbnail); max_tiles -1: cfg's."""
    return DataConfig(tokens_per_tile=cfg.num_image_token, image_size=cfg.vision.image_size,
                      max_dynamic_patch=cfg.max_dynamic_patch if max_tiles < 0 else max_tiles,
                      use_thumbnail=cfg.use_thumbnail, max_seq_len=max_seq_len)


# -----------------------------------------------------------------------------
# logging

def flops_per_token(cfg) -> float:
    """Training FLOPs per LLM token, 6 * LLM parameters + attention (nanoGPT's); ViT: per tile."""
    t = cfg.text
    per_layer = 2 * t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) \
        * t.head_dim + 3 * t.hidden_size * t.intermediate_size
    return 6 * (t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size)


def flops_per_tile(cfg) -> float:
    v = cfg.vision
    P = (v.image_size // v.patch_size) ** 2 + 1
    per_layer = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size
    return 6 * P * v.num_hidden_layers * (per_layer + 2 * P * v.hidden_size)


def measure_peak_flops(device, dtype=torch.float32, n=1024, reps=10, trials=5) -> float:
    """Matmul FLOP/s of this machine, measured (for an honest MFU): the best of a few trials, as a
    briefly busy shared host would understate the peak and overstate MFU."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best, sync = 0.0, torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(trials):
        sync()
        t = time.time()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n ** 3 * reps / (time.time() - t))
    return best


class Logger:
    """One dense line per interval on rank 0, and every record appended to metrics.jsonl."""

    def __init__(self, out_dir: str, rank: int):
        self.rank, self.path = rank, os.path.join(out_dir, "metrics.jsonl")
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
# the script skeleton

class Session:
    """One training process: torchrun/DDP state, the model as trained (compiled, DDP-wrapped if
    asked), autocast, the logger. The loop calls `model`; `raw`: the InternVL (saved, evaluated)."""

    def __init__(self, args):
        self.args, self.t_start = args, time.time()
        self.ddp, self.rank, self.world, self.device = dist_init(args.device)
        self.logger = Logger(args.out_dir, self.rank)
        self.raw = self.model = None

    def wrap(self, raw):
        self.raw = self.model = raw
        if self.args.compile:
            self.model = torch.compile(self.model)
        if self.ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=pick_dtype(self.args.dtype, self.device))
        return torch.autocast("cpu", enabled=False)

    def no_sync(self, last_micro: bool):
        """DDP's gradient all-reduce only after the last micro-batch of a step."""
        return self.model.no_sync() if self.ddp and not last_micro else torch.enable_grad()

    def optimizer_step(self, optimizer, params):
        if self.args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def write_eval(self, res: dict) -> dict:
        """<out-dir>/eval.json (atomic), with the wall time and the command."""
        res["wall_seconds"], res["command"] = time.time() - self.t_start, " ".join(sys.argv)
        write_json(os.path.join(self.args.out_dir, "eval.json"), res)
        return res

    def close(self):
        # free the DDP wrapper first: its reducer holds the process group, and a gloo group freed by
        # it (later, GIL held) can deadlock or abort at exit (pytorch/pytorch#56297)
        self.model = None
        if self.ddp:
            dist.destroy_process_group()
