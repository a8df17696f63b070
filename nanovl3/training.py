"""What train.py (pre-training, SFT) and mpo.py (preference training) share: flags, torchrun, DDP or
FSDP2, activation checkpointing, parameter groups, the lr schedule, saving and resuming, the log
line + metrics.jsonl, MFU, eval.json. No training loop: each script reads top to bottom as args ->
init -> data -> model -> loop. Checkpoints: checkpoint.py; held-out evaluation: evaluate.py."""

import functools
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import checkpoint

from nanovl3.checkpoint import restore_run, save_run
from nanovl3.common import (UserError, check_values, eprint, pick_device, pick_dtype, print0,
                            write_json)
from nanovl3.data import DataConfig
from nanovl3.model import InternVL

# -----------------------------------------------------------------------------
# the flags every training script takes

def add_common_args(parser, out_dir: str, lr: float, log_interval: int, eval_per_type: int):
    """Add the shared flags to `parser`, with this script's defaults for the few that differ."""
    add = parser.add_argument
    add("--out-dir", default=out_dir, help="checkpoint, metrics.jsonl and eval.json go here")
    add("--resume", action="store_true", help="continue from <out-dir>/ckpt exactly")
    add("--overwrite", action="store_true", help="start over in an --out-dir that holds a run "
        "(metrics.jsonl, eval.json deleted; the checkpoint replaced at the first save)")
    add("--seed", type=int, default=0, help="seed of init, data order and augmentation")
    add("--device", default=None, help="cpu | cuda (default: cuda if available)")
    add("--threads", type=int, default=-1, help="CPU threads of torch (-1 = one per core); 1 "
        "when other processes keep the cores busy")
    add("--dtype", default=None,
        help="autocast dtype; weights stay fp32 (default: bfloat16 on CUDA, none on CPU)")
    add("--compile", action="store_true",
        help="torch.compile the model (on CUDA it recompiles for new tile counts: see README)")
    add("--freeze", default="", help="comma list of parts to freeze: vit,mlp,llm")
    add("--grad-checkpoint", action="store_true", help="recompute each ViT and LLM layer in "
        "backward: less activation memory, ~1/3 more compute")
    add("--fsdp", action="store_true",
        help="under torchrun: shard weights, gradients and optimizer state (FSDP2), not DDP")
    add("--max-seq-len", type=int, default=2048, help="longest sample, in tokens")
    add("--max-tiles", type=int, default=-1, help="tiles per image (-1 = config max_dynamic_patch)")
    add("--skip-bad-samples", action="store_true", help="count and skip bad data lines, don't stop")
    add("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (per rank)")
    add("--lr", type=float, default=lr, help="peak learning rate")
    add("--weight-decay", type=float, default=0.05)
    add("--warmup-ratio", type=float, default=0.03, help="share of a stage's steps for warmup")
    add("--clip", type=float, default=1.0, help="gradient norm clip (-1 = off)")
    add("--log-interval", type=int, default=log_interval, help="steps between log lines")
    add("--ckpt-interval", type=int, default=100, help="steps between checkpoints")
    add("--eval-per-type", type=int, default=eval_per_type,
        help="held-out questions per type (-1 = all, 0 = no eval)")
    add("--max-steps", type=int, default=-1, help="stop after this many steps in all (tests)")


POSITIVE = (lambda v: v >= 1, "at least 1")
COMMON_RANGES = {  # checked by Session before any work
    "--lr": (lambda v: 0 < v < math.inf, "a number > 0"),
    "--weight-decay": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "--warmup-ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "--clip": (lambda v: 0 < v < math.inf or v == -1, "> 0, or -1 (off)"),
    "--grad-accum": POSITIVE, "--log-interval": POSITIVE, "--ckpt-interval": POSITIVE,
    "--max-seq-len": POSITIVE,
    "--max-tiles": (lambda v: v >= 1 or v == -1, "at least 1, or -1 (the config's)"),
    "--threads": (lambda v: v >= 1 or v == -1, "at least 1, or -1 (torch's default)"),
    "--eval-per-type": (lambda v: v >= -1, "a count, 0 (none) or -1 (all)"),
    "--max-steps": (lambda v: v >= -1, "a count, or -1 (no limit)"),
}


