"""
Speed bench: nanovl3 and transformers' InternVLForConditionalGeneration side by side, in one run, on
the same random weights (transformers draws them, nanovl3 loads its -hf save, as
tests/test_parity.py does).

    python bench.py                             # small shape, all figures: runs/bench/results.*
    python bench.py --publish                   # ... into the committed bench/results.{json,md}
    python bench.py --shape small,internvl3-1b  # also the 1B shape (random weights, bf16 inference)
    python bench.py --short                     # tiny shape, 2 repeats, few tokens: a smoke test
                                                # (~1 min; more while torch.compile fills its cache)
    python bench.py --figures decode,prefill    # a subset while developing
    python bench.py --shape internvl3-1b --figures memory   # fine-tuning memory, checkpointing

Every timed figure is the median of --repeats runs with its min-max, and the two implementations
alternate (A B A B ...) so that a shared, noisy host slows both alike. The ratio is nanovl3 /
transformers. Before timing, both models must produce the same greedy tokens in fp32 (else the
comparison is void).

  prefill          one forward of 1 (or 4) tiles + 64 text tokens, last position's logits, no cache
  decode b1 / b8   tokens/s after a 1-tile prompt, exactly --new-tokens tokens (no EOS), timed from
                   the first to the last sampled token. b1 greedy, alternated with two more nanovl3
                   rows: the torch.compile'd step (with `compile`), and the floor, the step's
                   matrix-vector products alone (every LLM product on one row through the same
                   calls, q/k/v and gate/up fused as decoding fuses them, called one by one from
                   Python): the most an eager step can reach. A compiled step, with no Python
                   between its products, may pass it.
                   b8: nanovl3 generate(num_samples=8) (Best-of-N: one prefill, 8 sampled rows);
                   transformers a batch of 8 identical prompts; both sample at temperature 1.
  train            forward + backward + AdamW step on one packed row of --train-tokens tokens (an
                   image document, then text documents). nanovl3 sees doc_ids and per-document
                   positions; transformers sees the same tokens as one sequence (full causal
                   attention, positions 0..T-1). MFU uses nanovl3.training.flops_per_token /
                   flops_per_tile and the measured matmul peak.
  sft packed/padded  nanovl3 only: 1 long + 7 short samples, packed into one row vs padded to 8
                   rows; tokens of real data per second of training step.
  load             peak RSS of from_pretrained (weights saved in the requested dtype, -hf layout) in
                   a fresh process, minus the RSS after the imports, over the bytes of the weights;
                   every page touched
  compile          nanovl3 eager vs torch.compile: decode step (b1, timed with `decode`) and
                   training step, and the compile time (skipped for internvl3-1b on CPU).
  memory           nanovl3 only: peak memory of one forward + backward (bf16 autocast over fp32
                   weights, 1 tile + text, min(--train-tokens, 1024) tokens) with and without
                   activation checkpointing (train.py --grad-checkpoint), each in a fresh process;
                   CPU: peak RSS, CUDA: max_memory_allocated. Not in `all` (the 1B shape: ~10 GB).
CUDA: bf16, clocks read after a synchronize, compiled decode with mode="reduce-overhead" (CPU:
Inductor freezing, with fast.py's split matrix-vector products inside the graph). CPU: bf16 for the
internvl3-1b shape, else fp32 (--dtype). The 1B shape's training figures need more memory than a CPU
host has (two models with AdamW state) and are skipped there.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from experiments.hf_reference import scramble  # re-draws every weight: each part moves the logits
from nanovl3.checkpoint import config_to_json
from nanovl3.common import ArgumentParser, atomic_path
from nanovl3.config import TextConfig, VisionConfig, VLConfig, preset
from nanovl3.data import Sample, collate_packed, collate_padded, pack_samples
from nanovl3.fast import speed_up
from nanovl3.generate import generate
from nanovl3.losses import IGNORE, lm_loss
from nanovl3.model import InternVL
from nanovl3.training import flops_per_tile, flops_per_token, measure_peak_flops

ROOT = os.path.dirname(os.path.abspath(__file__))
START = time.time()
TABLE_NOTE = (  # the header of results.md, after the command and the machine
    "Median of {repeats} alternated runs (min–max); ratio = nanovl3 / transformers, or "
    "compiled/eager and packed/padded where the nanovl3 column holds both. The floor row times "
    "only the decode step's matrix-vector products (the same calls, in the same order, one by "
    "one from Python): the most an eager step can reach; the compiled step, with no Python "
    "between them, may pass it. The small shape's batch-1 decode target is read on the compiled "
    "step (`generate(compile=True)`, `sample.py --compile`), the decode path the speed issue "
    "asks for; the internvl3-1b shape is not compiled on CPU (its compiled bf16 step is slower "
    "than eager).")

# -----------------------------------------------------------------------------
# args

parser = ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shape", default="small",
                    help="comma list of: tiny, small, toy, internvl3-1b")
parser.add_argument("--short", action="store_true",
                    help="tiny shape, 2 repeats, few tokens: a smoke test")
parser.add_argument("--figures", default="all",
                    help="comma list of: peak, prefill, decode, train, sft, load, compile, "
                         "memory (all: all but memory)")
parser.add_argument("--repeats", type=int, default=3,
                    help="timed runs per figure and implementation (median, min-max)")
parser.add_argument("--new-tokens", type=int, default=128,
                    help="tokens generated per decode run (EOS ignored)")
parser.add_argument("--text-tokens", type=int, default=64,
                    help="text tokens of the prefill / decode prompt")
parser.add_argument("--train-tokens", type=int, default=2048,
                    help="tokens of the packed training row (as train.py)")
parser.add_argument("--no-hf", action="store_true",
                    help="nanovl3 figures only, even if transformers is installed")
parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
parser.add_argument("--dtype", default="auto",
                    help="auto (bf16 on CUDA and for internvl3-1b, else fp32) | bf16 | fp32")
parser.add_argument("--out", default="runs/bench/results.json",
                    help="JSON results, a scratch path by default (runs/bench/results.json); the "
                         "table goes next to it as .md (both written atomically)")
parser.add_argument("--publish", action="store_true",
                    help="write the committed bench/results.json and .md instead of --out")
args = parser.parse_args()
if args.publish:  # a scratch run never replaces the published figures by accident
    args.out = "bench/results.json"
if args.short:
    args.shape, args.repeats, args.new_tokens, args.train_tokens = "tiny", 2, 8, 384
FIGURES = {"peak", "prefill", "decode", "train", "sft", "load", "compile", "memory"}
figures = FIGURES - {"memory"} if args.figures == "all" else set(args.figures.split(","))
assert figures <= FIGURES, f"--figures: unknown {sorted(figures - FIGURES)}"

device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
try:
    import transformers
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer
    HF = not args.no_hf
except ImportError:
    HF = False
torch.manual_seed(0)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock() -> float:
    sync()
    return time.perf_counter()


# -----------------------------------------------------------------------------
# shapes, and the same model in both implementations


def shape_config(name: str) -> VLConfig:
    # experiments/hf_reference.py's small configs: MLPs 2x wide, 4 heads (2 kv), 448-px tiles
    if name in ("tiny", "small"):
        w, n, vocab = (64, 2, 1024) if name == "tiny" else (256, 4, 8192)
        cfg = VLConfig(VisionConfig(hidden_size=w, intermediate_size=2 * w, num_attention_heads=4,
                                    num_hidden_layers=n),
                       TextConfig(vocab_size=vocab, hidden_size=w, intermediate_size=2 * w,
                                  num_hidden_layers=n, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=8192))
    else:
        cfg = preset(name)
    if cfg.text.vocab_size <= cfg.image_token_id:  # small vocabulary: special ids inside it
        (cfg.image_token_id, cfg.text.bos_token_id,
         cfg.text.eos_token_id) = cfg.text.vocab_size - 1, 0, 1
    return cfg


def build_models(cfg: VLConfig, dtype, tmp: str):
    """-> (nanovl3 model, transformers model or None): the same weights, in `dtype` on `device`."""
    if not HF:
        model = InternVL(cfg)
        model.init_weights(std=0.02)
        return model.to(device, dtype).eval(), None
    d = config_to_json(cfg, "hf")
    d["text_config"]["pad_token_id"] = 0
    d["text_config"].pop("torch_dtype")  # built in fp32, converted below
    ref = InternVLForConditionalGeneration(InternVLConfig.from_dict(d)).float().eval()
    scramble(ref)
    hf_dir = os.path.join(tmp, "hf")
    ref.save_pretrained(hf_dir)
    model = InternVL.from_pretrained(hf_dir, dtype=torch.float32, device="cpu")
    # fairness check, in fp32 (bf16 logits of a 150k vocabulary tie too often to compare exactly)
    ids, pix = prompt(cfg, 1, torch.float32, "cpu")
    n = 8
    with torch.inference_mode():
        want = ref.generate(input_ids=ids, pixel_values=pix, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, ids.size(1):].tolist()
    got = generate(model, [ids[0].tolist()], pix, max_new_tokens=n)[0]
    assert got == want, f"nanovl3 and transformers disagree on greedy tokens ({got} vs {want}): " \
                        f"the bench would compare two different computations"
    return model.to(device, dtype), ref.to(device, dtype)


def prompt(cfg: VLConfig, tiles: int, dtype, dev):
    """[1, T] ids: text/2, <IMG_CONTEXT> x 256 per tile, text/2; pixel_values [tiles, 3, S, S]."""
    text = args.text_tokens
    g = torch.Generator().manual_seed(tiles)
    n_img = cfg.num_image_token * tiles
    ids = torch.randint(2, cfg.text.vocab_size - 2, (1, text + n_img), generator=g)
    ids[0, text // 2: text // 2 + n_img] = cfg.image_token_id
    size = cfg.vision.image_size
    return ids.to(dev), torch.randn(tiles, 3, size, size, generator=g).to(dev, dtype)


# -----------------------------------------------------------------------------
# measuring: alternate the implementations, keep every sample


def alternate(fns: dict, warmups: dict | None = None) -> dict:
    """fns {name: () -> measurement}: one warm-up each, then --repeats rounds of A B A B ...
    -> {name: [values]}."""
    for name, fn in fns.items():
        (warmups or {}).get(name, fn)()
    out = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            out[name].append(fn())
    return out


def stats(values: list | None) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "samples": values}


RESULTS = {"command": " ".join(sys.argv), "device": str(device), "torch": torch.__version__,
           "transformers": transformers.__version__ if HF else None,
           "threads": torch.get_num_threads(), "meta": {}, "shapes": {}}
PEAK = {}  # dtype -> measured matmul FLOP/s


def record(shape: str, key: str, label: str, unit: str, nano: list, base: list | None = None,
           against=None, target=None, note: str = ""):
    """One row. base: the baseline's samples (transformers unless `against` names another nanovl3
    variant). target: (op, bound, on) with op '>=' or '<=', on 'ratio' or 'value'."""
    a, b = stats(nano), stats(base)
    ratio = a["median"] / b["median"] if b else None
    met = None
    if target is not None:
        op, bound, on = target
        x = ratio if on == "ratio" else a["median"]
        met = None if x is None else (x >= bound if op == ">=" else x <= bound)
    row = {"label": label, "unit": unit, "nanovl3": a, "baseline": b,
           "against": against or ("transformers" if b else None), "ratio": ratio, "met": met,
           "note": note,
           "target": None if target is None else f"{target[2]} {target[0]} {target[1]}"}
    RESULTS["shapes"].setdefault(shape, {})[key] = row
    print(f"  {label}: {fmt(a)} {unit}"
          + (f" | {row['against']}: {fmt(b)} | ratio {ratio:.2f}" if b else ""), flush=True)


def fmt(s: dict | None) -> str:
    if s is None:
        return "—"
    g = lambda x: f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{g(s['median'])} ({g(s['min'])}–{g(s['max'])})"


def timed(fn) -> float:
    t = clock()
    fn()
    return clock() - t


# -----------------------------------------------------------------------------
# peak memory of loading, in a fresh process

RSS = r"""
import json, resource, sys
import torch


