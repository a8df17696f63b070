"""
A PRM canary: the PRM pipeline (prm_conversation -> tokenize_conversation -> packing -> lm_loss ->
train.py -> prm_step_scores) trained on synthetic step labels that the step text alone decides, or
(count) the picture. A PRM that cannot learn the one-token rule (word) points at the pipeline; the
arithmetic rules (sum, addk) measure how fast it learns what the toy's real sum-step labels ask,
count whether it learns to check a count against its picture, as the real count steps ask.

    python -m experiments.prm_canary                          # all tasks, fresh toy models
    python -m experiments.prm_canary --tasks word --steps 100  # a fresh toy model, one task
    python -m experiments.prm_canary --init runs/toy/ckpt --real runs/prm_canary/real_data
        # from the SFT checkpoint, and a PRM on real Monte-Carlo labels (made there if absent)

Tasks (one step per user turn, as VisualPRM §3; a conversation ends at its first "-", as
experiments/reasoning.py's mc_labels):
  sum   each step is "a + b = c." with a + b <= 9: "+" iff c = a + b (single-digit arithmetic, the
        form of the toy's "add k" sum step)
  word  each step is "The shape is <colour>.": "+" iff the colour is red
  addk  the toy's "add k" chain as text: count, "n + k = c.", answer (addk_item)
  count the toy's count step with its picture: "There are m shapes in the image.", "+" iff the
        picture shows m shapes (count_item): what only the picture decides
--mistakes N: where the --sft policy's wrong answers go wrong (first_mistakes).
--tile-check N: what a two-picture question's shared tile budget costs its counts (tile_check).
--audit RUN: how far a reasoning run's Monte-Carlo labels follow the reference (label_audit), and
how well its PRM's held-out step scores tell right steps from wrong (score_audit), and ranks right
answers above wrong (ranking_by_type); --audit-prm CKPT: the same of another PRM on the run's
samples (rescore).
Writes <out>/results.json; the published run: experiments/results/prm_canary/."""

import argparse
import random
import re
import shlex
import sys
import time
from pathlib import Path
from statistics import mean

import torch

from data import toyworld
from experiments.reasoning import (best_of_n_rows, best_of_n_table, critic_scores, load,
                                   make_questions, mc_labels, meta, one_off, rows_of, run, sample,
                                   score_samples, tiles_of)
from nanovl3.chat import render_prompt
from nanovl3.common import UserError, read_jsonl, user_errors, write_json, write_jsonl
from nanovl3.critic import (MINUS, PLUS, aggregate, is_correct, prm_conversation,
                            prm_step_scores, split_steps)
from nanovl3.data import PackedStream, SampleStream, collate_packed, read_meta
from nanovl3.image import tile_budget
from nanovl3.losses import lm_loss
from nanovl3.training import data_config, lr_factor, make_optimizer, param_groups, set_lr

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]
THREADS = 1  # torch threads: on a busy 2-core machine 1 thread ran the toy 2-10x faster than 2
QUESTIONS = {"sum": "Check the sums, one at a time.", "word": "Is every shape red?"}
TASKS = ("word", "sum", "addk", "count")
COUNTS = [1, 2, 3, 4, 5]   # the count canary's pictures hold 1-5 shapes


def canary_step(rng: random.Random, task: str, good: bool) -> str:
    if task == "word":
        return f"The shape is {'red' if good else rng.choice(COLOURS[1:])}."
    a = rng.randint(0, 9)
    b = rng.randint(0, 9 - a)
    c = a + b if good else rng.choice([x for x in range(10) if x != a + b])
    return f"{a} + {b} = {c}."


def addk_item(rng: random.Random, p_good: float = 0.6) -> dict:
    """The toy's "add k" chain (data/toyworld.py arith_add) without its picture: the count step is
    taken as right; the sum step is "+" iff it adds the question's k to that count and sums right
    (the rule its real Monte-Carlo labels follow); the answer step iff it repeats the sum."""
    n, k = rng.randint(1, 5), rng.randint(1, 3)
    question = (f"If you add {k} more {toyworld.plural('shape', k)}, how many shapes will there "
                f"be? {toyworld.COT_SUFFIX}")
    a, b, c = n, k, n + k
    if rng.random() > p_good:  # one of the toy policy's mistakes: a wrong term or a wrong sum
        wrong = rng.choice(["a", "b", "c"])
        a, b, c = (rng.choice([x for x in range(1, 10) if x != v]) if w == wrong else v
                   for w, v in (("a", a), ("b", b), ("c", c)))
    steps = [f"{toyworld.there_are(n)} in the image.", f"{a} + {b} = {c}."]
    labels = [PLUS, PLUS if (a, b, c) == (n, k, n + k) else MINUS]
    if labels[-1] == PLUS:
        good = rng.random() < p_good
        said = c if good else rng.choice([x for x in range(10) if x != c])
        steps.append(f"The answer is {said}.")
        labels.append(PLUS if good else MINUS)
    return {"question": question, "steps": steps, "labels": labels}