# -----------------------------------------------------------------------------
# distributed (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)

def dist_init(device_name: str | None = None):
    """-> (ddp, rank, world_size, device). gloo on CPU, nccl on CUDA; a plain run is rank 0 of 1."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return False, 0, 1, device
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
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
    # fused on CPU too: one kernel per step, not ~10 per tensor (toy model, 1 thread: 2.2 vs 9.7 ms
    # a step; the per-tensor loop also stalls far worse when other processes hold the cores)
    return torch.optim.AdamW(groups, betas=betas, eps=1e-8, fused=True)


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
    """One dense line per interval on rank 0, and every record appended to metrics.jsonl. A
    checkpoint keeps the file's size; a resumed run cuts what came after, so no step repeats."""

    def __init__(self, out_dir: str, rank: int):
        self.rank, self.path = rank, os.path.join(out_dir, "metrics.jsonl")
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)

    def size(self) -> int:
        return os.path.getsize(self.path) if self.rank == 0 and os.path.isfile(self.path) else 0

    def truncate(self, size: int | None):
        if self.rank == 0 and size is not None and os.path.isfile(self.path):
            os.truncate(self.path, min(size, os.path.getsize(self.path)))

    def log(self, record: dict, line: str | None = None):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if line:
            print0(line)


# -----------------------------------------------------------------------------
# memory: activation checkpointing, FSDP2 (both from the outside: state_dict names stay the same)

def layers(model: InternVL) -> list:
    """The repeated blocks: every ViT encoder layer, then every LLM decoder layer."""
    return [*model.vision_model.encoder.layers, *model.language_model.model.layers]