def status(key):  # bytes, from /proc/self/status (Linux); None elsewhere
    try:
        return int(next(l for l in open("/proc/self/status")
                        if l.startswith(key)).split()[1]) * 1024
    except (OSError, StopIteration):
        return None


# ru_maxrss would still hold a transient peak of the imports: on Linux reset the high-water mark
# first (clear_refs) and read it back as VmHWM, the counter ru_maxrss reports
def reset_peak() -> int:  # -> the RSS now
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    return status("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    return status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""
LOAD_PROBE = RSS + r"""
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if which == "transformers":
    from transformers import InternVLForConditionalGeneration
from nanovl3.model import InternVL
base = reset_peak()
if which == "nanovl3":
    m = InternVL.from_pretrained(path, dtype=dtype, device="cpu")
else:
    m = InternVLForConditionalGeneration.from_pretrained(path, dtype=dtype)
params = {id(p): p for p in m.parameters()}.values()
for p in params:  # touch every page: a lazily memory-mapped load must count too
    p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].sum()
print(json.dumps({"base": base, "peak": peak_rss(),
                  "weights": sum(p.numel() * p.element_size() for p in params)}))
"""


def load_probe(which: str, path: str, dtype) -> float:
    r = subprocess.run([sys.executable, "-c", LOAD_PROBE, which, path, str(dtype)[6:]],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, f"load probe ({which}) failed:\n{r.stderr[-2000:]}"
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return (d["peak"] - d["base"]) / d["weights"]


# peak memory of one training step (train.py's fine-tuning path), in a fresh process
MEMORY_PROBE = RSS + r"""
from nanovl3.checkpoint import config_from_json
from nanovl3.losses import lm_loss
from nanovl3.model import InternVL
from nanovl3.training import checkpoint_layers
cfg, _ = config_from_json(json.loads(sys.argv[1]))
dev, T, grad_checkpoint = torch.device(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
with torch.device("meta"):
    model = InternVL(cfg)
model = model.to_empty(device=dev)  # fp32: the master weights
model.init_weights()
model.train()
if grad_checkpoint:
    checkpoint_layers(model)
g = torch.Generator().manual_seed(0)
ids = torch.randint(2, cfg.text.vocab_size - 2, (1, T), generator=g)
ids[0, 8:8 + cfg.num_image_token] = cfg.image_token_id  # one 448-px tile, then text
pix = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
ids, pix = ids.to(dev), pix.to(dev)
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    base = reset_peak()
with torch.autocast(dev.type, dtype=torch.bfloat16):
    loss = lm_loss(model(ids, pix), ids)
loss.backward()
peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else peak_rss()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"base": base, "peak": peak, "weights": weights}))
"""


def bench_memory(shape: str, cfg: VLConfig):
    """Peak memory of one step with and without --grad-checkpoint, each alone in a process."""
    T = min(args.train_tokens, 1024)
    got, cfg_json = {}, json.dumps(config_to_json(cfg, "hf"))  # -hf: keeps image_token_id
    for ckpt in (1, 0):
        r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, cfg_json, str(device), str(T),
                            str(ckpt)], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        assert r.returncode == 0, f"memory probe failed:\n{r.stderr[-2000:]}"
        got[ckpt] = json.loads(r.stdout.strip().splitlines()[-1])
    what = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
    GiB = 2 ** 30
    record(shape, "train_memory", f"{what} of one training step, {T} tokens (1 tile), bf16 "
           f"autocast, fp32 weights: checkpointed / not", "GiB", [got[1]["peak"] / GiB],
           [got[0]["peak"] / GiB], against="no checkpointing",
           note=f"fp32 weights alone: {got[1]['weights'] / GiB:.2f} GiB")
    record(shape, "train_memory_step", "the same, above the loaded weights (gradients + "
           "activations): checkpointed / not", "GiB", [(got[1]["peak"] - got[1]["base"]) / GiB],
           [(got[0]["peak"] - got[0]["base"]) / GiB], against="no checkpointing")


# -----------------------------------------------------------------------------
# decoding figures


def decoder(m, model, ids, pix, batch: int, n: int, compile: bool = False):
    """() -> decode tokens/s of `batch` rows x n tokens, first sampled token to last."""
    marks = []

    # transformers calls put(prompt) first, then put(token) per step
    class Marks(BaseStreamer if HF else object):
        def put(self, value):
            marks.append(clock())

        def end(self):
            pass

    def fn():
        marks.clear()
        if m is model:
            generate(model, [ids[0].tolist()], pix, max_new_tokens=n, num_samples=batch,
                     temperature=0.0 if batch == 1 else 1.0,
                     stream=lambda tokens: marks.append(clock()), compile=compile)
            first = marks[0]
        else:
            with torch.inference_mode():
                m.generate(input_ids=ids.repeat(batch, 1), pixel_values=pix.repeat(batch, 1, 1, 1),
                           attention_mask=torch.ones_like(ids).repeat(batch, 1), max_new_tokens=n,
                           min_new_tokens=n, do_sample=batch > 1, temperature=1.0, top_k=0,
                           top_p=1.0, eos_token_id=None, pad_token_id=0, streamer=Marks())
            first = marks[1]
        return batch * (n - 1) / (marks[-1] - first)
    return fn


def matvec_floor(model, n: int):
    """() -> tokens/s of n decode steps that do nothing but the step's matrix-vector products: every
    LLM product once, in decode order, on one row, through the same calls as decoding (fast.py's
    paths, q/k/v and gate/up fused). The weights stream from memory as in a real step; attention,
    norms, RoPE and the Python around them cost nothing here."""
    lm = speed_up(model).language_model
    calls = []  # groups of layers that read the same x: the products of a step, in order
    for block in lm.model.layers:
        a, mlp = block.self_attn, block.mlp
        calls += [(a.q_proj, a.k_proj, a.v_proj), (a.o_proj,), (mlp.gate_proj, mlp.up_proj),
                  (mlp.down_proj,)]
    calls.append((lm.lm_head,))
    dtype = lm.lm_head.weight.dtype
    xs = [torch.randn(1, 1, group[0].in_features, device=device, dtype=dtype)
          for group in calls]  # [1, 1, K]

    def fn():
        with torch.inference_mode():
            t = clock()
            for _ in range(n - 1):
                for group, x in zip(calls, xs):
                    for layer in group:
                        layer(x)
            return (n - 1) / (clock() - t)
    return fn


# -----------------------------------------------------------------------------
# training figures


def packed_row(cfg: VLConfig, T: int, dev):
    """One packed row of T tokens: an image document (1 tile + 64 text tokens), then text documents
    of 128 -> ids, positions (restarting per document), doc_ids [1,T]; pixel_values [1,3,S,S]."""
    g = torch.Generator().manual_seed(1)
    lens = [cfg.num_image_token + 64]
    while sum(lens) < T:
        lens.append(min(128, T - sum(lens)))
    ids = torch.randint(2, cfg.text.vocab_size - 2, (1, T), generator=g)
    ids[0, 8:8 + cfg.num_image_token] = cfg.image_token_id
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    size = cfg.vision.image_size
    pix = torch.randn(1, 3, size, size, generator=g)
    return ids.to(dev), pos.to(dev), doc.to(dev), pix.to(dev), len(lens)


def loss_step_fn(m, loss_fn, T: int):
    """() -> tokens/s of one forward + loss + backward + AdamW step; loss_fn() -> scalar loss."""
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5,
                            fused=device.type == "cuda")

    def fn():
        t = clock()
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return T / (clock() - t)
    return fn


