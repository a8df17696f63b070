"""
Toy reproductions of the papers' claims: each is a small controlled experiment on the toy world, run
with the project's own train.py / experiments/reasoning.py (no second training loop), over several
seeds, into one JSON table and one Pillow plot per claim. Run from the repository root:

    python -m experiments.ablations --quick   # every ablation, reduced, 2-core CPU (<= 30 min)
    python -m experiments.ablations           # the full form (toy recipe per arm, 3 seeds): a GPU
    python -m experiments.ablations --jobs 8  # the same, 8 arms at once (one toy arm idles a GPU)
    python -m experiments.ablations --only loss,jpeg --seeds 0,1,2 --out runs/abl
    python -m experiments.ablations --only v2pe --set v2pe_sft=1200 --out runs/abl_long  # one count
    python -m experiments.ablations --quick --out runs/abl_quick \\
        --publish experiments/results/ablations_quick   # + a copy of results, plots there

Ablations (--only picks some):
  native  InternVL3 §2.2, native vs post-hoc: (a) pre-training updates every parameter on
          interleaved image-text + pure text; (b) the LLM is first trained on text alone, then the
          vision side is attached and warmed up with the LLM frozen (half the steps each: the same
          tokens). Both then get the same SFT. Held-out VQA accuracy and pure-text perplexity.
  v2pe    InternVL3 Table 12, the V2PE step δ: fine-tuned from the same native checkpoint on a
          multi-image needle in a haystack (V2PE's MM-NIAH test in small: 2-4 pictures, all
          empty tiles but one close-up; "What colour is it?") with δ in {1, 1/4, 1/16, 1/256} or
          random per image; evaluated on 4, 16, 32 and 64 pictures, up to 12x the positions of any
          training sample. Fixed-δ arms are evaluated at their δ, the random arm at each of the
          four (the paper's table). The paper applies V2PE in pre-training; here δ is applied in the
          fine-tuning on the task, from the shared native checkpoint.
  loss    InternVL2.5 §4, loss averaging: SFT with token, sample and square averaging on the toy
          mix, whose answers are one word (VQA) or a 5-10 line chain of thought (arithmetic);
          accuracy on short answers (the one-word types the toy teaches: SHORT_TYPES) and on
          long ones.
  jpeg    InternVL2.5 §4, random JPEG compression (quality 75-100) in SFT, on and off: fine-tuned
          from the same native checkpoint on a detail task the toy world's flat pictures lack
          ("Which way do the stripes run?" over faint stripes of a 2-px period, finer than JPEG's
          8x8 blocks); evaluated on held-out pictures as they are and re-encoded as JPEG at
          quality 40 and 10, beside a pixel check with no model (what the pictures still show).
  mpo     MPO vs SFT only, and Best-of-N with the toy VisualPRM (experiments/reasoning.py on each
          seed's SFT checkpoint); how often the PRM ranks a right answer above a wrong one to the
          same question (prm_ranking) says whether its Best-of-N rows measure the claim (but a
          yes against N = 1 or majority voting, which a PRM that ranks like a coin cannot cause).
Arms are cached: one whose directory holds a DONE file with the same command is not run again
(--redo: rerun all); a stopped reasoning arm run again with the same command carries on from its
finished stages (a session can end inside its hour-long PRM training; train.py writes a checkpoint
every 100 steps). An arm that several ablations share (pt_native, sft_native) is trained once; with
--jobs N, the ablations and seeds run side by side, each waiting for the arms it needs, N arms
training at a time; evaluation stays one at a time.
Writes <out>/results.json (per arm and seed, mean and spread over seeds, wall times),
<out>/<ablation>.png and <out>/results.md (the README's table: each paper claim, the toy comparison,
agree or not; --report redraws them).
"""

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from statistics import mean, pstdev

import torch
from PIL import ImageChops, ImageStat

from data import toyworld
from experiments import plot
from experiments.prm_canary import prm_ranking
from nanovl3.chat import Tokenizer
from nanovl3.common import (UserError, atomic_path, read_json, read_jsonl, user_errors,
                            write_json, write_jsonl)
from nanovl3.evaluate import evaluate, load_eval_items, text_perplexity
from nanovl3.image import jpeg_roundtrip
from nanovl3.model import InternVL

ROOT = Path(__file__).resolve().parent.parent   # the repository root: where the arms run

