"""
MPO and Best-of-N with a process reward model on the toy world, end to end. One command makes the
README's tables (run from the repository root):

    python -m experiments.reasoning           # runs/toy/ckpt (python train.py) -> runs/reasoning
    python -m experiments.reasoning --quick   # a smaller, faster version of every stage

Stages; each writes into --out and is skipped when its output is already there, a training
stage when it finished the same run (one stopped midway continues; --redo starts over):
  1. questions  chain-of-thought questions about new pictures (counting, adding counts over one or
                two images): a training set for rollouts and a held-out set, from their own random
                streams (so another --n-eval evaluates a finished run on more or fewer questions)
  2. rollouts   K answers per training question, sampled from the SFT checkpoint
  3. pairs      the MMPR correctness pipeline (InternVL2.5-MPO arXiv 2411.10442 §3.1): a sampled
                answer with the right final answer is chosen, one with a wrong answer is rejected;
                optional Dropout Next-Token Prediction pairs (--dntp) for questions every sample got
                right. --grade steps also asks of a chosen answer (and of a Monte-Carlo
                continuation) that its final answer follow from its own steps; --grade counts,
                and that the counts it states be the pictures'
  4. mpo        python mpo.py --init-from SFT --data pairs/meta.json
  5. prm data   VisualPRM's Monte-Carlo step labels (arXiv 2503.10291 §3): from the prefix that ends
                at step k, sample M continuations; step k is "+" if any reaches the right answer. A
                correct answer is itself such a continuation, so all of its steps are "+". A
                conversation ends at its first "-" (see mc_labels: training is teacher-forced,
                scoring puts "+" in every earlier turn). --prm-count N adds N conversations on
                new "add k" and two-picture questions whose count steps are labelled against
                the picture (count_labels)
  6. prm        python train.py --stage sft --init-from SFT --sft-meta prm/meta.json (the PRM
                conversation format; with --prm-count N, prm_count{N}/meta.json: both sets;
                --prm-tiles whole, the same regrouped so that each picture gets the whole tile
                budget, prm_whole/meta.json, and the PRM scores with it too)
  7. evaluate   greedy accuracy of SFT and MPO on the held-out questions; Best-of-N at N = 1, 2, 4,
                8 over the same 8 samples per question (N < 8: the mean over the 8/N disjoint
                groups), picked by the PRM (mean step score), the outcome score (last step), the
                PRM-weighted majority vote and plain majority voting; pass@N as the ceiling
Writes <out>/results.json and prints the tables.
"""

import argparse
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from data import toyworld
from nanovl3.chat import Tokenizer, render_prompt
from nanovl3.checkpoint import config_from_json
from nanovl3.common import (UserError, read_json, read_jsonl, user_errors, write_json,
                            write_jsonl)
from nanovl3.critic import (MINUS, PLUS, aggregate, best_of_n, is_correct, majority_vote,
                            prm_conversation, prm_step_scores, split_steps)
from nanovl3.data import read_meta
from nanovl3.evaluate import evaluate
from nanovl3.generate import generate
from nanovl3.image import load_images
from nanovl3.model import InternVL

ROOT = Path(__file__).resolve().parent.parent   # the repository root: where the stages' scripts run
# the toy world's chain-of-thought questions
QTYPES = {"arith_two": 0.4, "arith_add": 0.3, "count_cot": 0.3}
NS = (1, 2, 4, 8)


# -----------------------------------------------------------------------------
# files


def rows_of(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)]


def meta(path: Path, annotation: str, **extra):
    entry = {"root": "..", "annotation": annotation, "repeat_time": 1, **extra}
    write_json(path, {path.parent.name: entry})


# -----------------------------------------------------------------------------
# 1. questions