def count_item(rng: random.Random, bank: toyworld.ImageBank, p_good: float = 0.6) -> dict:
    """The toy's count step (arith_add's first step) against its picture of 1-5 shapes: a wrong
    count is one off, the toy policy's usual slip; "+" iff the count is right."""
    n = rng.randint(1, 5)
    scene = toyworld.sample_scene(rng, [toyworld.random_spec(rng) for _ in range(n)])
    said = one_off(rng, n, p_good)
    return {"image": [bank.add(scene)],
            "question": toyworld.image_tags(1) + f"How many shapes are there? {toyworld.COT_SUFFIX}",
            "steps": [f"{toyworld.there_are(said)} in the image."],
            "labels": [PLUS if said == n else MINUS]}


def canary_items(rng: random.Random, n: int, task: str, p_good: float = 0.6,
                 max_steps: int = 3, bank: toyworld.ImageBank | None = None) -> list[dict]:
    """n conversations of 1..max_steps steps, each step right with probability p_good; labels end
    at the first "-". "count" draws its pictures into bank."""
    if task == "addk":
        return [addk_item(rng, p_good) for _ in range(n)]
    if task == "count":
        return [count_item(rng, bank, p_good) for _ in range(n)]
    items = []
    for _ in range(n):
        steps, labels = [], []
        for _ in range(rng.randint(1, max_steps)):
            good = rng.random() < p_good
            steps.append(canary_step(rng, task, good))
            labels.append(PLUS if good else MINUS)
            if not good:
                break
        items.append({"question": QUESTIONS[task], "steps": steps, "labels": labels})
    return items


def pooled_auc(groups) -> float | None:
    """ROC AUC within groups: over every pair of a "+" and a "-" score of the SAME group
    [(plus scores, minus scores)], the share where the "+" one is higher (ties count half). None
    without a pair. One group: the plain AUC."""
    wins = pairs = 0
    for pos, neg in groups:
        wins += sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
        pairs += len(pos) * len(neg)
    return wins / pairs if pairs else None


def auc(scores: list[float], labels: list[bool], keys: list | None = None) -> float | None:
    """P(a "+" step outscores a "-" step), ties count half; with keys, only pairs of one key."""
    groups = {}
    for s, y, k in zip(scores, labels, keys or [None] * len(scores)):
        groups.setdefault(k, ([], []))[0 if y else 1].append(s)
    return pooled_auc(groups.values())


def score_items(prm, tok, items: list[dict], out: Path | None = None) -> list[list[float]]:
    """Step scores of labelled items {question, steps[, image]} through prm_step_scores, the items
    of one question and images in one call; an item's "image" paths are relative to `out`."""
    groups = {}
    for i, it in enumerate(items):
        groups.setdefault((it["question"], tuple(it.get("image") or ())), []).append(i)
    scores = [None] * len(items)
    for (question, image), idx in groups.items():
        pix, tiles = None, []
        if image:
            t = tiles_of(items[idx[0]], out, prm.cfg, split=None)  # as the PRM reads them
            pix, tiles = torch.cat(t), [x.size(0) for x in t]
        got = prm_step_scores(prm, tok, question, ["\n\n".join(items[i]["steps"]) for i in idx],
                              pix, tiles)
        for i, s in zip(idx, got):
            scores[i] = s
    return scores


def stated_count(item: dict) -> int:
    return int(re.findall(r"\d+", item["steps"][0])[0])


@torch.no_grad()
def count_belief(model, tok, items: list[dict], out: Path) -> tuple[list[float], float]:
    """What the initial model itself knows of the count canary's pictures: asked the toy's direct
    question, its P(m) over m = 1..5 (each whole reply "m." scored, renormalised). -> P(stated
    count) per item (a critic with no PRM training) and the accuracy of its argmax on "+" items."""
    model.eval()
    scores, hits = [], 0
    for it in items:
        tiles = tiles_of(it, out, model.cfg)
        prompt = tok.encode(render_prompt(toyworld.image_tags(1) + "How many shapes are there?",
                                          [x.size(0) for x in tiles], model.cfg.num_image_token))
        replies = [tok.encode(toyworld.short(str(m))) + [tok.im_end_id] for m in COUNTS]
        T = len(prompt) + max(map(len, replies))
        ids = torch.tensor([prompt + r + [tok.pad_id] * (T - len(prompt) - len(r))
                            for r in replies])  # [5,T]
        logp = model(ids, torch.cat(tiles * len(COUNTS))).float().log_softmax(-1)  # [5,T,V]
        p = torch.stack([logp[i, len(prompt) - 1 + torch.arange(len(r)), r].sum()
                         for i, r in enumerate(replies)]).softmax(0)  # [5] P(m)
        said = COUNTS.index(stated_count(it))
        scores.append(p[said].item())
        hits += it["labels"][0] == PLUS and int(p.argmax()) == said
    return scores, hits / max(1, sum(it["labels"][0] == PLUS for it in items))