def train_step_fn(m, fwd, ids):
    """() -> LLM tokens/s of one forward + backward + AdamW step; fwd() returns logits [1,T,V] for
    ids [1,T] and both implementations take the same loss."""
    return loss_step_fn(m, lambda: F.cross_entropy(fwd()[0, :-1].float(), ids[0, 1:]), ids.size(1))


def bench_train(shape: str, cfg: VLConfig, impls: dict):
    T = args.train_tokens
    ids, pos, doc, pix, n_docs = packed_row(cfg, T, device)
    for m in impls.values():
        m.train()
    dtype = next(impls["nanovl3"].parameters()).dtype
    pix = pix.to(dtype)
    fwd = {"nanovl3": lambda: impls["nanovl3"](ids, pix, position_ids=pos, doc_ids=doc)}
    if "transformers" in impls:
        fwd["transformers"] = lambda: impls["transformers"](input_ids=ids, pixel_values=pix,
                                                            use_cache=False).logits
    res = alternate({k: train_step_fn(impls[k], f, ids) for k, f in fwd.items()})
    record(shape, "train", f"train step, packed row of {T} tokens ({n_docs} documents, 1 tile)",
           "tok/s", res["nanovl3"], res.get("transformers"),
           target=(">=", 1.2, "ratio") if shape == "small" else None,
           note="transformers sees the row as one sequence (full causal attention, positions "
                "0..T-1)")
    peak = PEAK[dtype]
    flops = flops_per_token(cfg) * T + flops_per_tile(cfg)
    mfu = {k: [100 * flops / (T / v) / peak for v in vals] for k, vals in res.items()}
    record(shape, "train_mfu",
           f"train MFU (model FLOPs / measured {str(dtype)[6:]} peak {peak / 1e9:.0f} GFLOP/s)",
           "%", mfu["nanovl3"], mfu.get("transformers"))
    # plain text (no packing), each with its own loss: nanovl3's lm_loss, transformers' labels=
    text = ids.masked_fill(ids == cfg.image_token_id, 2)
    fwd = {"nanovl3": lambda: lm_loss(impls["nanovl3"](text), text)}
    if "transformers" in impls:
        fwd["transformers"] = lambda: impls["transformers"](input_ids=text, labels=text,
                                                            use_cache=False).loss
    res = alternate({k: loss_step_fn(impls[k], f, T) for k, f in fwd.items()})
    record(shape, "train_text", f"train step, plain text of {T} tokens, each with its own loss",
           "tok/s", res["nanovl3"], res.get("transformers"),
           note="nanovl3.losses.lm_loss vs transformers' loss")
    for m in impls.values():
        m.eval()
        m.zero_grad(set_to_none=True)