def make_questions(out: Path, n_train: int, n_eval: int, seed: int):
    """-> out/questions/{train,eval}.jsonl, one line per question:
    {"image": [paths relative to out], "question", "answer", "type", "reference"}."""
    bank, rows = toyworld.ImageBank("questions/images"), {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        # own streams: never the toy world's pictures
        rng = random.Random(f"reasoning/{seed}/{split}")
        rows[split] = []
        for _ in range(n):
            qtype, = rng.choices(list(QTYPES), weights=list(QTYPES.values()))
            scenes, qa = toyworld.build(rng, qtype)
            paths = [bank.add(s) for s in scenes]
            rows[split].append({"image": paths,
                                "question": toyworld.image_tags(len(paths)) + qa["question"],
                                "answer": qa["answer"], "type": qtype, "reference": qa["reply"]})
    toyworld.render_all(out, bank.items)
    for split in rows:
        write_jsonl(out / "questions" / f"{split}.jsonl", rows[split])


# -----------------------------------------------------------------------------
# sampling answers (and continuations of partial answers) from a checkpoint


def tiles_of(item, out: Path, cfg, split: bool | None = True,
             max_num: int | None = None) -> list[torch.Tensor]:
    """The item's pictures cut for `cfg`: the budget (max_num, None: cfg's) shared among them as the
    policy was trained (split=True), or as the checkpoint's config says (None: a PRM's own, see
    whole_budget_meta), or each the whole budget (False)."""
    return load_images([out / p for p in item["image"]], cfg, max_num, split)[0]


def sample(model, tok, out: Path, jobs: list[tuple[dict, str]], n: int, temperature: float,
           seed: int, max_new_tokens: int = 96, batch: int = 16, images: bool = True,
           **cut) -> list[list[str]]:
    """jobs [(question item, answer prefix)] -> n answers each (prefix + continuation). Row r of job
    j is sampled with seed + n * j + r, so a job gets the same answers whatever else is in its
    batch. The pictures are cut as the policy was trained, or as `cut` asks (tiles_of)."""
    cfg = model.cfg
    results = []
    for i in range(0, len(jobs), batch):
        prompts, tiles, chunk = [], [], jobs[i:i + batch]
        for item, prefix in chunk:
            t = tiles_of(item, out, cfg, **cut) if images else []
            question = item["question"]
            if not images:
                question = question.replace("<image>\n", "").replace("<image>", "")
            tiles += t
            prompts.append(tok.encode(render_prompt(question, [x.size(0) for x in t],
                                                    cfg.num_image_token))
                           + (tok.encode(prefix) if prefix else []))
        pix = torch.cat(tiles) if tiles else None
        # generate seeds row r of this call with seed + r: offset by the first job's index
        outs = generate(model, prompts, pix, max_new_tokens, temperature=temperature,
                        seed=seed + n * i, stop_ids=tok.stop_ids, num_samples=n)
        for j, (_, prefix) in enumerate(chunk):
            results.append([prefix + tok.decode(o) for o in outs[j * n:(j + 1) * n]])
    return results


def load(ckpt: str):
    model = InternVL.from_pretrained(ckpt, dtype=torch.float32)
    return model.eval(), Tokenizer.from_dir(ckpt)


# -----------------------------------------------------------------------------
# 3. preference pairs (correctness pipeline) and 5. PRM data (Monte-Carlo step labels)


def solved(response: str, item: dict, grade: str) -> bool:
    """Whether a sampled answer counts as right when building pairs and PRM labels. "answer": its
    final answer is right (MMPR's correctness pipeline). "steps": and that answer follows from its
    own steps (toyworld.steps_agree). The toy policy often states a wrong count and then writes the
    right total anyway; Monte-Carlo labels assume that later steps follow earlier ones, and such a
    continuation makes a wrong step "+". "counts": and the counts it states are the pictures' (those
    of the reference solution), as if the question asked for each count as well as the total: two
    swapped counts, or two wrong ones that still add up, no longer make a wrong step "+".
    Evaluation always grades the final answer."""
    if not is_correct(response, item["answer"]):
        return False
    if grade == "answer":
        return True
    agree = toyworld.steps_agree(response, item["question"])
    if grade == "steps":
        return agree
    return agree and (toyworld.stated_counts(split_steps(response))
                      == toyworld.stated_counts(split_steps(item["reference"])))


def make_pairs(rollouts: list[dict], pairs_per_question: int, seed: int, reference: bool = False,
               grade: str = "answer") -> list[dict]:
    """MMPR lines from sampled answers: right final answer -> chosen, wrong -> rejected.
    reference=True: when no sample is right, the world's reference solution is the chosen answer
    (MMPR itself drops such questions)."""
    rng, rows = random.Random(f"pairs/{seed}"), []
    for r in rollouts:
        good = sorted({a for a in r["answers"] if solved(a, r, grade)})
        if not good and reference:
            good = [r["reference"]]
        # rejected: a wrong final answer, whatever the grade (a right answer is never pushed down)
        bad = sorted({a for a in r["answers"] if not is_correct(a, r["answer"])})
        for _ in range(min(pairs_per_question, len(good), len(bad))):
            c, w = good.pop(rng.randrange(len(good))), bad.pop(rng.randrange(len(bad)))
            rows.append({"image": r["image"], "question": r["question"], "chosen": c,
                         "rejected": w})
    return rows


def dntp_pairs(model, tok, out: Path, rollouts: list[dict], seed: int, max_new_tokens: int = 96,
               grade: str = "answer") -> list[dict]:
    """Dropout Next-Token Prediction: for questions without a wrong sample, keep a correct answer as
    chosen and let the model finish its first half WITHOUT the image: the continuation is the
    rejected answer."""
    jobs, chosen = [], []
    for r in rollouts:
        good = [a for a in r["answers"] if solved(a, r, grade)]
        if len(good) == len(r["answers"]):
            steps = split_steps(good[0])
            jobs.append((r, "\n\n".join(steps[:max(1, len(steps) // 2)])))
            chosen.append(good[0])
    outs = sample(model, tok, out, jobs, 1, 1.0, seed, max_new_tokens, images=False)
    return [{"image": r["image"], "question": r["question"], "chosen": c, "rejected": o[0]}
            for (r, _), c, o in zip(jobs, chosen, outs) if o[0].strip() != c.strip()]


def mc_labels(model, tok, out: Path, rollouts: list[dict], per_question: int, m: int, seed: int,
              max_new_tokens: int = 96, temperature: float = 1.0,
              grade: str = "answer") -> list[dict]:
    """PRM training conversations with Monte-Carlo labels, up to per_question correct and as many
    wrong answers per training question. Wrong answers are labelled step by step until a prefix
    never reaches the right answer in m tries: that step is "-" and the conversation ends there, as
    PRM800K's labels stop at the first mistake. Training is teacher-forced: a step after a "-" would
    see that "-" in an earlier assistant turn, a context that scoring never shows (it puts "+" in
    every turn), and its label, "-" whatever the step says, would teach the PRM to copy the last
    verdict rather than read the step."""
    rng, items = random.Random(f"prm/{seed}"), []
    for r in rollouts:
        good = sorted({a for a in r["answers"] if solved(a, r, grade)})
        bad = sorted({a for a in r["answers"] if not solved(a, r, grade)})
        for a in rng.sample(good, min(per_question, len(good))):
            items.append({"r": r, "steps": split_steps(a), "labels": None})
        for a in rng.sample(bad, min(per_question, len(bad))):
            steps = split_steps(a)
            items.append({"r": r, "steps": steps, "labels": [], "open": True})
    # wrong answers: one round of continuations per step, for every answer still open at that step
    for k in range(max((len(it["steps"]) for it in items), default=0)):
        todo = [it for it in items if it["labels"] is not None and it.get("open")
                and k < len(it["steps"])]
        # the whole wrong answer: "-" without sampling
        last = [it for it in todo if k == len(it["steps"]) - 1]
        for it in last:
            it["labels"].append("-")
        todo = [it for it in todo if k < len(it["steps"]) - 1]
        outs = sample(model, tok, out, [(it["r"], "\n\n".join(it["steps"][:k + 1])) for it in todo],
                      m, temperature, seed + 1000 * k, max_new_tokens)
        for it, conts in zip(todo, outs):
            ok = any(solved(c, it["r"], grade) for c in conts)
            it["labels"].append("+" if ok else "-")
            it["open"] = ok
    rows = []
    for it in items:
        # a wrong answer's labels end at its first "-"; a right answer's steps are all "+"
        labels = it["labels"] if it["labels"] is not None else ["+"] * len(it["steps"])
        rows.append({"image": it["r"]["image"],
                     "conversations": prm_conversation(it["r"]["question"],
                                                       it["steps"][:len(labels)], labels)})
    return rows


def one_off(rng: random.Random, n: int, p_good: float = 0.6, most: int = 5) -> int:
    """A stated count: n with probability p_good, else one off within 1..most (the toy policy's
    usual slip)."""
    if rng.random() < p_good:
        return n
    return rng.choice([m for m in (n - 1, n + 1) if 1 <= m <= most])


def count_labels(out: Path, n: int, seed: int, p_good: float = 0.6) -> list[dict]:
    """n PRM conversations on new "add k" and two-picture questions (pictures under
    out/prm_count{n}/images) of their count steps alone, each stated count right with probability
    p_good or one off, "+" iff it is the picture's, ending at the first "-". What the Monte-Carlo
    labels teach least (results/ablations_mpo: the PRM tells a right count from a wrong one at
    0.59-0.86, though its labels agree with the pictures 87-100%); labels that check each step
    against the truth, as PRM800K's human labels do (Lightman et al., arXiv 2305.20050)."""
    rng, rows = random.Random(f"prm-count/{seed}"), []
    bank = toyworld.ImageBank(f"prm_count{n}/images")
    types = {t: w for t, w in QTYPES.items() if t in ("arith_add", "arith_two")}
    for _ in range(n):
        scenes, qa = toyworld.build(rng, *rng.choices(list(types), weights=list(types.values())))
        steps, labels = [], []
        for step in split_steps(qa["reply"]):   # the reference: its count steps come first
            if not (truth := toyworld.stated_counts([step])):
                break
            truth, = truth
            said = one_off(rng, truth, p_good)
            # "There are 3 shapes in the first image." -> the same step stating `said`
            steps.append(re.sub(r"^There (?:is|are) \d+ shapes?", toyworld.there_are(said), step))
            labels.append(PLUS if said == truth else MINUS)
            if said != truth:
                break
        question = toyworld.image_tags(len(scenes)) + qa["question"]
        rows.append({"image": [bank.add(sc) for sc in scenes],
                     "conversations": prm_conversation(question, steps, labels)})
    toyworld.render_all(out, bank.items)
    return rows


def whole_budget_meta(meta_path: Path, out_dir: Path, budget: int):
    """--prm-tiles whole: meta_path's conversations grouped by picture count k into
    out_dir/images{k}.jsonl, each group's max_dynamic_patch k * budget, so that train.py, which
    shares a sample's budget among its pictures (upstream dataset.py), gives each picture the whole
    budget. Shared, a two-picture question's 224-px pictures are one 112-px tile each: half the
    resolution at which a one-picture question's count is read (2x2 tiles and a thumbnail)."""
    groups = {}
    for spec in read_meta(meta_path):
        for _, row in read_jsonl(spec.annotation):
            paths = [row["image"]] if isinstance(row["image"], str) else row["image"]
            groups.setdefault(len(paths), []).append(
                {**row, "image": [os.path.relpath(os.path.join(spec.root, p), out_dir.parent)
                                  for p in paths]})
    entries = {}
    for k, rows in sorted(groups.items()):
        write_jsonl(out_dir / f"images{k}.jsonl", rows)
        entries[f"images{k}"] = {"root": "..", "annotation": f"images{k}.jsonl",
                                 "length": len(rows), "max_dynamic_patch": k * budget}
    write_json(out_dir / "meta.json", entries)


def record_whole_budget(ckpt: Path):
    """The PRM's config.json says each picture gets the whole budget (split_tiles false), so that
    its scoring here and sample.py --critic cut the pictures as its training did."""
    config = read_json(ckpt / "config.json", "checkpoint config")
    if config.get("split_tiles") is not False:
        write_json(ckpt / "config.json", {**config, "split_tiles": False})


# -----------------------------------------------------------------------------
# 7. evaluation


def greedy_accuracy(ckpt: str, out: Path, items: list[dict], max_new_tokens: int = 96) -> dict:
    """Greedy accuracy, by the held-out evaluation train.py and mpo.py run (nanovl3.evaluate)."""
    model, tok = load(ckpt)
    res = evaluate(model, tok,
                   [{**it, "image": [str(out / p) for p in it["image"]], "cot": True}
                    for it in items], cot_tokens=max_new_tokens)
    correct = sum(r["correct"] for r in res["types"].values())
    return {"accuracy": correct / len(items), "n": len(items), "correct": correct,
            "types": res["types"], "examples": [e["response"] for e in res["examples"][:3]]}


def score_samples(prm, tok, out: Path, items: list[dict],
                  samples: list[list[str]]) -> list[list[list[float]]]:
    """The PRM's step scores of each item's samples, the pictures cut as its config says."""
    step_scores = []
    for q, answers in zip(items, samples):
        tiles = tiles_of(q, out, prm.cfg, split=None)
        step_scores.append(prm_step_scores(prm, tok, q["question"], answers, torch.cat(tiles),
                                           [x.size(0) for x in tiles]))
    return step_scores


def critic_scores(step_scores: list[list[list[float]]]) -> dict:
    """A score per sample for each PRM critic: VisualPRM's mean over the steps, the last step's."""
    return {"prm": [[aggregate(s, "mean") for s in per_q] for per_q in step_scores],
            "outcome": [[aggregate(s, "last") for s in per_q] for per_q in step_scores]}


def best_of_n_rows(items: list[dict], samples: list[list[str]], step_scores) -> list[dict]:
    """best_of_n.jsonl: every sample of each held-out question with its grade and step scores."""
    return [{"question": q["question"], "answer": q["answer"], "samples": [
        {"response": a, "correct": is_correct(a, q["answer"]),
         "step_scores": [round(x, 4) for x in s]} for a, s in zip(answers, per_q)]}
        for q, answers, per_q in zip(items, samples, step_scores)]


def best_of_n_table(samples: list[list[str]], scores: dict, items: list[dict]) -> dict:
    """Accuracy of each critic at each N; N < 8 averages the 8/N disjoint groups of N samples.
    "vote" weights the majority vote of a group by the "prm" scores of its samples."""
    table = {}
    for name in list(scores) + ["vote", "majority", "pass@N"]:
        table[name] = {}
        for n in NS:
            hits, groups = 0, 0
            for q, (answers, it) in enumerate(zip(samples, items)):
                for g in range(0, len(answers) - n + 1, n):
                    group = answers[g:g + n]
                    if name == "pass@N":
                        hit = any(is_correct(a, it["answer"]) for a in group)
                    else:
                        s = (majority_vote(group) if name == "majority" else
                             majority_vote(group, scores["prm"][q][g:g + n]) if name == "vote" else
                             scores[name][q][g:g + n])
                        hit = is_correct(group[best_of_n(s)], it["answer"])
                    hits, groups = hits + hit, groups + 1
            table[name][str(n)] = hits / groups
    return table


def run(cmd: list[str], log: Path):
    """A stage in its own process (the scripts users run), its output kept in a log file (added
    to when the stage resumes)."""
    print(f"$ {' '.join(cmd)}   (log: {log})", flush=True)
    with open(log, "a" if "--resume" in cmd else "w") as f:
        p = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        tail = open(log).read()[-2000:]
        raise UserError(f"stage failed ({' '.join(cmd[:1])}, exit {p.returncode}); "
                        f"the end of {log}:\n{tail}")


def trained(ckpt: Path, flags: dict, steps_key: str) -> str | None:
    """How far a training stage got, from its checkpoint's train_state.pt: "done" when it finished
    the run that `flags` describe (train.py's or mpo.py's args: steps, lr, data, start, seed),
    "resume" when it is that run stopped early (an interrupted session; a checkpoint is written
    every 100 steps and --resume continues it exactly), None when there is none or it is another
    run's (start over). A checkpoint alone is no sign of a finished stage."""
    f = ckpt / "train_state.pt"
    if not f.is_file():
        return None
    state = torch.load(f, map_location="cpu", weights_only=False)
    if any(state["args"].get(k) != v for k, v in flags.items()):
        return None
    return "done" if state["step"] >= flags[steps_key] else "resume"


# -----------------------------------------------------------------------------
# main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sft", default="runs/toy/ckpt",
                        help="the SFT checkpoint (python train.py makes it)")
    parser.add_argument("--out", default="runs/reasoning",
                        help="every stage's output and results.json")
    parser.add_argument("--quick", action="store_true",
                        help="fewer questions and steps (smoke test)")
    parser.add_argument("--redo", action="store_true", help="run every stage again")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=2400, help="training questions (rollouts)")
    parser.add_argument("--n-eval", type=int, default=300, help="held-out questions")
    parser.add_argument("--rollouts", type=int, default=8,
                        help="K: sampled answers per training question")
    parser.add_argument("--pairs-per-question", type=int, default=2,
                        help="most preference pairs per question")
    parser.add_argument("--dntp", action="store_true",
                        help="add Dropout Next-Token Prediction pairs")
    parser.add_argument("--reference-chosen", action="store_true",
                        help="questions no sample got right: the reference solution is the "
                             "chosen answer")
    parser.add_argument("--mpo-steps", type=int, default=600, help="mpo.py --steps")
    parser.add_argument("--mpo-lr", type=float, default=5e-5, help="mpo.py --lr")
    parser.add_argument("--mc", type=int, default=4,
                        help="M: continuations per step prefix for the PRM labels")
    parser.add_argument("--prm-per-question", type=int, default=2,
                        help="correct and wrong answers per question")
    parser.add_argument("--prm-count", type=int, default=0,
                        help="N more PRM conversations whose count steps are labelled against "
                             "the picture (count_labels)")
    parser.add_argument("--prm-tiles", default="split", choices=["split", "whole"],
                        help="the PRM's tiles per picture, in training and scoring: the budget "
                             "shared among a question's pictures, as the policy was trained, or "
                             "the whole budget for each (whole_budget_meta)")
    parser.add_argument("--prm-steps", type=int, default=900,
                        help="train.py --sft-steps for the PRM")
    # the PRM canary's count step (results/prm_canary): exact labels, 16,000 conversations, 3,600
    # steps: AUC 0.56 within a stated count at lr 1e-3, 0.97 at 1e-4 (measured)
    parser.add_argument("--prm-lr", type=float, default=1e-3, help="train.py --lr for the PRM")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature of Best-of-N")
    parser.add_argument("--rollout-temperature", type=float, default=0.7,
                        help="sampling temperature of the rollouts and the Monte-Carlo "
                             "continuations")
    parser.add_argument("--grade", default="steps", choices=["answer", "steps", "counts"],
                        help="what counts as a right sample for chosen answers and PRM labels "
                             "(see solved())")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="longest sampled answer")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_eval = min(args.n_train, 24), min(args.n_eval, 16)
        args.mpo_steps, args.prm_steps = min(args.mpo_steps, 4), min(args.prm_steps, 4)
        args.mc, args.prm_count = min(args.mc, 2), min(args.prm_count, 8)
    out = Path(args.out).resolve()
    if not (Path(args.sft) / "config.json").is_file():
        raise UserError(f"--sft {args.sft}: not a checkpoint directory "
                        "(run `python train.py` first)")
    out.mkdir(parents=True, exist_ok=True)
    timings, t_all = {}, time.time()

    def timed(name, fn):
        t = time.time()
        print(f"[{name}] ...", flush=True)
        fn()
        timings[name] = round(time.time() - t, 1)
        print(f"[{name}] {timings[name]:.0f}s", flush=True)

    def stage(name, done: Path, fn):
        """A stage that writes files: skipped when its last file is there."""
        if done.exists() and not args.redo:
            print(f"[{name}] {done} exists; skipped")
            return
        timed(name, fn)

    def training(name, script: str, run_dir: Path, flags: dict, steps_key: str):
        """A stage that trains, `script` with `flags`: skipped when it finished this run,
        continued where an interrupted one stopped (trained)."""
        progress = None if args.redo else trained(run_dir / "ckpt", flags, steps_key)
        if progress == "done":
            print(f"[{name}] {run_dir / 'ckpt'} finished this run; skipped")
            return
        cmd = [script, *(x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))),
               "--out-dir", str(run_dir), "--resume" if progress == "resume" else "--overwrite"]
        timed(name, lambda: run(cmd, out / f"{name}.log"))

    # a finished run may be evaluated on more (or fewer) held-out questions: the training split
    # comes from its own stream, so it stays as the later stages saw it; another --n-train would not
    questions = out / "questions"
    if (questions / "eval.jsonl").exists() and not args.redo:
        have = {split: len(rows_of(questions / f"{split}.jsonl")) for split in ("train", "eval")}
        if have["train"] != args.n_train:
            raise UserError(f"--n-train {args.n_train}: {questions / 'train.jsonl'} holds "
                            f"{have['train']} questions, which the later stages in {out} came "
                            "from (--redo, or another --out)")
        if have["eval"] != args.n_eval:
            print(f"[questions] --n-eval {args.n_eval}: the held-out split had {have['eval']}; "
                  "made again")
            (questions / "eval.jsonl").unlink()
    stage("questions", questions / "eval.jsonl",
          lambda: make_questions(out, args.n_train, args.n_eval, args.seed))
    train_q, eval_q = (rows_of(questions / f"{split}.jsonl") for split in ("train", "eval"))

    def rollouts():
        model, tok = load(args.sft)
        answers = sample(model, tok, out, [(q, "") for q in train_q], args.rollouts,
                         args.rollout_temperature, args.seed, args.max_new_tokens)
        write_jsonl(out / "rollouts.jsonl", [{**q, "answers": a} for q, a in zip(train_q, answers)])
    stage("rollouts", out / "rollouts.jsonl", rollouts)
    rolls = rows_of(out / "rollouts.jsonl")

    def pairs():
        rows = make_pairs(rolls, args.pairs_per_question, args.seed, args.reference_chosen,
                          args.grade)
        if args.dntp:
            rows += dntp_pairs(*load(args.sft), out, rolls, args.seed, args.max_new_tokens,
                               args.grade)
        if not rows:
            raise UserError("no preference pairs: no training question got both a right and a "
                            "wrong sample (more --rollouts, or --reference-chosen)")
        write_jsonl(out / "pairs" / "pairs.jsonl", rows)
        meta(out / "pairs" / "meta.json", "pairs.jsonl", length=len(rows))
    stage("pairs", out / "pairs" / "meta.json", pairs)
    training("mpo", "mpo.py", out / "mpo",
             dict(init_from=args.sft, data=str(out / "pairs" / "meta.json"), steps=args.mpo_steps,
                  lr=args.mpo_lr, seed=args.seed), "steps")

    def prm_data():
        rows = mc_labels(*load(args.sft), out, rolls, args.prm_per_question, args.mc, args.seed,
                         args.max_new_tokens, args.rollout_temperature, args.grade)
        write_jsonl(out / "prm" / "prm.jsonl", rows)
        meta(out / "prm" / "meta.json", "prm.jsonl", length=len(rows))
    stage("prm data", out / "prm" / "meta.json", prm_data)
    prm_meta = out / "prm" / "meta.json"
    if args.prm_count:
        # its own folder per N, whose meta.json lists both sets: another N trains another PRM
        prm_meta = out / f"prm_count{args.prm_count}" / "meta.json"

        def prm_count_data():
            rows = count_labels(out, args.prm_count, args.seed)
            write_jsonl(prm_meta.parent / "prm.jsonl", rows)
            write_json(prm_meta, {"prm": {"root": "..", "annotation": "../prm/prm.jsonl"},
                                  "prm_count": {"root": "..", "annotation": "prm.jsonl",
                                                "length": len(rows)}})
        stage("prm count data", prm_meta, prm_count_data)
    if args.prm_tiles == "whole":
        # the same conversations regrouped by picture count: prm_whole, prm_count{N}_whole
        source, prm_meta = prm_meta, out / f"{prm_meta.parent.name}_whole" / "meta.json"
        budget = config_from_json(read_json(Path(args.sft) / "config.json"))[0].max_dynamic_patch
        stage("prm data, whole budget", prm_meta,
              lambda: whole_budget_meta(source, prm_meta.parent, budget))
    training("prm", "train.py", out / "prm_ckpt",
             dict(stage="sft", init_from=args.sft, sft_meta=str(prm_meta),
                  sft_steps=args.prm_steps, lr=args.prm_lr, eval_per_type=0, seed=args.seed),
             "sft_steps")
    if args.prm_tiles == "whole":
        record_whole_budget(out / "prm_ckpt" / "ckpt")

    # ---- 7. evaluation
    t = time.time()
    greedy = {name: greedy_accuracy(ckpt, out, eval_q, args.max_new_tokens) for name, ckpt in
              (("sft", args.sft), ("mpo", str(out / "mpo" / "ckpt")))}
    timings["greedy eval"] = round(time.time() - t, 1)
    t = time.time()
    model, tok = load(args.sft)
    samples = sample(model, tok, out, [(q, "") for q in eval_q], max(NS), args.temperature,
                     args.seed + 10 ** 6, args.max_new_tokens)
    timings["best-of-n samples"] = round(time.time() - t, 1)
    t = time.time()
    step_scores = score_samples(*load(str(out / "prm_ckpt" / "ckpt")), out, eval_q, samples)
    timings["prm scoring"] = round(time.time() - t, 1)
    table = best_of_n_table(samples, critic_scores(step_scores), eval_q)
    # every sample with its grade and step scores, for a closer look
    write_jsonl(out / "best_of_n.jsonl", best_of_n_rows(eval_q, samples, step_scores))

    command = " ".join(["python -m experiments.reasoning", *sys.argv[1:]])
    results = {"command": command, "questions": {"train": len(train_q), "eval": len(eval_q)},
               "pairs": sum(1 for _ in open(out / "pairs" / "pairs.jsonl")),
               "prm_samples": sum(1 for _ in open(out / "prm" / "prm.jsonl")),
               "greedy": greedy, "best_of_n": table, "temperature": args.temperature,
               "seconds": timings, "wall_seconds": round(time.time() - t_all, 1),
               "args": vars(args)}
    write_json(out / "results.json", results)
    print(f"\nheld-out chain-of-thought questions: {len(eval_q)} (greedy decoding)")
    for name, r in greedy.items():
        print(f"  {name:4s} {100 * r['accuracy']:5.1f}%  ({r['correct']}/{r['n']})")
    print(f"\nBest-of-N from the SFT model (temperature {args.temperature}), accuracy %:")
    print("  critic    " + "".join(f"  N={n:<4d}" for n in NS))
    for name, row in table.items():
        print(f"  {name:9s} " + "".join(f"  {100 * row[str(n)]:5.1f} " for n in NS))
    print(f"\n{out / 'results.json'} | stage seconds: {timings}")


if __name__ == "__main__":
    with user_errors():
        main()