def count_aucs(train: list[dict], held: list[dict], critics: dict) -> dict:
    """The count canary's step AUC for each critic {name: scores of held}, overall and within the
    steps that state the same count, beside the text prior: P("+" | the stated count) in the
    training labels (a one-off slip cannot go below 1 or above 5, so 1 and 5 are "+" more often). A
    critic that reads the picture beats the prior within a stated count, where the prior is 0.5."""
    freq = {}
    for it in train:
        freq.setdefault(stated_count(it), []).append(it["labels"][0] == PLUS)
    prior = [mean(freq.get(stated_count(it), [0.5])) for it in held]
    ys, keys = [it["labels"][0] == PLUS for it in held], [stated_count(it) for it in held]
    return {name: {"auc": auc(sc, ys), "same_count_auc": auc(sc, ys, keys)}
            for name, sc in {"text prior": prior, **critics}.items()}


def step_aucs(items: list[dict], scores: list[list[float]], key=lambda it, k: k) -> dict:
    """AUC of the step scores against the labels, over all steps and per group key(item, k)."""
    groups = {"all": ([], [])}
    for it, s in zip(items, scores):
        for k, (x, y) in enumerate(zip(s, it["labels"])):
            for g in ("all", str(key(it, k))):
                groups.setdefault(g, ([], []))
                groups[g][0].append(x)
                groups[g][1].append(y == PLUS)
    return {g: {"auc": auc(xs, ys), "n": len(ys), "plus": sum(ys)}
            for g, (xs, ys) in sorted(groups.items())}


def summary(aucs: dict) -> str:
    return ", ".join(f"{g} {v['auc']:.3f} (n = {v['n']})" for g, v in aucs.items()
                     if v["auc"] is not None)