def checkpoint_layers(model: InternVL):
    """Each layer keeps only its input for backward and recomputes the rest there (drop path
    included: checkpoint restores the RNG state), so activations of one layer are alive, not all."""
    for block in layers(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def shard(model: InternVL):
    """FSDP2: each layer is one all-gather unit; embeddings, projector, final norm and head go
    with the root. Parameters become DTensors holding this rank's shard."""
    for block in layers(model):
        fully_shard(block)
    fully_shard(model)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0's CPU


# -----------------------------------------------------------------------------
# the script skeleton

def warn_if_busy(device):
    """Torch's threads wait on each other when other processes hold the cores: say so, once."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if device.type == "cpu" and torch.get_num_threads() > 1 and load > cores - 0.5:
        eprint(f"note: load average {load:.1f} on {cores} cores (other processes are busy): "
               "--threads 1 (or OMP_NUM_THREADS=1) trained the toy 2x faster than 2 threads on a "
               "busy 2-core machine")


def claim_out_dir(args, rank: int):
    """Before any work: an --out-dir holding a run is continued (--resume) or replaced
    (--overwrite), never silently written over."""
    found = [f for f in ("ckpt", "metrics.jsonl") if os.path.exists(os.path.join(args.out_dir, f))]
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite: give one (continue the run, or start over)")
    if found and not (args.resume or args.overwrite):
        raise UserError(f"--out-dir {args.out_dir} already holds a run ({', '.join(found)}): "
                        "continue it with --resume, or start over with --overwrite")
    if args.overwrite and rank == 0:  # the old checkpoint stays until the new one replaces it
        for f in ("metrics.jsonl", "eval.json"):
            if os.path.isfile(os.path.join(args.out_dir, f)):
                os.remove(os.path.join(args.out_dir, f))


@contextmanager
def ctrl_c_after():
    """Ctrl-C (SIGINT) during the block takes effect when it ends, so that the block runs whole.
    Only where Ctrl-C raises KeyboardInterrupt, Python's default (not where it is ignored), and in
    the main thread (the only one that may set a handler)."""
    if (signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    pressed = []
    signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


class Session:
    """One training process: torchrun state, the model as trained (checkpointed, FSDP-sharded or
    DDP-wrapped, compiled: as asked), autocast, the logger, saving and resuming. The loop calls
    `model`; `raw`: the InternVL (sharded under FSDP: full_model() gathers it).
    `with Session(args) as S:` turns Ctrl-C into one line: where it stopped, how to resume."""

    def __init__(self, args, ranges: dict = {}):  # ranges: the script's own, as COMMON_RANGES
        self.args, self.t_start = args, time.time()
        check_values({**COMMON_RANGES, **ranges}, args)
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        self.ddp, self.rank, self.world, self.device = dist_init(args.device)
        self.fsdp = args.fsdp
        if self.fsdp and not self.ddp:
            raise UserError("--fsdp: run under torchrun (torchrun --nproc-per-node N ... --fsdp)")
        claim_out_dir(args, self.rank)
        if self.rank == 0:
            warn_if_busy(self.device)
        self.logger = Logger(args.out_dir, self.rank)
        self.raw = self.model = None
        self.at, self.saved = "start-up", None  # the loop says where it is; save() what it saved

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is KeyboardInterrupt and not str(exc):  # common.user_errors prints this line
            raise KeyboardInterrupt(self.interrupted()) from None
        return False

    def interrupted(self) -> str:
        """`interrupted at sft step N; last checkpoint DIR (step M): resume with <the command>`."""
        if self.saved is None:
            return f"interrupted at {self.at}; no checkpoint was written yet"
        argv = [a for a in sys.argv[1:] if a != "--overwrite"]
        again = shlex.join(["python", os.path.basename(sys.argv[0]), *argv]
                           + ([] if "--resume" in argv else ["--resume"]))
        return f"interrupted at {self.at}; last checkpoint {self.saved}: resume with {again}"

    def wrap(self, raw):
        self.raw = self.model = raw
        if self.args.grad_checkpoint:
            checkpoint_layers(raw)
        if self.fsdp:
            shard(raw)
        if self.args.compile:
            self.model = torch.compile(self.model)
        if self.ddp and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def autocast(self):
        """Mixed precision: weights (the master copy) and optimizer state stay fp32."""
        dtype = pick_dtype(self.args.dtype, self.device)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def no_sync(self, last_micro: bool):
        """Gradients reduced across ranks only after the last micro-batch of a step."""
        if self.fsdp:
            self.raw.set_requires_gradient_sync(last_micro)
            return nullcontext()
        return self.model.no_sync() if self.ddp and not last_micro else nullcontext()

    def optimizer_step(self, optimizer, params):
        if self.args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def full_model(self, device=None) -> InternVL | None:
        """The model unsharded, for saving and evaluating: `raw` itself, or under FSDP a gathered
        copy on rank 0 (None elsewhere; every rank must call, as it gathers)."""
        if not self.fsdp:
            return self.raw
        state = get_model_state_dict(self.raw, options=FULL)
        if self.rank != 0:
            return None
        with torch.device("meta"):
            model = InternVL(self.raw.cfg)
        model.load_state_dict(state, assign=True)
        if model.cfg.text.tie_word_embeddings:  # assign untied the shared Parameter: tie again
            model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
        return model.to(device or "cpu").eval()

    def save(self, path: str, tok, stream, optimizer, train_state: dict):
        """<path>/ (checkpoint.save_run): a model sample.py loads + what resumes the run exactly.
        Every rank calls. The optimizer state is gathered into one dict keyed by parameter name,
        the same for one process, DDP and FSDP: simple, and a full copy fits one host's RAM at the
        sizes this trains (shards per rank would only pay off beyond that)."""
        optim = get_optimizer_state_dict(self.raw, optimizer, options=FULL)
        with ctrl_c_after():   # the checkpoint on disk and the note of it, for interrupted()
            save_run(path, self.full_model(), tok, stream, {**train_state, "optimizer": optim,
                                                            "metrics_bytes": self.logger.size()},
                     self.rank, self.world)
            self.saved = f"{path} ({train_state['stage']} step {train_state['step']})"

    def restore(self, state: dict, optimizer, stream):
        """The other half of save: data cursor and RNG of this rank, then its optimizer state."""
        restore_run(state, stream, self.rank, self.world)
        self.logger.truncate(state.get("metrics_bytes"))  # the steps after it are done again
        self.saved = (f"{os.path.join(self.args.out_dir, 'ckpt')} ({state['stage']} step "
                      f"{state['step']})")
        # every rank read the whole file: each keeps its own shard (or all of it)
        set_optimizer_state_dict(self.raw, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))

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
            dist.barrier()   # no rank tears the group down while another still uses it
            dist.destroy_process_group()