ABLATIONS = ["native", "v2pe", "loss", "jpeg", "mpo"]
# steps of each kind of run; eval questions per type; seeds; experiments/reasoning.py sizes
SIZES = {
    "smoke": dict(pretrain=2, sft=2, v2pe_sft=2, v2pe_lr=1e-3, v2pe_train=20, eval_per_type=2,
                  v2pe_eval=2, seeds="0,1", jpeg_sft=2, jpeg_train=12, jpeg_eval=6,
                  reasoning=["--n-train", "4", "--n-eval", "3", "--rollouts", "2",
                             "--mpo-steps", "2", "--prm-steps", "2", "--mc", "1",
                             "--max-new-tokens", "12", "--reference-chosen"]),
    "quick": dict(pretrain=120, sft=300, v2pe_sft=150, v2pe_lr=1e-3, v2pe_train=3000,
                  eval_per_type=40, v2pe_eval=10, seeds="0,1", jpeg_sft=100, jpeg_train=2000,
                  jpeg_eval=150,
                  reasoning=["--n-train", "100", "--n-eval", "80", "--mpo-steps", "40",
                             "--prm-steps", "80", "--mc", "2"]),
    # V2PE: at lr 1e-3 two of fifteen full arms stayed at 78-86% at the training length (seed 1
    # δ 1/256, seed 2 random); at 5e-4 seed 1's δ 1/256 arm reached 100% (measured). The PRM
    # (results/prm_canary): labels that check each stated count, 6,000 questions (~15,700
    # conversations) and lr 1e-4; on seed 0 it ranked answers at 0.637 after 3,600 steps, 0.730
    # after 7,200 and 0.728 after 18,000 (measured), so it trains 7,200 (8,000 more conversations
    # of count steps labelled against the picture, --prm-count, lowered it on two seeds of three:
    # results/ablations_mpo). 3,000 held-out questions:
    # on 300, one accuracy's sampling error (~2.8 points) was as large as MPO − SFT's spread over
    # three seeds (+2.9 ± 2.9, measured); on 3,000 it is ~0.9
    "full": dict(pretrain=250, sft=2300, v2pe_sft=400, v2pe_lr=5e-4, v2pe_train=6000,
                 eval_per_type=100, v2pe_eval=50, seeds="0,1,2", jpeg_sft=600, jpeg_train=6000,
                 jpeg_eval=300,
                 reasoning=["--grade", "counts", "--n-train", "6000", "--n-eval", "3000",
                            "--prm-lr", "1e-4", "--prm-steps", "7200"]),
}
V2PE_ARMS = {"1": 1.0, "1/4": 0.25, "1/16": 1 / 16, "1/256": 1 / 256, "random": None}
# the arms with a fixed δ; the random arm is evaluated at each of these δ
FIXED_DELTAS = {k: d for k, d in V2PE_ARMS.items() if d is not None}
# the V2PE task, a multimodal needle in a haystack (as MM-NIAH in V2PE, arXiv 2412.09616): empty
# tiles and one close-up; trained on NEEDLE_TRAIN pictures, evaluated on NEEDLE_IMAGES
NEEDLE_TRAIN = (2, 4)            # pictures per training question (inclusive range)
# pictures per evaluation question: the training length and 4-16x it. The last position of a
# 4-picture question is 134 at δ = 1 (74 at δ <= 1/16: each picture's tag text still counts);
# of 64 pictures 1,622 (662); pre-training documents stay under ~240 tokens
NEEDLE_IMAGES = (4, 16, 32, 64)
NEEDLE_QUESTION = "One picture shows a shape. What colour is it?"
# the degraded held-out pictures: harsher than the 75-100 seen in training
JPEG_QUALITIES = (40, 10)
# the JPEG task's ViT learning rate: it needs new filters for 2-px stripes (the native checkpoint's
# ViT reads flat colours). Measured, seed 0: 2-4 px stripes at 1e-3 were at chance for 700 steps;
# 2-px ones at 3e-3 read 100% from step 300
JPEG_LR_VIT = 3e-3
# one-word answers: the short types the toy teaches. Position and count_color stay at chance
# whatever the recipe (toyworld.VQA_MIX; 47-57% and 26-35% on every loss arm, measured), so they
# cannot show a loss favouring them; results.json keeps every type's accuracy (acc_<type>)
SHORT_TYPES = ["color", "shape", "count"]
LONG_TYPES = ["arith"]   # chain of thought, "The answer is X."


# -----------------------------------------------------------------------------
# data the ablations add to the toy world


def make_needle_data(root: Path, n_train: int, n_eval: int, seed: int = 0):
    """The long multi-image task, a needle in a haystack of pictures: n toy tiles, all empty but
    one, which holds a close-up (one big shape, as in the toy world's colour questions); the
    question asks its colour. Training questions have NEEDLE_TRAIN pictures, evaluation ones
    NEEDLE_IMAGES, so the answer must be found at distances no training sample had. Training and
    evaluation draw from separate pools of pictures (15 and 5 per (colour, shape), 45 and 15
    empty tiles), rendered once."""
    params = {"n_train": n_train, "n_eval": n_eval, "pictures": "needle",
              "train": list(NEEDLE_TRAIN), "eval": list(NEEDLE_IMAGES)}   # as DONE's JSON reads
    if toyworld.read_done(root) == params:
        return
    rng = random.Random(f"ablations/needle/{seed}")
    # split -> colour -> [relative path] ("" -> the empty tiles); [(relative path, Scene)]
    pool, items = {"train": {}, "eval": {}}, []
    for k in range(60):
        rel = f"images/empty_{k:02d}.png"
        items.append((rel, toyworld.Scene(toyworld.CLOSEUP, toyworld.CLOSEUP,
                                          toyworld.background(rng), ())))
        pool["train" if k < 45 else "eval"].setdefault("", []).append(rel)
    for colour in toyworld.COLOURS:
        for shape in toyworld.SHAPES:
            for k in range(20):
                rel = f"images/{colour}_{shape}_{k:02d}.png"
                items.append((rel, toyworld.closeup_scene(rng, colour, shape)))
                pool["train" if k < 15 else "eval"].setdefault(colour, []).append(rel)
    toyworld.render_all(root, items)

    def question(n, split):
        colour = rng.choice(list(toyworld.COLOURS))
        paths = [rng.choice(pool[split][""]) for _ in range(n - 1)]
        paths.insert(rng.randrange(n), rng.choice(pool[split][colour]))
        return paths, toyworld.image_tags(n) + NEEDLE_QUESTION, colour

    train = []
    for i in range(n_train):
        paths, q, a = question(rng.randint(*NEEDLE_TRAIN), "train")
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a.capitalize() + "."}]
        train.append({"id": i, "image": paths, "conversations": conv})
    evals = [{"image": paths, "question": q, "answer": a, "type": f"needle_{n}", "cot": False}
             for n in NEEDLE_IMAGES
             for paths, q, a in (question(n, "eval") for _ in range(n_eval))]
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "eval.jsonl", evals)
    write_json(root / "meta.json", {"toy_needle": {
        "root": ".", "annotation": "train.jsonl", "repeat_time": 1, "data_augment": False,
        "max_dynamic_patch": 1, "length": len(train)}})
    write_json(root / "DONE", params)