def bench_sft(shape: str, cfg: VLConfig, model):
    """Packed vs padded SFT on a length-skewed batch: 1 long sample and 7 short ones, text only."""
    g = torch.Generator().manual_seed(2)
    long, short = args.train_tokens * 3 // 4, args.train_tokens // 16
    samples = []
    for n in [long] + [short] * 7:
        ids = torch.randint(2, cfg.text.vocab_size - 2, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 2] = IGNORE  # the prompt half: no loss
        samples.append(Sample(ids, labels, None, []))
    real = sum(len(s.input_ids) for s in samples)
    size = cfg.vision.image_size
    packs = pack_samples(samples, max_packed_tokens=real, max_tiles=1)
    batches = {"packed": [collate_packed(p, 0, size) for p in packs],
               "padded": [collate_padded(samples, 0, size)]}
    dtype = next(model.parameters()).dtype
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    model.train()

    def run(bs):
        bs = [{k: v.to(device, dtype) if k == "pixel_values" else v.to(device)
               for k, v in b.items()} for b in bs]

        def fn():
            t = clock()
            for b in bs:
                logits = model(b["input_ids"], b["pixel_values"], b["image_flags"],
                               b["position_ids"], b["doc_ids"])
                lm_loss(logits, b["labels"], b["loss_weight"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return real / (clock() - t)
        return fn
    res = alternate({k: run(bs) for k, bs in batches.items()})
    slots = {k: sum(b["input_ids"].numel() for b in bs) for k, bs in batches.items()}
    record(shape, "sft_packed_vs_padded",
           f"SFT real tok/s, packed ({slots['packed']} slots) / padded ({slots['padded']} slots), "
           f"1x{long} + 7x{short} tokens", "tok/s", res["packed"], res["padded"], against="padded",
           target=(">=", 1.8, "ratio"))
    model.eval()
    model.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# eager vs torch.compile (nanovl3)


def bench_compile(shape: str, cfg: VLConfig, model):
    """The training step, torch.compile against eager; compile time = first call - second. (The
    compiled decode step is timed with the other decoders.)"""
    ids_t, pos, doc, pix_t, _ = packed_row(cfg, args.train_tokens, device)
    pix_t = pix_t.to(next(model.parameters()).dtype)
    model.train()
    compiled_model = torch.compile(model)
    steps = {name: train_step_fn(model, lambda m=m: m(ids_t, pix_t, position_ids=pos, doc_ids=doc),
                                 ids_t)
             for name, m in [("compiled", compiled_model), ("eager", model)]}
    first, second = timed(steps["compiled"]), timed(steps["compiled"])
    res = alternate(steps, {"compiled": lambda: None})
    record(shape, "compile_train", "train step, torch.compile / eager", "tok/s", res["compiled"],
           res["eager"], against="eager")
    record(shape, "compile_train_s", "compile time, train step", "s", [first - second])
    model.eval()
    model.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# the figures of one shape


def figures_of_shape(shape: str, cfg: VLConfig, dtype, model, ref, tmp: str):
    impls = {"nanovl3": model} | ({"transformers": ref} if ref is not None else {})
    if "peak" in figures or "train" in figures:  # the machine's matmul peak, for MFU
        for dt in [torch.float32] + ([dtype] if dtype != torch.float32 else []):
            peak = [measure_peak_flops(device, dt) / 1e9 for _ in range(args.repeats)]
            PEAK[dt] = max(peak) * 1e9
            if "peak" in figures:
                record(shape, f"peak_{str(dt)[6:]}", f"matmul peak {str(dt)[6:]}", "GFLOP/s", peak)

    if "prefill" in figures:
        for tiles in (1, 4):
            ids, pix = prompt(cfg, tiles, dtype, device)

            def run(m):
                def fn():
                    with torch.inference_mode():
                        t = clock()
                        if m is model:
                            m(ids, pix, last_only=True)
                        else:
                            m(input_ids=ids, pixel_values=pix, logits_to_keep=1, use_cache=False)
                        return (clock() - t) * 1e3
                return fn
            res = alternate({k: run(m) for k, m in impls.items()})
            target = ("<=", 0.8, "ratio") if shape == "internvl3-1b" and tiles == 1 else None
            record(shape, f"prefill_{tiles}tile",
                   f"prefill {tiles} tile{'s' * (tiles > 1)} + {args.text_tokens} text tokens",
                   "ms", res["nanovl3"], res.get("transformers"), target=target)

    cpu_1b = device.type == "cpu" and shape == "internvl3-1b"
    train_ok = not cpu_1b  # fp32 AdamW of two 1B models: > host RAM
    compile_decode = "compile" in figures and not cpu_1b  # compiled bf16 1B step: slower than eager
    if "decode" in figures:
        ids, pix = prompt(cfg, 1, dtype, device)
        for batch in (1, 8):
            fns = {k: decoder(m, model, ids, pix, batch, args.new_tokens) for k, m in impls.items()}
            warm = {k: decoder(m, model, ids, pix, batch, 3) for k, m in impls.items()}
            if batch == 1:  # also alternated: a step's matrix-vector floor, the compiled step
                fns["floor"] = warm["floor"] = matvec_floor(model, args.new_tokens)
                if compile_decode:
                    fns["compiled"] = decoder(model, model, ids, pix, 1, args.new_tokens,
                                              compile=True)
                    # the first call compiles, the second hits the cache
                    first, second = timed(fns["compiled"]), timed(fns["compiled"])
                    warm["compiled"] = lambda: None
            res = alternate(fns, warm)
            target = {("small", 1): (">=", 3.0, "ratio"),
                      ("internvl3-1b", 1): (">=", 1.5, "ratio")}.get((shape, batch))
            # read the target on the compiled step where timed (the decode path the issue asks for)
            eager_target, compiled_target = ((None, target) if batch == 1 and compile_decode
                                             else (target, None))
            how = "greedy" if batch == 1 else "Best-of-N vs 8 identical prompts, temperature 1"
            record(shape, f"decode_b{batch}", f"decode batch {batch} ({how})", "tok/s",
                   res["nanovl3"], res.get("transformers"), target=eager_target)
            if batch == 1:
                record(shape, "decode_b1_floor",
                       "decode batch 1 floor: the step's matrix-vector products alone", "tok/s",
                       res["floor"], res.get("transformers"))
            if batch == 1 and compile_decode:  # the rows of the compiled step
                record(shape, "decode_b1_compiled", "decode batch 1, torch.compile", "tok/s",
                       res["compiled"], res.get("transformers"), target=compiled_target)
                record(shape, "compile_decode", "decode batch 1, torch.compile / eager", "tok/s",
                       res["compiled"], res["nanovl3"], against="eager")
                record(shape, "compile_decode_s", "compile time, decode step", "s",
                       [first - second])

    if "load" in figures:
        load_dir = os.path.join(tmp, "load")  # requested dtype, -hf layout (both read it)
        model.save_pretrained(load_dir, layout="hf")
        fns = {k: (lambda k=k: load_probe(k, load_dir, dtype)) for k in impls}
        res = alternate(fns, {k: (lambda: None) for k in impls})
        # none for tiny: fixed costs dominate
        target = ("<=", 1.3, "value") if shape in ("small", "internvl3-1b") else None
        record(shape, "load_peak", f"load peak RSS / weight bytes ({str(dtype)[6:]})", "x",
               res["nanovl3"], res.get("transformers"), target=target)

    if ("train" in figures or "sft" in figures or "compile" in figures) and not train_ok:
        print("  training figures skipped: two 1B models with fp32 AdamW state do not fit this "
              "host", flush=True)
    if "train" in figures and train_ok:
        bench_train(shape, cfg, impls)
    if "sft" in figures and train_ok:
        bench_sft(shape, cfg, model)
    if "compile" in figures and train_ok:
        bench_compile(shape, cfg, model)


def bench_shape(shape: str):
    cfg = shape_config(shape)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or (
        torch.bfloat16 if device.type == "cuda" or shape == "internvl3-1b" else torch.float32)
    print(f"\n== {shape}: ViT {cfg.vision.hidden_size}x{cfg.vision.num_hidden_layers}, "
          f"LLM {cfg.text.hidden_size}x{cfg.text.num_hidden_layers}, vocab {cfg.text.vocab_size}, "
          f"{cfg.vision.image_size}-px tiles, {dtype}, {device}", flush=True)
    RESULTS["meta"][shape] = {"dtype": str(dtype), "vision": vars(cfg.vision),
                              "text": vars(cfg.text)}
    # compile each shape as a fresh process would: code compiled for an earlier shape makes
    # torch.compile recompile with dynamic shapes (toy train step: 1,106 s after the small shape's,
    # 23 s alone)
    torch._dynamo.reset()
    if "memory" in figures:  # first, before this process holds any model
        bench_memory(shape, cfg)
    if not figures - {"memory"}:
        return
    with tempfile.TemporaryDirectory(prefix="nanovl3-bench-") as tmp:
        t0 = time.time()
        model, ref = build_models(cfg, dtype, tmp)
        print(f"  models built{' and checked equal (greedy tokens, fp32)' if ref else ''} in "
              f"{time.time() - t0:.0f}s", flush=True)
        figures_of_shape(shape, cfg, dtype, model, ref, tmp)


# -----------------------------------------------------------------------------
# run, print the table, write the JSON


def table() -> list[str]:
    lines = ["| shape | figure | nanovl3 | transformers | ratio | target |",
             "|---|---|---|---|---|---|"]
    for shape, rows in RESULTS["shapes"].items():
        for row in rows.values():
            a, b = fmt(row["nanovl3"]), fmt(row["baseline"])
            # a nanovl3-only comparison: both values in our column
            if row["against"] not in (None, "transformers"):
                a, b = f"{a} / {b}", "—"
            ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}"
            met = {True: " ✔", False: " ✘", None: ""}[row["met"]]
            target = "—" if row["target"] is None else row["target"] + met
            lines.append(f"| {shape} | {row['label']} ({row['unit']}) | {a} | {b} | {ratio} | "
                         f"{target} |")
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    if device.type == "cuda":
        cpu = torch.cuda.get_device_name()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, " \
           f"transformers {RESULTS['transformers']}"


for shape in args.shape.split(","):
    bench_shape(shape)

wall = time.time() - START
RESULTS["wall_s"] = round(wall)
rows = "\n".join(table())
print("\n" + rows)
head = (f"Command: `python {RESULTS['command']}` ({int(wall // 60)} min {int(wall % 60)} s wall, "
        f"{machine()}; JSON in {os.path.basename(args.out)}). "
        f"{TABLE_NOTE.format(repeats=args.repeats)}")
md = "# bench.py results\n\n" + head + "\n\n" + rows + "\n"
with atomic_path(args.out) as tmp_out:
    with open(tmp_out, "w") as f:
        json.dump(RESULTS, f, indent=1)
with atomic_path(os.path.splitext(args.out)[0] + ".md") as tmp_md:
    with open(tmp_md, "w") as f:
        f.write(md)
print(f"\nwrote {args.out} and its .md")