def train_in_process(model, tok, data: Path, steps: int, lr: float = 1e-3, seed: int = 0,
                     max_packed_tokens: int = 1024, loss_reduction: str = "square") -> list[float]:
    """train.py's SFT step without its process (the fast test and quick diagnostics): data/meta.json
    -> SampleStream -> PackedStream -> collate_packed -> model -> lm_loss -> AdamW, with the same
    schedule, parameter groups and clipping. -> the losses."""
    stream = PackedStream(SampleStream(read_meta(data / "meta.json"), tok,
                                       data_config(model.cfg, -1, 2048), seed=seed),
                          max_packed_tokens, 48)
    groups = param_groups(model, set(), {"vit": lr, "mlp": lr, "llm": lr}, 0.05)
    params = [p for g in groups for p in g["params"]]
    optimizer, losses = make_optimizer(groups, torch.device("cpu")), []
    model.train()
    for step in range(steps):
        set_lr(optimizer, lr_factor(step, steps, max(1, round(0.03 * steps))))
        batch = collate_packed(next(stream), tok.pad_id, model.cfg.vision.image_size,
                               loss_reduction=loss_reduction)
        logits = model(batch["input_ids"], batch["pixel_values"], batch["image_flags"],
                       batch["position_ids"], batch["doc_ids"])
        loss = lm_loss(logits, batch["labels"], batch["loss_weight"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def write_canary(out: Path, items: list[dict]):
    """Labelled items -> out/prm.jsonl + out/meta.json, the PRM data form of reasoning.py."""
    rows = [{**({"image": it["image"]} if "image" in it else {}),
             "conversations": prm_conversation(it["question"], it["steps"], it["labels"])}
            for it in items]
    write_jsonl(out / "prm.jsonl", rows)
    meta(out / "meta.json", "prm.jsonl", length=len(rows))


def train_prm(data: Path, init: str, out: Path, steps: int, seed: int, extra: list[str] = ()):
    """train.py --stage sft on data/meta.json: the PRM's training path (experiments/reasoning.py
    step 6); from init (a checkpoint) or, with init "", a fresh toy-preset model."""
    cmd = ["train.py", "--stage", "sft", "--sft-meta", str(data / "meta.json"), "--out-dir",
           str(out), "--sft-steps", str(steps), "--eval-per-type", "0", "--eval-file", "none",
           "--eval-text", "none", "--seed", str(seed), "--threads", str(THREADS), "--overwrite",
           *extra]
    cmd += ["--init-from", init] if init else ["--tokenizer", "data/toy"]
    run(cmd, out.parent / f"{out.name}.log")


def canary(args, task: str) -> dict:
    """Train a PRM with train.py on --n-train canary conversations of `task`, score 300 held-out
    ones with prm_step_scores -> the step AUC, overall and per step."""
    out = Path(args.out).resolve() / task
    rng = random.Random(f"canary/{task}/{args.seed}")
    bank = toyworld.ImageBank("images")   # pictures (count) under out, as meta's root ".." says
    train = canary_items(rng, args.n_train, task, bank=bank)
    held = canary_items(rng, 300, task, bank=bank)
    toyworld.render_all(out, bank.items)
    write_canary(out / "data", train)
    t = time.time()
    train_prm(out / "data", args.init, out / "prm", args.steps, args.seed,
              ["--lr", str(args.lr), "--max-packed-tokens", str(args.max_packed_tokens)])
    seconds = round(time.time() - t, 1)
    prm, tok = load(str(out / "prm" / "ckpt"))
    scores = score_items(prm, tok, held, out)
    if task == "count":  # what the PRM learnt of the pictures, beside the initial model's own count
        critics = {"PRM": [x[0] for x in scores]}
        if args.init:
            critics["initial model's own count"], accuracy = count_belief(*load(args.init), held,
                                                                          out)
        count = {"count_aucs": count_aucs(train, held, critics),
                 **({"init_count_accuracy": accuracy} if args.init else {})}
    res = {"task": task, "train_conversations": len(train),
           "held_out_conversations": len(held), "steps": args.steps, "lr": args.lr,
           "init": args.init or "fresh toy preset",
           **({"sum_step_by_mistake": sum_step_by_mistake(held, scores)} if task == "addk" else {}),
           **(count if task == "count" else {}),
           "train_seconds": seconds,
           "step_auc": step_aucs(held, scores, key=lambda it, k: f"step {k + 1}"),
           "examples": [{"steps": it["steps"], "labels": it["labels"],
                         "scores": [round(x, 3) for x in s]} for it, s in zip(held[:6], scores)]}
    print(f"[{task}] held-out step AUC: {summary(res['step_auc'])}; training {seconds:.0f}s")
    for name, a in res.get("count_aucs", {}).items():
        print(f"[count] {name}: AUC {a['auc']:.3f}, within a stated count {a['same_count_auc']:.3f}")
    return res


def make_real_labels(args, src: Path):
    """experiments/reasoning.py's stages 1, 2 and 5 (questions, rollouts, Monte-Carlo labels) at
    --n-train questions from the --sft checkpoint, into src (skipped when src/prm exists)."""
    if (src / "prm" / "prm.jsonl").exists():
        return
    make_questions(src, args.n_real, 1, args.seed)
    questions = rows_of(src / "questions" / "train.jsonl")
    model, tok = load(args.sft)
    answers = sample(model, tok, src, [(q, "") for q in questions], 8, 0.7, args.seed)
    rolls = [{**q, "answers": a} for q, a in zip(questions, answers)]
    write_jsonl(src / "rollouts.jsonl", rolls)
    rows = mc_labels(model, tok, src, rolls, 2, 4, args.seed, temperature=0.7, grade="steps")
    write_jsonl(src / "prm" / "prm.jsonl", rows)


def real_items(rows: list[dict], types: dict) -> list[dict]:
    """PRM training lines -> labelled items {image, question, steps, labels, type}."""
    items = []
    for row in rows:
        conv = row["conversations"]
        first = conv[1]["value"].split("### Solution Process:\n", 1)
        question = first[0].removeprefix("### Question:\n").removesuffix("\n\n")
        items.append({"image": row["image"], "question": question,
                      "steps": [first[1]] + [t["value"] for t in conv[3::2]],
                      "labels": [t["value"] for t in conv[2::2]],
                      "type": types.get(question, "?")})
    return items


def addk_rule(item: dict) -> bool | None:
    """The text rule of an "add k" sum step (addk_item): it adds the question's k to the count the
    first step states, and sums right. None: not an "add k" chain with a sum step of that form."""
    k = re.search(r"add (\d+) more", item["question"])
    n = re.match(r"There (?:is|are) (\d+) shapes? in the image\.$", item["steps"][0])
    step = re.match(r"(\d+) \+ (\d+) = (\d+)\.$", item["steps"][1]) if len(item["steps"]) > 1 \
        else None
    if not (k and n and step):
        return None
    a, b, c = map(int, step.groups())
    return (a, b, c) == (int(n[1]), int(k[1]), int(n[1]) + int(k[1]))


def sum_step_by_mistake(items: list[dict], scores: list[list[float]]) -> dict:
    """"add k" chains: the AUC of right sum steps against those with each kind of mistake."""
    kinds = {}
    for it, sc in zip(items, scores):
        if len(sc) < 2 or addk_rule(it) is None:
            continue
        a, b, c = map(int, re.findall(r"\d+", it["steps"][1]))
        n, k = (int(re.search(r"\d+", t)[0]) for t in (it["steps"][0], it["question"]))
        kind = ("right" if addk_rule(it) else "wrong count" if a != n else
                "wrong k" if b != k else "wrong sum")
        kinds.setdefault(kind, []).append(sc[1])
    right = kinds.pop("right", [])
    return {kind: {"auc": auc(right + bad, [True] * len(right) + [False] * len(bad)),
                   "n": len(bad)} for kind, bad in sorted(kinds.items())}


def real(args) -> dict:
    """Held-out step AUC of a PRM trained (train.py, from --sft) on real Monte-Carlo labels: the
    conversations of the last --held-out share of the questions (text and pictures) are held out."""
    src = Path(args.real).resolve()
    make_real_labels(args, src)
    rows = [row for _, row in read_jsonl(src / "prm" / "prm.jsonl")]
    types = {r["question"]: r["type"] for r in rows_of(src / "questions" / "train.jsonl")}
    items = real_items(rows, types)
    # a question is its text AND its pictures: the toy's texts repeat ("add 2 more shapes")
    key = [(it["question"], tuple(it["image"])) for it in items]
    order = list(dict.fromkeys(key))
    held_q = set(order[round(len(order) * (1 - args.held_out)):])
    train = [row for row, q in zip(rows, key) if q not in held_q]
    held = [it for it, q in zip(items, key) if q in held_q]
    out = Path(args.out).resolve() / "real"
    write_jsonl(out / "data" / "prm.jsonl", train)
    meta(out / "data" / "meta.json", "prm.jsonl", length=len(train), root=str(src))
    t = time.time()
    train_prm(out / "data", args.sft, out / "prm", args.real_steps, args.seed)
    seconds = round(time.time() - t, 1)
    prm, tok = load(str(out / "prm" / "ckpt"))
    scores = score_items(prm, tok, held, src)
    # how far the sum step's label is decided by its text: the rule against the Monte-Carlo label,
    # over every conversation whose count step is "+"
    ruled = [(addk_rule(it), it["labels"][1]) for it in items
             if it["type"] == "arith_add" and it["labels"][0] == PLUS and len(it["labels"]) > 1]
    ruled = [(r, y) for r, y in ruled if r is not None]
    res = {"source": str(src), "train_conversations": len(train),
           "held_out_conversations": len(held), "steps": args.real_steps,
           "train_seconds": seconds,
           "addk_sum_step_rule": {"n": len(ruled), "agree": sum(r == (y == PLUS) for r, y in ruled),
                                  "plus": sum(y == PLUS for _, y in ruled)},
           "step_auc": step_aucs(held, scores, key=lambda it, k: f"{it['type']} step {k + 1}")}
    print(f"[real] held-out step AUC: {summary(res['step_auc'])}")
    return res


def step_kind(step: str) -> str:
    """What a step of the toy's chain-of-thought answers states, and so what can check it."""
    if re.match(r"There (is|are) \d+ shapes? in", step):
        return "count (picture)"
    if re.match(r"[A-Z][a-z]+: an? ", step):   # "Two: a red circle."
        return "item of a counting chain (picture)"
    if re.match(r"\d+ \+ \d+ = \d+\.$", step):
        return "sum (text)"
    return "answer" if step.startswith("The answer is") else "other"


def departure(steps: list[str], ref: list[str]) -> int:
    """The index of the first step that leaves the reference solution (len of the shorter when one
    is the other's start): steps before it are right, it and those after are not."""
    return next((i for i, (x, y) in enumerate(zip(steps, ref)) if x != y),
                min(len(steps), len(ref)))


def label_audit(run: Path) -> dict:
    """How far the Monte-Carlo labels of an experiments/reasoning.py --out directory follow the
    reference solution, by question type and kind of step. The toy's answers are templates (a
    counting chain goes left to right), so a step is right iff the answer matches the reference up
    to and including it. A Monte-Carlo "+" only says some continuation reaches the right answer:
    "right answer, wrong steps" counts the sampled answers that do so from a wrong step (two counts
    swapped, a shape misnamed in a counting chain), whose every step is labelled "+"."""
    rows = [row for _, row in read_jsonl(run / "prm" / "prm.jsonl")]
    questions = rows_of(run / "questions" / "train.jsonl")
    refs = {(q["question"], tuple(q["image"])): q for q in questions}
    steps_of, answers = {}, {}
    for it in real_items(rows, {}):
        q = refs.get((it["question"], tuple(it["image"])))
        if q is None:
            raise UserError(f"{run / 'prm' / 'prm.jsonl'}: a conversation about {it['image']} "
                            f"has no question in {run / 'questions' / 'train.jsonl'}")
        ref = split_steps(q["reference"])
        leaves = departure(it["steps"], ref)
        for k, (step, label) in enumerate(zip(it["steps"], it["labels"])):
            cell = steps_of.setdefault(q["type"], {}).setdefault(step_kind(step), {})
            name = f"{label} {'right' if k < leaves else 'wrong'}"
            cell[name] = cell.get(name, 0) + 1
        if it["labels"][-1] == PLUS:   # a right answer: all its steps are "+"
            tally = answers.setdefault(q["type"], {"right answers": 0, "wrong steps": 0})
            tally["right answers"] += 1
            tally["wrong steps"] += it["steps"] != ref
    for kinds in steps_of.values():
        for cell in kinds.values():
            n = sum(cell.values())
            cell.update(n=n, agree=round((cell.get("+ right", 0) + cell.get("- wrong", 0)) / n, 3))
    print("[audit] the share of Monte-Carlo labels that agree with the reference solution:")
    for qtype, kinds in sorted(steps_of.items()):
        print(f"  {qtype}: " + ", ".join(f"{kind} {c['agree']:.2f} of {c['n']}"
                                         for kind, c in sorted(kinds.items())))
    return {"run": str(run), "steps": steps_of, "right_answer_wrong_steps": answers}


def held_out_rows(run: Path, path: Path) -> list[tuple[dict, dict]]:
    """[(held-out question, row)] for the rows of `path`, a best_of_n.jsonl in the order of
    <run>/questions/eval.jsonl; a row of other questions is the user's mistake."""
    questions, pairs = rows_of(run / "questions" / "eval.jsonl"), []
    for i, (lineno, row) in enumerate(read_jsonl(path)):
        q = questions[i] if i < len(questions) else None
        if q is None or q["question"] != row["question"] or q["answer"] != row["answer"]:
            raise UserError(f"{path}:{lineno}: not held-out question {i + 1} of "
                            f"{run / 'questions' / 'eval.jsonl'}")
        pairs.append((q, row))
    return pairs


def prm_ranking(rows) -> float:
    """What Best-of-N asks of a PRM: over every pair of a right and a wrong sample of one held-out
    question (rows of best_of_n.jsonl), the share in which the right one has the higher mean step
    score (VisualPRM's rule; ties count half): a within-question ROC AUC, 0.5 for a coin (and
    where no question has both)."""
    groups = []
    for q in rows:
        score = {True: [], False: []}
        for s in q["samples"]:
            score[s["correct"]].append(aggregate(s["step_scores"], "mean"))
        groups.append((score[True], score[False]))
    ranking = pooled_auc(groups)
    return 0.5 if ranking is None else ranking


def score_audit(pairs: list[tuple[dict, dict]]) -> dict:
    """How well a reasoning run's PRM tells right steps from wrong on the held-out questions
    (held_out_rows' pairs of question and best_of_n.jsonl row), where training asked it to: at a
    step whose earlier steps are right (a PRM conversation ends at its first "-"; scoring puts "+"
    in the earlier turns). A step is right iff it is the reference's (as in label_audit); a sample
    counts up to its first wrong step. By question type and kind of step: the AUC of right over
    wrong among the k-th steps of one question's samples, and the share of those steps that are
    right (how often the policy makes the step well)."""
    groups = {}   # (type, kind) -> {(question, k): ([right scores], [wrong scores])}
    for i, (q, row) in enumerate(pairs):
        ref = split_steps(q["reference"])
        for answer in row["samples"]:
            steps = split_steps(answer["response"])
            leaves = departure(steps, ref)
            for k, (step, score) in enumerate(zip(steps, answer["step_scores"])):
                if k > leaves:
                    break
                cell = groups.setdefault((q["type"], step_kind(step)), {})
                cell.setdefault((i, k), ([], []))[0 if k < leaves else 1].append(score)
    res = {}
    for (qtype, kind), cell in sorted(groups.items()):
        n_right = sum(len(r) for r, _ in cell.values())
        n = n_right + sum(len(w) for _, w in cell.values())
        res.setdefault(qtype, {})[kind] = {"auc": pooled_auc(cell.values()), "n": n,
                                           "right": round(n_right / n, 3)}
    print("[audit] the PRM's held-out step scores after right steps: AUC within a question's k-th "
          "steps (share of right steps of the n):")
    for qtype, kinds in res.items():
        print(f"  {qtype}: " + ", ".join(
            f"{kind} {'-' if c['auc'] is None else format(c['auc'], '.2f')} "
            f"({c['right']:.2f} of {c['n']})" for kind, c in kinds.items()))
    return res


def ranking_by_type(pairs: list[tuple[dict, dict]]) -> dict:
    """prm_ranking of held_out_rows' samples, over all questions and by question type."""
    res = {"all": prm_ranking(row for _, row in pairs)}
    for qtype in sorted({q["type"] for q, _ in pairs}):
        res[qtype] = prm_ranking(row for q, row in pairs if q["type"] == qtype)
    print("[audit] the PRM ranks a right sample above a wrong one of its question (prm_ranking): "
          + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    return res


def rescore(run: Path, ckpt: str, out: Path) -> tuple[list[tuple[dict, dict]], dict]:
    """--audit-prm: the run's held-out samples scored by another PRM, as the run's evaluation
    scores them (its pictures cut as that PRM's config says), written to out/best_of_n.jsonl ->
    (held_out_rows' pairs of the new rows, the Best-of-N table); how one PRM compares with another
    on the very same samples."""
    pairs = held_out_rows(run, run / "best_of_n.jsonl")
    items = [q for q, _ in pairs]
    samples = [[s["response"] for s in r["samples"]] for _, r in pairs]
    step_scores = score_samples(*load(ckpt), run, items, samples)
    rows = best_of_n_rows(items, samples, step_scores)
    write_jsonl(out / "best_of_n.jsonl", rows)
    table = best_of_n_table(samples, critic_scores(step_scores), items)
    print(f"[audit] Best-of-N with {ckpt}, accuracy % at N = 1 / 2 / 4 / 8:")
    for name, row in table.items():
        print(f"  {name:9s} " + " / ".join(f"{100 * acc:.1f}" for acc in row.values()))
    return list(zip(items, rows)), table


def first_mistakes(args) -> dict:
    """Where the --sft policy's wrong answers first leave the reference solution: 8 samples at
    temperature 0.7 (the rollouts') to each of --mistakes new questions; the first step that differs
    from the reference, by question type and kind of step (step_kind)."""
    out = Path(args.out).resolve() / "mistakes"
    make_questions(out, 1, args.mistakes, args.seed)
    questions = rows_of(out / "questions" / "eval.jsonl")
    model, tok = load(args.sft)
    answers = sample(model, tok, out, [(q, "") for q in questions], 8, 0.7, args.seed)
    kinds, wrong = {}, 0
    for q, samples in zip(questions, answers):
        ref = split_steps(q["reference"])
        for a in (a for a in samples if not is_correct(a, q["answer"])):
            steps, wrong = split_steps(a), wrong + 1
            k = departure(steps, ref)
            key = f"{q['type']}: {step_kind(steps[k]) if k < len(steps) else 'ends early'}"
            kinds[key] = kinds.get(key, 0) + 1
    picture = sum(v for k, v in kinds.items() if "(picture)" in k)
    res = {"questions": len(questions), "samples": 8 * len(questions), "wrong": wrong,
           "first_departure": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
           "at_a_picture_step": picture / max(1, wrong)}
    print(f"[mistakes] {wrong} wrong of {res['samples']}; the first departure from the reference "
          f"is at a step only the picture checks in {100 * res['at_a_picture_step']:.1f}%")
    return res


def tile_check(args) -> dict:
    """What sharing the tile budget costs a two-picture question's counts (reasoning.py
    --prm-tiles): --sft's greedy chain of thought on --tile-check new two-picture questions, the
    pictures cut as trained (the budget shared between them) or each with the whole budget; and
    each picture alone, asked its count, cut with a two-picture question's share or the whole
    budget -> tiles per picture, the share of pictures whose count is stated right (and of right
    final answers)."""
    out = Path(args.out).resolve() / "tile_check"
    rng, bank, items = random.Random(f"tile-check/{args.seed}"), toyworld.ImageBank("images"), []
    for _ in range(args.tile_check):
        scenes, qa = toyworld.build(rng, "arith_two")
        items.append({"image": [bank.add(s) for s in scenes], "answer": qa["answer"],
                      "counts": [len(s.objects) for s in scenes],
                      "question": toyworld.image_tags(2) + qa["question"]})
    toyworld.render_all(out, bank.items)
    alone = [{"image": [p], "answer": str(n),
              "question": toyworld.image_tags(1) + "How many shapes are there?"}
             for it in items for p, n in zip(it["image"], it["counts"])]
    model, tok = load(args.sft)
    share = tile_budget(model.cfg, 2)   # each picture's budget in a two-picture question
    res = {}
    for name, two, one in (("shared", dict(split=True), dict(max_num=share, split=False)),
                           ("whole", dict(split=False), dict(split=False))):
        replies = [r for r, in sample(model, tok, out, [(it, "") for it in items], 1, 0.0,
                                      args.seed, **two)]
        stated = [toyworld.stated_counts(split_steps(r)) for r in replies]
        res[f"two pictures, {name}"] = {
            "tiles": mean(t.size(0) for it in items for t in tiles_of(it, out, model.cfg, **two)),
            "count": mean(k < len(s) and s[k] == n for s, it in zip(stated, items)
                          for k, n in enumerate(it["counts"])),
            "answer": mean(is_correct(r, it["answer"]) for r, it in zip(replies, items))}
        replies = [r for r, in sample(model, tok, out, [(a, "") for a in alone], 1, 0.0,
                                      args.seed, 8, **one)]
        res[f"one picture, {name}"] = {
            "tiles": mean(tiles_of(a, out, model.cfg, **one)[0].size(0) for a in alone),
            "count": mean(is_correct(r, a["answer"]) for r, a in zip(replies, alone))}
    print("[tile check] pictures of two-picture questions, their counts stated right:")
    for name, c in res.items():
        print(f"  {name}: {c['tiles']:.2f} tiles per picture, {100 * c['count']:.1f}%"
              + (f" (answers {100 * c['answer']:.1f}%)" if "answer" in c else ""))
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help="canary tasks to run, a comma list of " + ", ".join(TASKS))
    parser.add_argument("--out", default="runs/prm_canary")
    parser.add_argument("--init", default="",
                        help="PRM initial checkpoint (default: a fresh toy-preset model)")
    parser.add_argument("--n-train", type=int, default=4000, help="training conversations")
    parser.add_argument("--steps", type=int, default=300, help="train.py --sft-steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-packed-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", default="",
                        help="an experiments.reasoning --out directory: also train and score a "
                             "PRM on its Monte-Carlo labels (made there from --sft if absent)")
    parser.add_argument("--sft", default="runs/toy/ckpt", help="the real PRM's initial checkpoint")
    parser.add_argument("--real-steps", type=int, default=300, help="the real PRM's --sft-steps")
    parser.add_argument("--n-real", type=int, default=600,
                        help="training questions when --real has no labels yet")
    parser.add_argument("--held-out", type=float, default=0.2,
                        help="share of the real questions held out")
    parser.add_argument("--mistakes", type=int, default=0,
                        help="also sample 8 answers from --sft to this many new questions: where "
                             "do the wrong ones first leave the reference solution?")
    parser.add_argument("--audit", default="",
                        help="an experiments.reasoning --out directory: how far its Monte-Carlo "
                             "labels follow the reference solution (label_audit), and its PRM's "
                             "held-out step scores (score_audit)")
    parser.add_argument("--audit-prm", default="",
                        help="a PRM checkpoint: score --audit's held-out samples with it instead "
                             "of the run's own PRM (rescore; written to <out>/rescored)")
    parser.add_argument("--tile-check", type=int, default=0,
                        help="also ask --sft the counts of this many new two-picture questions' "
                             "pictures, cut with the shared or the whole tile budget (tile_check)")
    parser.add_argument("--results", default="", help="also write results.json here")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]  # "" runs no canary (only --real)
    if args.audit_prm and not args.audit:
        raise UserError("--audit-prm: needs --audit RUN, whose held-out samples it scores")
    if bad := set(tasks) - set(TASKS):
        raise UserError(f"--tasks: unknown {sorted(bad)} (use a comma list of {', '.join(TASKS)})")
    torch.set_num_threads(THREADS)
    res = {"command": "python -m experiments.prm_canary " + shlex.join(sys.argv[1:]),
           "canary": {task: canary(args, task) for task in tasks}}
    if args.real:
        res["real"] = real(args)
    if args.mistakes:
        res["mistakes"] = first_mistakes(args)
    if args.tile_check:
        res["tile_check"] = tile_check(args)
    if args.audit:
        run = Path(args.audit).resolve()
        res["audit"] = label_audit(run)
        pairs = None
        if args.audit_prm:
            pairs, res["audit"]["best_of_n"] = rescore(
                run, args.audit_prm, Path(args.out).resolve() / "rescored")
            res["audit"]["prm"] = args.audit_prm
        elif (run / "best_of_n.jsonl").is_file():   # the run got as far as scoring
            pairs = held_out_rows(run, run / "best_of_n.jsonl")
        if pairs is not None:
            res["audit"]["held_out_scores"] = score_audit(pairs)
            res["audit"]["ranking"] = ranking_by_type(pairs)
    for path in [Path(args.out) / "results.json"] + ([Path(args.results)] if args.results else []):
        write_json(path.resolve(), res)


if __name__ == "__main__":
    with user_errors():
        main()