def make_detail_data(root: Path, n_train: int, n_eval: int, seed: int = 0):
    """The JPEG ablation's task: "Which way do the stripes run?" (horizontal, vertical, diagonal) on
    one close-up whose answer lives in faint stripes finer than JPEG's 8x8 blocks
    (toyworld.stripes_picture; training pictures also have stronger ones). meta_aug.json and
    meta_noaug.json train on the same questions with random JPEG compression on and off; eval.jsonl
    holds n_eval held-out questions, jpeg_q<Q>/ the same re-encoded at each of JPEG_QUALITIES, and
    pixel_check.json, for each, what a check with no model (toyworld.stripes_direction) reads and
    the mean |pixel change| (0-255)."""
    params = {"n_train": n_train, "n_eval": n_eval, "qualities": list(JPEG_QUALITIES),
              "pictures": "stripes", "periods": list(toyworld.STRIPE_PERIODS),
              "amplitude": list(toyworld.STRIPE_AMPLITUDE),
              "train_amplitude": list(toyworld.STRIPE_AMPLITUDE_TRAIN)}
    if toyworld.read_done(root) == params:
        return
    rng = random.Random(f"ablations/stripes/{seed}")
    (root / "images").mkdir(parents=True, exist_ok=True)
    pictures = []   # (relative path, direction, image, patch box)
    for i in range(n_train + n_eval):
        direction = toyworld.STRIPE_DIRECTIONS[i % len(toyworld.STRIPE_DIRECTIONS)]
        img, box = toyworld.stripes_picture(rng, direction, toyworld.STRIPE_AMPLITUDE_TRAIN
                                            if i < n_train else toyworld.STRIPE_AMPLITUDE)
        rel = f"images/{i:05d}.png"
        img.save(root / rel, format="PNG", compress_level=1)
        pictures.append((rel, direction, img, box))
    train = pictures[:n_train]
    rng.shuffle(train)
    q = toyworld.image_tags(1) + toyworld.STRIPES_QUESTION
    write_jsonl(root / "train.jsonl", [
        {"id": i, "image": rel, "conversations": [{"from": "human", "value": q},
                                                   {"from": "gpt", "value": d.capitalize() + "."}]}
        for i, (rel, d, _, _) in enumerate(train)])
    for augment in (True, False):
        write_json(root / f"meta_{'aug' if augment else 'noaug'}.json", {"toy_stripes": {
            "root": ".", "annotation": "train.jsonl", "repeat_time": 1, "data_augment": augment,
            "max_dynamic_patch": 1, "length": n_train}})
    held_out = pictures[n_train:]
    rows = [{"id": i, "image": rel, "question": q, "answer": d, "type": "stripes", "cot": False}
            for i, (rel, d, _, _) in enumerate(held_out)]
    write_jsonl(root / "eval.jsonl", rows)
    check = {}
    for quality in (None, *JPEG_QUALITIES):
        name = "clean" if quality is None else f"jpeg_q{quality}"
        read, change = 0, 0.0
        for rel, d, img, box in held_out:
            out = img if quality is None else jpeg_roundtrip(img, quality)
            read += toyworld.stripes_direction(out, box) == d
            change += mean(ImageStat.Stat(ImageChops.difference(out, img)).mean)
            if quality is not None:   # saved as PNG: the damage is JPEG's, once
                (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
                out.save(root / name / rel, format="PNG", compress_level=1)
        if quality is not None:
            write_jsonl(root / name / "eval.jsonl", rows)
        check[name] = {"pixel_check": read / len(held_out),
                       "pixel_change": change / len(held_out)}
    write_json(root / "pixel_check.json", check)
    write_json(root / "DONE", params)


# -----------------------------------------------------------------------------
# arms: one train.py (or reasoning.py) run each, cached


SAY = threading.Lock()


def say(line: str):
    """One progress line, whole: two threads' print() can splice a line into the other's newline."""
    with SAY:
        print(line, flush=True)


class Runner:
    """Runs the arms: each once (ablations sharing an arm wait for it), at most `jobs` at a time."""

    def __init__(self, args, size, world: Path):
        self.args, self.size, self.world = args, size, world
        self.out = Path(args.out).resolve()
        # arm dir -> seconds its run took (as recorded in DONE when it came from the cache); the
        # arm dirs of resumed runs, whose seconds are those of their last run only
        self.wall, self.resumed = {}, set()
        self.lock = threading.Lock()
        # arm dir -> Future of its directory, for the ablations that ask for it while it runs
        self.started = {}
        self.slots = threading.BoundedSemaphore(args.jobs)
        self.procs, self.failed = set(), None   # running train.py processes; the first UserError
        # .dirs: the arm dirs the calling thread's ablation has asked for
        self.asked = threading.local()
        # torch's threads split between the arms that run at once (unless OMP_NUM_THREADS says
        # otherwise)
        threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
        self.env = os.environ if args.jobs == 1 else {"OMP_NUM_THREADS": threads, **os.environ}

    def run(self, name: str, seed: int, cmd: list[str], resumable: bool = False) -> Path:
        """Run one arm into <out>/arms/<name>/s<seed> unless its DONE file has the same command.
        resumable: the arm's script carries on from what a stopped run of it left (reasoning.py:
        finished stages are skipped, an interrupted training continues), so a stopped arm with the
        same command keeps its files; any other starts over in an empty directory."""
        d = self.out / "arms" / name / f"s{seed}"
        getattr(self.asked, "dirs", set()).add(str(d))
        with self.lock:
            mine = d not in self.started
            job = self.started.setdefault(d, Future())
        if mine:
            try:
                job.set_result(self._run(name, seed, d, [sys.executable] + cmd, resumable))
            except BaseException as e:
                job.set_exception(e)
        return job.result()

    def _run(self, name: str, seed: int, d: Path, cmd: list[str], resumable: bool) -> Path:
        key = " ".join(cmd[1:])
        done, started = d / "DONE", d / "STARTED"
        cached = json.loads(done.read_text()) if done.is_file() and not self.args.redo else {}
        if cached.get("command") == key:
            self.wall[str(d)] = cached["seconds"]
            if cached.get("resumed"):
                self.resumed.add(str(d))
            return d
        with self.slots:
            # no arm starts after a failure, nor unseen by the failure that stops the others
            with self.lock:
                if self.failed:
                    raise self.failed
                resume = (resumable and not self.args.redo and started.is_file()
                          and started.read_text() == key)
                if d.exists() and not resume:
                    shutil.rmtree(d)
                d.mkdir(parents=True, exist_ok=True)
                started.write_text(key)
                say(f"[{name} s{seed}] {'resumed: ' * resume}{key}")
                t = time.time()
                # (the child keeps its own handle)
                with open(d / "log.txt", "a" if resume else "w") as log:
                    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env)
                self.procs.add(proc)
            rc = proc.wait()
            with self.lock:
                self.procs.discard(proc)
                # the first failure stops the others: their exits only echo it
                if rc != 0 and self.failed is None:
                    tail = "".join((d / "log.txt").read_text().splitlines(keepends=True)[-15:])
                    self.failed = UserError(f"arm {name} seed {seed} failed (exit {rc}); "
                                            f"its log {d / 'log.txt'} ends:\n{tail}")
                    for p in self.procs:
                        p.terminate()
            if rc != 0:
                raise self.failed
        seconds = round(time.time() - t, 1)
        self.wall[str(d)] = seconds
        if resume:
            self.resumed.add(str(d))
        write_json(done, {"command": key, "seconds": seconds} | ({"resumed": True} if resume else {}))
        say(f"[{name} s{seed}] {seconds:.0f}s")
        return d

    def train(self, name: str, seed: int, *flags) -> Path:
        a, s = self.args, self.size
        base = ["train.py", "--seed", str(seed), "--preset", a.preset, "--data-dir",
                str(self.world), "--eval-per-type", "0", "--log-interval",
                str(max(1, s["sft"] // 8)), "--ckpt-interval", "100000"]
        if a.device:
            base += ["--device", a.device]
        out_dir = self.out / "arms" / name / f"s{seed}"
        return self.run(name, seed, base + [str(f) for f in flags] + ["--out-dir", str(out_dir)])

    # the arms, by name; each returns its directory (checkpoint in <dir>/ckpt)
    def pt_native(self, seed):
        return self.train("pt_native", seed, "--stage", "pretrain", "--pretrain-steps",
                          self.size["pretrain"])

    def pt_posthoc(self, seed):
        half = max(1, self.size["pretrain"] // 2)
        text = self.train("pt_text_only", seed, "--stage", "pretrain", "--pretrain-steps", half,
                          "--text-ratio", 1)
        return self.train("pt_posthoc", seed, "--stage", "pretrain", "--pretrain-steps", half,
                          "--text-ratio", 0, "--init-from", text / "ckpt", "--freeze", "llm")

    def sft(self, name, seed, init: Path, *flags):
        return self.train(name, seed, "--stage", "sft", "--sft-steps", self.size["sft"],
                          "--init-from", init / "ckpt", *flags)

    def sft_native(self, seed):   # the default recipe: square averaging, JPEG augmentation
        return self.sft("sft_native", seed, self.pt_native(seed))


# -----------------------------------------------------------------------------
# evaluation (in this process, cached next to each checkpoint)


# the work done in this process (making data, evaluating) goes one ablation at a time: the seeds
# share the data, the ablations share evaluations, and the training subprocesses have the cores
IN_PROCESS = threading.Lock()


def evaluated(arm: Path, what: str, fn) -> dict:
    path = arm / f"eval_{what}.json"
    with IN_PROCESS:
        if path.is_file():
            return json.loads(path.read_text())
        res = fn()
        write_json(path, res)
        return res


def load(arm: Path, device):
    model = InternVL.from_pretrained(str(arm / "ckpt"), dtype=torch.float32, device=device).eval()
    return model, Tokenizer.from_dir(str(arm / "ckpt"))


def accuracy(arm: Path, what: str, eval_file: Path, per_type: int, device,
             v2pe_delta: float = 1.0) -> dict:
    """{type: accuracy} on an eval.jsonl (the first per_type questions of each type)."""
    def fn():
        model, tok = load(arm, device)
        res = evaluate(model, tok, load_eval_items(str(eval_file)), max_per_type=per_type,
                       v2pe_delta=v2pe_delta)
        return {k: r["accuracy"] for k, r in res["types"].items()}
    return evaluated(arm, what, fn)


def perplexity(arm: Path, text_file: Path, device) -> float:
    def fn():
        model, tok = load(arm, device)
        return {"text_perplexity": text_perplexity(model, tok, str(text_file))}
    return evaluated(arm, "text", fn)["text_perplexity"]


def summarise(per_seed: dict) -> dict:
    """{metric: [value per seed]} -> {metric: {"mean", "spread" (population std), "seeds"}}."""
    return {k: {"mean": mean(v), "spread": pstdev(v) if len(v) > 1 else 0.0, "seeds": v}
            for k, v in per_seed.items()}


# -----------------------------------------------------------------------------
# the ablations: each measures one seed -> {arm: {metric: value}}; main runs the seeds (at once
# with --jobs) and summarises them. NOTES: what results.json keeps beside an ablation's arms.

NOTES = {"v2pe": {"chance": 1 / len(toyworld.COLOURS), "train_pictures": list(NEEDLE_TRAIN)},
         "jpeg": {"chance": 1 / len(toyworld.STRIPE_DIRECTIONS)},
         "loss": {"short_types": SHORT_TYPES, "long_types": LONG_TYPES}}


def ablation_native(R: Runner, seed, world: Path, device):
    rows = {}
    for arm, pt in (("native", R.pt_native(seed)), ("post-hoc", R.pt_posthoc(seed))):
        sft = R.sft_native(seed) if arm == "native" else R.sft("sft_posthoc", seed, pt)
        acc = accuracy(sft, "toy", world / "eval" / "eval.jsonl", R.size["eval_per_type"], device)
        rows[arm] = {"vqa_accuracy": mean(list(acc.values())),
                     **{f"acc_{k}": v for k, v in acc.items()},
                     "text_ppl_pretrained": perplexity(pt, world / "eval" / "text.jsonl", device),
                     "text_ppl_final": perplexity(sft, world / "eval" / "text.jsonl", device)}
    return rows


def ablation_v2pe(R: Runner, seed, world: Path, device):
    data = R.out / "data" / "needle"
    with IN_PROCESS:
        make_needle_data(data, n_train=R.size["v2pe_train"], n_eval=R.size["v2pe_eval"])
    pt, rows = R.pt_native(seed), {}
    for name, delta in V2PE_ARMS.items():
        flags = ["--v2pe"] if delta is None else ["--v2pe-delta", delta]
        arm = R.train(f"v2pe_{name.replace('/', '_')}", seed, "--stage", "sft", "--sft-steps",
                      R.size["v2pe_sft"], "--lr", R.size["v2pe_lr"], "--init-from", pt / "ckpt",
                      "--sft-meta", data / "meta.json", *flags)
        evals = [(name, delta)] if delta is not None else FIXED_DELTAS.items()
        for eval_name, eval_delta in evals:
            acc = accuracy(arm, f"needle_{eval_name.replace('/', '_')}", data / "eval.jsonl",
                           -1, device, v2pe_delta=eval_delta)
            rows[f"train {name}, eval {eval_name}"] = {f"images_{n}": acc[f"needle_{n}"]
                                                       for n in NEEDLE_IMAGES}
    return rows


def ablation_loss(R: Runner, seed, world: Path, device):
    rows = {}
    for mode in ("token", "sample", "square"):
        arm = R.sft_native(seed) if mode == "square" else \
            R.sft(f"sft_loss_{mode}", seed, R.pt_native(seed), "--loss-reduction", mode)
        acc = accuracy(arm, "toy", world / "eval" / "eval.jsonl", R.size["eval_per_type"], device)
        rows[mode] = {"short_answers": mean([acc[t] for t in SHORT_TYPES]),
                      "long_answers": mean([acc[t] for t in LONG_TYPES]),
                      **{f"acc_{t}": a for t, a in acc.items()}}
    return rows


def ablation_jpeg(R: Runner, seed, world: Path, device):
    data = R.out / "data" / "stripes"
    with IN_PROCESS:
        make_detail_data(data, n_train=R.size["jpeg_train"], n_eval=R.size["jpeg_eval"])
    evals = {"clean": data / "eval.jsonl",
             **{f"jpeg_q{q}": data / f"jpeg_q{q}" / "eval.jsonl" for q in JPEG_QUALITIES}}
    pt, rows = R.pt_native(seed), {}
    for name, which in (("JPEG augmentation", "aug"), ("no augmentation", "noaug")):
        arm = R.train(f"jpeg_{which}", seed, "--stage", "sft", "--sft-steps", R.size["jpeg_sft"],
                      "--init-from", pt / "ckpt", "--sft-meta", data / f"meta_{which}.json",
                      "--lr-vit", JPEG_LR_VIT)
        rows[name] = {k: accuracy(arm, f"stripes_{k}", f, -1, device)["stripes"]
                      for k, f in evals.items()}
    # what is left in the pixels, the same for every seed; pixel_change_*: mean |change| (0-255)
    check = read_json(data / "pixel_check.json")
    rows["pixel check (no model)"] = {**{k: c["pixel_check"] for k, c in check.items()},
                                      **{f"pixel_change_{k}": c["pixel_change"]
                                         for k, c in check.items()}}
    return rows


def ablation_mpo(R: Runner, seed, world: Path, device):
    sft = R.sft_native(seed)
    out = R.out / "arms" / "reasoning" / f"s{seed}"
    arm = R.run("reasoning", seed, ["-m", "experiments.reasoning", "--sft", str(sft / "ckpt"),
                                    "--seed", str(seed), "--out", str(out), *R.size["reasoning"]],
                resumable=True)
    res = json.loads((arm / "results.json").read_text())
    m = {"greedy_sft": res["greedy"]["sft"]["accuracy"],
         "greedy_mpo": res["greedy"]["mpo"]["accuracy"], "n_questions": res["greedy"]["sft"]["n"]}
    for critic, curve in res["best_of_n"].items():
        for n, acc in curve.items():
            m[f"{critic}_N{n}"] = acc
    m["prm_ranking"] = prm_ranking(row for _, row in read_jsonl(arm / "best_of_n.jsonl"))
    return {"reasoning": m}


# -----------------------------------------------------------------------------
# plots


def pct(cell):
    return 100 * cell["mean"], 100 * cell["spread"]


def draw(name: str, res: dict, out: Path, n_seeds: int):
    arms, sub = res["arms"], f" (mean ± std over {n_seeds} seed{'s' * (n_seeds > 1)})"
    path = out / f"{name}.png"
    if name == "native":
        types = [k[4:] for k in arms["native"] if k.startswith("acc_")]
        groups = types + ["all"]
        keys = [f"acc_{t}" for t in types] + ["vqa_accuracy"]
        vals = [[pct(arms[a][k])[0] for a in arms] for k in keys]
        errs = [[pct(arms[a][k])[1] for a in arms] for k in keys]
        plot.bar_chart(path, "Native vs post-hoc pre-training: held-out accuracy" + sub, groups,
                       list(arms), vals, errs, ylabel="accuracy (%)", ymax=100)
    elif name == "v2pe":
        ns = [int(k.split("_")[1]) for k in next(iter(arms.values()))]   # images_<n>
        series = {a: [pct(r[f"images_{n}"])[0] for n in ns] for a, r in arms.items()}
        errors = {a: [pct(r[f"images_{n}"])[1] for n in ns] for a, r in arms.items()}
        plot.line_chart(path, "V2PE delta: one shape among empty pictures, its colour" + sub,
                        ns, series, errors,
                        xlabel="pictures per question (training: {}-{})".format(*NEEDLE_TRAIN),
                        ylabel="accuracy (%)", ymin=0, ymax=100)
    elif name in ("loss", "jpeg"):
        groups = list(next(iter(arms.values())))
        # with one long type, its own bars would repeat the long answers' bars
        if name == "loss" and len(LONG_TYPES) == 1 and f"acc_{LONG_TYPES[0]}" in groups:
            groups.remove(f"acc_{LONG_TYPES[0]}")
        vals = [[pct(arms[a][g])[0] for a in arms] for g in groups]
        errs = [[pct(arms[a][g])[1] for a in arms] for g in groups]
        title = {"loss": "SFT loss averaging: accuracy by answer length",
                 "jpeg": "JPEG augmentation: stripe direction, clean and JPEG-compressed"}[name]
        labels = [g.removeprefix("acc_").replace("_", " ") for g in groups]
        plot.bar_chart(path, title + sub, labels, list(arms), vals, errs, ylabel="accuracy (%)",
                       ymax=100)
    elif name == "mpo":
        r = arms["reasoning"]
        ns = [1, 2, 4, 8]
        series = {c: [pct(r[f"{c}_N{n}"])[0] for n in ns]
                  for c in ("prm", "vote", "majority", "outcome", "pass@N")}
        errors = {c: [pct(r[f"{c}_N{n}"])[1] for n in ns] for c in series}
        series["greedy SFT"] = [pct(r["greedy_sft"])[0]] * len(ns)
        series["greedy MPO"] = [pct(r["greedy_mpo"])[0]] * len(ns)
        plot.line_chart(path, "Best-of-N with the toy PRM; greedy SFT and MPO as flat lines" + sub,
                        ns, series, errors, xlabel="N (samples per question)",
                        ylabel="accuracy (%)", ymin=0, ymax=100)
    return path


# -----------------------------------------------------------------------------
# main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the reduced form for a 2-core CPU (= --size quick)")
    parser.add_argument("--size", default="full", choices=list(SIZES),
                        help="steps, questions and seeds of every arm")
    parser.add_argument("--only", default=",".join(ABLATIONS),
                        help="comma list of ablations to run")
    parser.add_argument("--seeds", default="", help="comma list of seeds (default: the size's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=N",
                        help="change one step or question count of the size, e.g. v2pe_sft=1200 "
                             "(repeatable; arms are cached by command: use a new --out where a "
                             "count changes the generated data)")
    parser.add_argument("--preset", default="toy",
                        help="train.py --preset of every arm (toy-gpu: bigger, for a GPU)")
    parser.add_argument("--device", default=None,
                        help="train.py --device of every arm; evaluation runs here too")
    parser.add_argument("--jobs", type=int, default=1,
                        help="arms trained at once (a GPU has room for several toy arms; the CPU "
                             "threads are split)")
    parser.add_argument("--data-dir", default="data/toy",
                        help="the toy world (generated if absent)")
    parser.add_argument("--out", default="runs/ablations",
                        help="arms, evaluations, results.json and plots")
    parser.add_argument("--publish", default="",
                        help="also copy results.json and the plots to this directory")
    parser.add_argument("--redo", action="store_true", help="rerun every arm and evaluation")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: redraw the plots and results.md from <out>/results.json")
    args = parser.parse_args()
    if args.report:
        return report(Path(args.out).resolve(),
                      Path(args.publish).resolve() if args.publish else None)
    if args.quick:
        args.size = "quick"
    size = dict(SIZES[args.size])
    for item in args.set:
        key, _, value = item.partition("=")
        if not isinstance(size.get(key), int) or not value.isdigit():
            counts = ", ".join(k for k, v in size.items() if isinstance(v, int))
            raise UserError(f"--set {item!r}: expected KEY=N with KEY one of {counts}")
        size[key] = int(value)
    only = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = [a for a in only if a not in ABLATIONS]
    if unknown:
        raise UserError(f"--only: unknown ablation(s) {', '.join(unknown)} "
                        f"(choose from {', '.join(ABLATIONS)})")
    try:
        seeds = [int(s) for s in (args.seeds or size["seeds"]).split(",")]
    except ValueError:
        raise UserError(f"--seeds: expected a comma list of integers, got {args.seeds!r}") from None
    if args.jobs < 1:
        raise UserError(f"--jobs: expected at least 1, got {args.jobs}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # an absolute --data-dir stays as it is
    world = Path(toyworld.ensure(str(ROOT / args.data_dir))["root"])
    R = Runner(args, size, world)
    if args.redo and (R.out / "arms").exists():
        shutil.rmtree(R.out / "arms")
    t0 = time.time()
    results = {"command": " ".join(["python -m experiments.ablations", *sys.argv[1:]]),
               "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores"
                          + (f", {torch.cuda.get_device_name(device)}"
                             if device.type == "cuda" else "")
                          + f", torch {torch.__version__}",
               "size": args.size, "sizes": size, "seeds": seeds, "preset": args.preset}
    results["ablations"] = run_ablations(R, only, seeds, world, device)
    # this invocation: arms from the cache cost nothing
    results["wall_seconds"] = round(time.time() - t0, 1)
    # every arm's own run, each counted once
    results["arms_seconds"] = round(sum(R.wall.values()), 1)
    results["resumed_arms"] = len(R.resumed)
    write_json(R.out / "results.json", results)
    report(R.out, Path(args.publish).resolve() if args.publish else None)


def run_ablations(R: Runner, only, seeds, world: Path, device) -> dict:
    """{ablation: {"arms": {arm: {metric: {mean, spread, seeds}}}, NOTES, wall times, plot}}."""
    def measure(task):
        name, seed = task
        t = time.time()
        R.asked.dirs = set()   # every arm this ablation asks for, its shared ones included
        rows = globals()[f"ablation_{name}"](R, seed, world, device)
        say(f"== {name} s{seed}: {time.time() - t:.0f}s")
        return rows, R.asked.dirs, t, time.time()

    # sequentially, ablation by ablation and seed by seed; with --jobs, one thread per (ablation,
    # seed), each waiting on the arms it shares with the others while R trains `jobs` of them at a
    # time
    tasks = [(name, seed) for name in only for seed in seeds]
    pool = ThreadPoolExecutor(len(tasks) if R.args.jobs > 1 else 1)
    try:
        measured = dict(zip(tasks, pool.map(measure, tasks)))
    finally:
        pool.shutdown(cancel_futures=True)   # after a failure, start nothing more
    out = {}
    for name in only:
        rows = {}   # arm -> metric -> [value per seed]
        for seed in seeds:
            for arm, metrics in measured[name, seed][0].items():
                for k, v in metrics.items():
                    rows.setdefault(arm, {}).setdefault(k, []).append(v)
        dirs = set().union(*(measured[name, s][1] for s in seeds))
        spans = [measured[name, s][2:] for s in seeds]
        out[name] = {"arms": {a: summarise(r) for a, r in rows.items()}, **NOTES.get(name, {}),
                     # an arm shared with other ablations counts in each
                     "train_seconds": round(sum(R.wall.get(d, 0.0) for d in dirs), 1),
                     "seconds": round(max(e for _, e in spans) - min(t for t, _ in spans), 1),
                     "plot": f"{name}.png"}
    return out


def report(out: Path, publish: Path | None):
    """results.json -> plots, results.md and the printed table; all copied to `publish` if given."""
    path = out / "results.json"
    if not path.is_file():
        raise UserError(f"{path}: no results yet (run the ablations first)")
    results = read_json(path)
    try:   # the table before any file: results of an older version of this script lack its keys
        table = markdown(results)
    except KeyError as e:
        raise UserError(f"{path}: no {e.args[0]!r} in its results, which an older "
                        f"experiments/ablations.py wrote (its results.md is their table)") from None
    for folder in [out] + ([publish] if publish else []):
        folder.mkdir(parents=True, exist_ok=True)
        for name, res in results["ablations"].items():
            draw(name, res, folder, len(results["seeds"]))
        with atomic_path(str(folder / "results.md")) as tmp, open(tmp, "w") as f:
            f.write(table)
        if folder != out:
            shutil.copyfile(path, folder / "results.json")
    print_table(results)
    print(f"wrote results.json, results.md and {len(results['ablations'])} plot(s) to "
          f"{', '.join(str(f) for f in [out] + ([publish] if publish else []))}")


# the Best-of-N critics the table judges: VisualPRM's own rule (the highest mean step score), and
# the PRM-weighted vote (sample.py --critic vote:), the one that rises with N on the toy (see the
# README's MPO section)
MPO_CRITICS = {"prm": "PRM mean", "vote": "PRM-weighted vote"}


def jpeg_change(metrics) -> dict:
    """Accuracy at the harshest JPEG quality minus on clean pictures, per seed: robustness apart
    from how well an arm learnt the task at all."""
    q, clean = metrics[f"jpeg_q{JPEG_QUALITIES[-1]}"]["seeds"], metrics["clean"]["seeds"]
    return summarise({"change": [a - b for a, b in zip(q, clean, strict=True)]})["change"]


# what each paper reports, and the toy comparison that would agree with it: (label, toy value, toy
# baseline, want, checked) rows whose difference should be > 0 ("higher", or COIN: higher, and an
# arm that did not learn its task could only have lowered it) or not below the noise
# ("comparable"); "within noise" when it is smaller than its spread over seeds or than NOISE_FLOOR.
# checked: the arms that must have learnt their task (LEARNT) for the row to say anything (for a
# COIN row: anything but yes)
COIN = "higher than a coin"
V2PE_NONE = "train 1, eval 1"
JPEG_ARMS = ("JPEG augmentation", "no augmentation")
LOSS_ARMS = ("token", "sample")
CLAIMS = {
    "native": ("InternVL3 §2.2: native pre-training reaches accuracy comparable to the multi-stage "
               "(post-hoc) pipeline, then gains more from SFT",
               lambda a: [("native − post-hoc, held-out accuracy", a["native"]["vqa_accuracy"],
                           a["post-hoc"]["vqa_accuracy"], "comparable", ())]),
    "v2pe": ("InternVL3 Table 12 (random δ in training, δ at inference): none 75.2, 1/256 75.0, "
             "1/16 75.6, 1/4 75.9, 1 75.7: small steps help, 1/4 best; V2PE (arXiv 2412.09616): "
             "a small δ keeps a long input's positions near the trained range",
             lambda a: [*[(f"random@{d} − no V2PE, {NEEDLE_IMAGES[-1]} pictures",
                           a[f"train random, eval {d}"][f"images_{NEEDLE_IMAGES[-1]}"],
                           a[V2PE_NONE][f"images_{NEEDLE_IMAGES[-1]}"], "higher",
                           (f"train random, eval {d}", V2PE_NONE))
                          for d in ("1/4", "1/16")],
                        (f"δ 1/16 − 1 (fixed), {NEEDLE_IMAGES[-1]} pictures",
                         a["train 1/16, eval 1/16"][f"images_{NEEDLE_IMAGES[-1]}"],
                         a[V2PE_NONE][f"images_{NEEDLE_IMAGES[-1]}"], "higher",
                         ("train 1/16, eval 1/16", V2PE_NONE))]),
    "loss": ("InternVL2.5 §4: token averaging favours long answers, sample averaging short ones; "
             "square is the compromise",
             lambda a: [("token − sample, long answers", a["token"]["long_answers"],
                         a["sample"]["long_answers"], "higher", LOSS_ARMS),
                        ("sample − token, short answers", a["sample"]["short_answers"],
                         a["token"]["short_answers"], "higher", LOSS_ARMS)]),
    "jpeg": ("InternVL2.5 §4: random JPEG compression (quality 75-100) in SFT makes the model "
             "robust to compressed pictures",
             lambda a: [*[(f"with − without, fine stripes at JPEG q={q}",
                           a["JPEG augmentation"][f"jpeg_q{q}"],
                           a["no augmentation"][f"jpeg_q{q}"], "higher", JPEG_ARMS)
                          for q in JPEG_QUALITIES],
                        (f"with − without, change from clean to q={JPEG_QUALITIES[-1]}",
                         jpeg_change(a["JPEG augmentation"]), jpeg_change(a["no augmentation"]),
                         "higher", JPEG_ARMS)]),
    # MPO − SFT compares two trained policies; the Best-of-N rows need a PRM that ranks answers.
    # A PRM that ranks like a coin picks like N = 1 and weights a vote at random (majority voting
    # with noise), so it can only lower a row that compares it with N = 1 or with majority voting
    # (COIN): such a row's "yes" stands whatever the PRM's ranking; not so the weighted vote's
    # N = 8 − N = 1, which majority voting alone raises
    "mpo": ("InternVL3 §2.4: MPO beats SFT on reasoning; Best-of-N with VisualPRM rises with N and "
            "beats self-consistency",
            lambda a: [("MPO − SFT, greedy", a["reasoning"]["greedy_mpo"],
                        a["reasoning"]["greedy_sft"], "higher", ()),
                       *[(f"{name} N=8 − N=1", a["reasoning"][f"{c}_N8"],
                          a["reasoning"][f"{c}_N1"], COIN if c == "prm" else "higher",
                          ("reasoning",))
                         for c, name in MPO_CRITICS.items()],
                       *[(f"{name} − majority, N=8", a["reasoning"][f"{c}_N8"],
                          a["reasoning"]["majority_N8"], COIN, ("reasoning",))
                         for c, name in MPO_CRITICS.items()]]),
}


def paired(cell, base) -> tuple[float, float]:
    """cell − base seed by seed (the arms of one seed share its initialisation and data order, so
    that seed's luck cancels) -> mean and population std over seeds of the differences."""
    diffs = [a - b for a, b in zip(cell["seeds"], base["seeds"], strict=True)]
    d = summarise({"diff": diffs})["diff"]
    return d["mean"], d["spread"]


# 2 points: about the sampling error of one accuracy over the 300-600 questions of most arms
# (sqrt(p(1-p)/n) at p = 0.5), which two or three seeds that happen to agree do not remove; kept
# for the reasoning arm's 3,000, where it is cautious: one floor for every row
NOISE_FLOOR = 0.02


# a difference within noise says the claim fails only where the arms compared learnt their task:
# (metric, least value on every seed) of the ablations that can check it; for V2PE the accuracy at
# the training length, for JPEG on clean pictures, for MPO the PRM's ranking of right over wrong
# answers (prm_ranking; 0.8: the step-score AUC asked of experiments/prm_canary.py), for the loss
# the short answers (0.8, not the 0.95 of the one-skill tasks: counting, the hardest short type,
# is learnt to 70-91%; chance is about 20%)
LEARNT = {"v2pe": (f"images_{NEEDLE_TRAIN[-1]}", 0.95), "jpeg": ("clean", 0.95),
          "mpo": ("prm_ranking", 0.8), "loss": ("short_answers", 0.8)}


def unlearnt(name: str, arms: dict, checked=None) -> list[str]:
    """The arms of ablation `name` (and seeds) below LEARNT's bar, ["arm s1 84%", ...]; only the
    arms named in `checked` when given (a row's own arms)."""
    if name not in LEARNT:
        return []
    metric, least = LEARNT[name]
    return [f"{arm} s{i} {100 * v:.0f}%" for arm, m in arms.items()
            if metric in m and (checked is None or arm in checked)
            for i, v in enumerate(m[metric]["seeds"]) if v < least]


def learnt(name: str, arms: dict, checked) -> bool | None:
    """Whether the arms a row checks all learnt their task; None where nothing can say (the row
    checks no arm, or the arms lack the metric, as results from before it was measured)."""
    if name not in LEARNT or not any(LEARNT[name][0] in arms[a] for a in checked):
        return None
    return not unlearnt(name, arms, checked)


def verdict(cell, base, want: str, learnt: bool | None = None) -> str:
    """yes / no, or within noise; learnt (the arms the row checks learnt their task: LEARNT) turns
    within noise into "no (within noise)", the claim's effect absent; not learnt qualifies every
    verdict but a COIN row's yes (what did not learn could only have lowered it), as arms that did
    not learn their task measure how far each got, not the claim."""
    diff, spread = paired(cell, base)
    noise = max(spread, NOISE_FLOOR)
    if want == "comparable":
        said = "yes" if diff >= -noise else "no"   # "comparable": not worse by more than the noise
    elif abs(diff) > noise:
        said = "yes" if diff > 0 else "no"
    else:
        said = "no (within noise)" if learnt else "within noise"
    qualified = learnt is False and not (want == COIN and said == "yes")
    return said + (" (an arm did not learn the task)" if qualified else "")


def markdown(results: dict) -> str:
    """The README's table: each claim, the toy comparison (points of accuracy), agreeing or not."""
    took = ""
    if "arms_seconds" in results:
        took = f"; the arms trained for {results['arms_seconds'] / 60:.0f} min"
        if results.get("resumed_arms"):
            took += f" ({results['resumed_arms']} resumed arm(s): their last run only)"
    lines = [f"`{results['command']}` on {results['machine']}; seeds {results['seeds']}, "
             f"size {results['size']}{took}.",
             "",
             "| ablation | the paper | toy comparison "
             "| toy (points: mean ± std over seeds of the difference) | agrees |",
             "|---|---|---|---|---|"]
    notes = []
    for name, res in results["ablations"].items():
        claim, rows = CLAIMS[name]
        for label, cell, base, want, checked in rows(res["arms"]):
            diff, noise = paired(cell, base)
            said = verdict(cell, base, want, learnt(name, res["arms"], checked))
            lines.append(f"| {name} | {claim} | {label} | {100 * diff:+.1f} ± {100 * noise:.1f}"
                         f" ({100 * cell['mean']:.1f} vs {100 * base['mean']:.1f}) | {said} |")
        if name in LEARNT:
            metric, least = LEARNT[name]
            missed = unlearnt(name, res["arms"])
            notes.append(f"{name}: arms below {100 * least:.0f}% on {metric}: "
                         + ("; ".join(missed) if missed else "none"))
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def print_table(results: dict):
    for name, res in results["ablations"].items():
        print(f"\n{name}")
        for arm, metrics in res["arms"].items():
            cells = [f"{k} {m['mean']:.3f}±{m['spread']:.3f}" for k, m in metrics.items()
                     if not k.startswith(("acc_", "n_")) and "_N" not in k]
            print(f"  {arm:28s} " + " | ".join(cells))


if __name__ == "__main__":
    with user_errors():
        main()
