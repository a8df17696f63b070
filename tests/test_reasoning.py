"""
experiments/reasoning.py: the preference pairs, the Best-of-N table, and a whole tiny run of every
stage (so it cannot rot).

    python -m pytest -q tests/test_reasoning.py
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from data import toyworld
from experiments import reasoning
from nanovl3.critic import MINUS, PLUS, is_correct, prm_conversation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def answer(steps: str, x) -> str:
    return f"{steps}\n\nThe answer is {x}."


def test_pairs_put_right_answers_first_and_never_repeat():
    rollouts = [{"image": ["a.png"], "question": "<image>\nq", "answer": "4",
                 "answers": [answer("2 + 2 = 4.", 4), answer("2 + 2 = 5.", 5),
                             answer("2 + 1 = 3.", 3), answer("2 + 2 = 4.", 4)]},
                {"image": ["b.png"], "question": "<image>\nq", "answer": "1",
                 "answers": [answer("x", 1)] * 3}]
    pairs = reasoning.make_pairs(rollouts, pairs_per_question=2, seed=0)
    assert len(pairs) == 1  # one distinct right answer; the second question has no wrong one
    assert is_correct(pairs[0]["chosen"], "4") and not is_correct(pairs[0]["rejected"], "4")
    assert pairs[0]["image"] == ["a.png"] and pairs[0]["question"] == "<image>\nq"


def test_grade_steps_rejects_a_right_answer_its_steps_do_not_give():
    q = "<image>\nIf you add 1 more shape, how many shapes will there be? Think step by step."
    good = "There are 2 shapes in the image.\n\n2 + 1 = 3.\n\nThe answer is 3."
    lucky = "There are 4 shapes in the image.\n\n2 + 1 = 3.\n\nThe answer is 3."  # wrong chain
    wrong = "There are 4 shapes in the image.\n\n4 + 1 = 5.\n\nThe answer is 5."
    item = {"image": ["a.png"], "question": q, "answer": "3", "answers": [lucky, good, wrong]}
    assert reasoning.solved(lucky, item, "answer") and not reasoning.solved(lucky, item, "steps")
    assert reasoning.solved(good, item, "steps") and not reasoning.solved(wrong, item, "answer")
    # "answer": either right answer may be chosen; "steps": only the one its steps give. Rejected:
    # the wrong one
    chosen = {p["chosen"] for p in reasoning.make_pairs([item], 2, seed=0, grade="answer")}
    assert chosen <= {good, lucky}
    pairs = reasoning.make_pairs([item], 2, seed=0, grade="steps")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(good, wrong)]


def test_grade_counts_rejects_a_right_total_from_wrong_counts():
    q = "Image-1: <image>\nImage-2: <image>\nHow many shapes are there in total in both images?"
    first, second = (f"There are {{}} shapes in the {nth} image." for nth in ("first", "second"))
    reference = f"{first.format(2)}\n\n{second.format(3)}\n\n2 + 3 = 5.\n\nThe answer is 5."
    swapped = f"{first.format(3)}\n\n{second.format(2)}\n\n3 + 2 = 5.\n\nThe answer is 5."
    item = {"image": ["a.png", "b.png"], "question": q, "answer": "5", "reference": reference}
    assert reasoning.solved(swapped, item, "steps")
    assert not reasoning.solved(swapped, item, "counts")
    assert reasoning.solved(reference, item, "counts")
    # a right answer whose steps skip a count gives its total from nothing
    short = f"{first.format(2)}\n\n2 + 3 = 5.\n\nThe answer is 5."
    assert reasoning.solved(short, item, "answer") and not reasoning.solved(short, item, "counts")


def test_trained_tells_a_finished_stage_from_a_stopped_one_and_from_another_run(tmp_path):
    """A training stage is done only when its checkpoint finished the same run: one written at
    step 3 of 10 (a session stopped mid-run; train.py checkpoints every 100 steps) is continued,
    and a finished run with another learning rate is no reason to skip."""
    ckpt, flags = tmp_path / "ckpt", {"sft_steps": 10, "lr": 1e-4, "seed": 0}
    ckpt.mkdir()

    def stopped_at(step, **args):
        torch.save({"stage": "sft", "step": step, "args": {**flags, "ckpt_interval": 100, **args}},
                   ckpt / "train_state.pt")
    assert reasoning.trained(ckpt, flags, "sft_steps") is None   # no checkpoint yet
    stopped_at(3)
    assert reasoning.trained(ckpt, flags, "sft_steps") == "resume"
    stopped_at(10)
    assert reasoning.trained(ckpt, flags, "sft_steps") == "done"
    stopped_at(10, lr=1e-3)
    assert reasoning.trained(ckpt, flags, "sft_steps") is None


def test_mc_labels_end_each_conversation_at_its_first_minus(monkeypatch):
    """Monte-Carlo labels with a fake sampler: a continuation reaches the right answer unless its
    prefix holds a wrong count. The wrong answer's conversation must stop at that step (no "-" ever
    sits in an earlier turn)."""
    def fake_sample(model, tok, out, jobs, n, temperature, seed, max_new_tokens=96):
        def end(prefix):
            right = "There are 2" in prefix and "1 = 4" not in prefix
            return "\n\nThe answer is 3." if right else "\n\nThe answer is 5."
        return [[prefix + end(prefix)] * n for _, prefix in jobs]
    monkeypatch.setattr(reasoning, "sample", fake_sample)
    right = "There are 2 shapes in the image.\n\n2 + 1 = 3.\n\nThe answer is 3."
    slip = "There are 2 shapes in the image.\n\n2 + 1 = 4.\n\nThe answer is 4."  # a slip
    miscount = "There are 4 shapes in the image.\n\n4 + 1 = 5.\n\nThe answer is 5."
    roll = {"image": ["a.png"], "question": "<image>\nIf you add 1 more shape, how many?",
            "answer": "3", "answers": [right, slip, miscount]}
    rows = reasoning.mc_labels(None, None, None, [roll], per_question=2, m=2, seed=0)
    got = {}
    for row in rows:
        turns = row["conversations"][1:]  # after the system turn: (human step, gpt label) pairs
        steps = [t["value"].split("### Solution Process:\n")[-1] for t in turns[0::2]]
        got[steps[0] + " / " + steps[-1]] = "".join(t["value"] for t in turns[1::2])
    assert got == {"There are 2 shapes in the image. / The answer is 3.": "+++",
                   "There are 2 shapes in the image. / 2 + 1 = 4.": "+-",
                   "There are 4 shapes in the image. / There are 4 shapes in the image.": "-"}


def test_count_labels_check_each_stated_count_against_its_picture(monkeypatch, tmp_path):
    """--prm-count: "+" iff a step states its picture's count (the scene the picture was drawn
    from), the first image's count first; a conversation ends at its first "-"; the pictures are
    on disk under the paths the rows give."""
    built, real = [], toyworld.build

    def build(rng, qtype, target=None):
        scenes, qa = real(rng, qtype, target)
        built.append(scenes)
        return scenes, qa
    monkeypatch.setattr(toyworld, "build", build)
    rows = reasoning.count_labels(tmp_path, 60, seed=0)
    assert len(rows) == len(built) == 60
    seen = set()
    for row, scenes in zip(rows, built):
        turns = row["conversations"][1:]
        steps = [t["value"].split("### Solution Process:\n")[-1] for t in turns[0::2]]
        labels = [t["value"] for t in turns[1::2]]
        truth = [len(sc.objects) for sc in scenes]
        said = toyworld.stated_counts(steps)
        assert labels == [PLUS if s == t else MINUS for s, t in zip(said, truth)]
        assert MINUS not in labels[:-1] and (MINUS in labels or len(said) == len(scenes))
        assert all(abs(s - t) <= 1 for s, t in zip(said, truth))   # one off: the policy's slip
        assert turns[0]["value"].startswith(f"### Question:\n{toyworld.image_tags(len(scenes))}")
        assert all((tmp_path / path).is_file() for path in row["image"])
        seen.add((len(scenes), "".join(labels)))
    # both question types, right and wrong first and second counts
    assert {(1, PLUS), (1, MINUS), (2, PLUS + PLUS), (2, PLUS + MINUS), (2, MINUS)} <= seen


def test_prm_tiles_whole_gives_each_picture_of_a_question_the_whole_budget(untrained_ckpt,
                                                                            tmp_path):
    """--prm-tiles whole: train.py (which shares a sample's budget among its pictures) then cuts
    every picture of a PRM conversation as the model card's inference does, and the PRM's config
    says so, which is how its scoring and sample.py --critic cut them."""
    from nanovl3.chat import Tokenizer
    from nanovl3.data import DataConfig, build_sample, read_meta
    from nanovl3.image import load_images
    from nanovl3.model import InternVL
    rng, bank = random.Random(0), toyworld.ImageBank("questions/images")
    rows = []
    for qtype in ("arith_add", "arith_two", "arith_two"):
        scenes, qa = toyworld.build(rng, qtype)
        rows.append({"image": [bank.add(s) for s in scenes], "conversations": prm_conversation(
            toyworld.image_tags(len(scenes)) + qa["question"], ["There are 2 shapes."], [PLUS])})
    toyworld.render_all(tmp_path, bank.items)
    reasoning.write_jsonl(tmp_path / "prm" / "prm.jsonl", rows)
    reasoning.meta(tmp_path / "prm" / "meta.json", "prm.jsonl", length=len(rows))
    cfg = InternVL.from_pretrained(str(untrained_ckpt)).cfg
    reasoning.whole_budget_meta(tmp_path / "prm" / "meta.json", tmp_path / "prm_whole",
                                cfg.max_dynamic_patch)
    tok, specs = Tokenizer.from_dir(str(untrained_ckpt)), read_meta(tmp_path / "prm_whole" /
                                                                    "meta.json")
    data_cfg = DataConfig(cfg.num_image_token, cfg.vision.image_size, cfg.max_dynamic_patch)
    seen = []
    for spec in specs:
        for lineno, row in reasoning.read_jsonl(spec.annotation):
            paths = [tmp_path / p for p in row["image"]]
            whole = [t.size(0) for t in load_images(paths, cfg, split=False)[0]]
            shared = [t.size(0) for t in load_images(paths, cfg, split=True)[0]]
            assert build_sample(tok, spec, lineno, row, data_cfg).num_tiles == whole
            seen.append((len(paths), whole != shared))
    # every conversation once; a two-picture question's pictures get more tiles than as trained
    assert sorted(seen) == [(1, False), (2, True), (2, True)]
    ckpt = tmp_path / "ckpt"
    InternVL.from_pretrained(str(untrained_ckpt)).save_pretrained(str(ckpt))
    assert InternVL.from_pretrained(str(ckpt)).cfg.split_tiles   # the toy's: as trained
    reasoning.record_whole_budget(ckpt)
    assert not InternVL.from_pretrained(str(ckpt)).cfg.split_tiles


def test_best_of_n_table_counts_disjoint_groups():
    items = [{"answer": "1"}]
    samples = [[answer("s", a) for a in (2, 2, 1, 2, 1, 1, 2, 2)]]
    prm = [[0.1, 0.2, 0.9, 0.3, 0.8, 0.7, 0.1, 0.0]]  # the critic likes the right answers
    table = reasoning.best_of_n_table(samples, {"prm": prm}, items)
    assert table["prm"]["1"] == pytest.approx(3 / 8)  # N=1: the share of right samples
    assert table["prm"]["2"] == pytest.approx(2 / 4)  # groups (2,2) (1,2) (1,1) (2,2)
    assert table["prm"]["8"] == 1.0
    assert table["majority"]["8"] == 0.0  # five of eight say 2
    assert table["vote"]["8"] == 1.0  # 2.4 of the weight says 1, 0.7 says 2
    assert table["pass@N"]["4"] == 1.0 and table["pass@N"]["2"] == pytest.approx(2 / 4)


def test_more_held_out_questions_leave_the_training_questions_and_the_first_ones_as_they_were(
        tmp_path):
    reasoning.make_questions(tmp_path / "a", n_train=5, n_eval=3, seed=0)
    reasoning.make_questions(tmp_path / "b", n_train=5, n_eval=6, seed=0)
    a, b = (tmp_path / x / "questions" for x in "ab")
    assert (a / "train.jsonl").read_text() == (b / "train.jsonl").read_text()
    first = reasoning.rows_of(a / "eval.jsonl")
    assert reasoning.rows_of(b / "eval.jsonl")[:3] == first and len(first) == 3
    for path in first[0]["image"]:   # the same pictures behind the same paths
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()


@pytest.mark.slow
def test_every_stage_runs_and_writes_the_tables(untrained_ckpt, tmp_path):
    cmd = [sys.executable, "-m", "experiments.reasoning", "--sft", str(untrained_ckpt),
           "--out", str(tmp_path), "--n-train", "4", "--n-eval", "3",
           "--rollouts", "2", "--mpo-steps", "2", "--prm-steps", "2", "--mc", "1",
           "--prm-lr", "2e-4", "--max-new-tokens", "12",
           "--reference-chosen",  # a random model is never right: reference answers
           "--dntp"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.load(open(tmp_path / "results.json"))
    assert set(res["greedy"]) == {"sft", "mpo"} and res["questions"] == {"train": 4, "eval": 3}
    for name in ("prm", "outcome", "vote", "majority", "pass@N"):
        assert set(res["best_of_n"][name]) == {"1", "2", "4", "8"}
        for n, acc in res["best_of_n"][name].items():
            assert 0 <= acc <= res["best_of_n"]["pass@N"][n]  # no critic beats the ceiling
    assert (tmp_path / "mpo" / "ckpt" / "config.json").is_file()
    assert (tmp_path / "prm_ckpt" / "ckpt" / "config.json").is_file()
    assert '"lr": 0.0002,' in (tmp_path / "prm.log").read_text()   # --prm-lr reaches train.py
    assert "Best-of-N" in r.stdout

    # a session stopped after the PRM's first step: the same command continues that training
    prm = next(line for line in r.stdout.splitlines() if line.startswith("$ train.py"))
    prm = prm[2:].split("   (log:")[0].split()
    subprocess.run([sys.executable, *prm, "--max-steps", "1", "--ckpt-interval", "1"], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"[mpo] {tmp_path.resolve() / 'mpo' / 'ckpt'} finished this run; skipped" in again.stdout
    assert "--resume" in next(line for line in again.stdout.splitlines()
                              if line.startswith("$ train.py"))
    assert "resumed sft at step 1" in (tmp_path / "prm.log").read_text()
    # and the finished checkpoint records the run as asked, so the next time finds it done
    state = torch.load(tmp_path / "prm_ckpt" / "ckpt" / "train_state.pt", weights_only=False)
    assert state["step"] == 2 and state["args"]["init_from"] == str(untrained_ckpt)

    # the finished run evaluated on more held-out questions: only the questions and evaluation run
    more = subprocess.run([*cmd, "--n-eval", "5"], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-2000:]
    assert json.load(open(tmp_path / "results.json"))["questions"] == {"train": 4, "eval": 5}
    # the PRM canary's audit reads the run: its labels, and its PRM's scores on all 5 questions
    subprocess.run([sys.executable, "-m", "experiments.prm_canary", "--tasks", "", "--audit",
                    str(tmp_path), "--out", str(tmp_path / "audit")], check=True, cwd=ROOT,
                   capture_output=True, timeout=300)
    scores = json.load(open(tmp_path / "audit" / "results.json"))["audit"]["held_out_scores"]
    assert sum(c["n"] for kinds in scores.values() for c in kinds.values()) == sum(
        len(s["step_scores"]) for line in open(tmp_path / "best_of_n.jsonl")
        for s in json.loads(line)["samples"])
    # --audit-prm with the run's own PRM scores its samples again exactly as the evaluation did
    subprocess.run([sys.executable, "-m", "experiments.prm_canary", "--tasks", "", "--audit",
                    str(tmp_path), "--audit-prm", str(tmp_path / "prm_ckpt" / "ckpt"), "--out",
                    str(tmp_path / "audit_prm")], check=True, cwd=ROOT, capture_output=True,
                   timeout=300)
    assert ((tmp_path / "audit_prm" / "rescored" / "best_of_n.jsonl").read_text()
            == (tmp_path / "best_of_n.jsonl").read_text())
    audit = json.load(open(tmp_path / "audit_prm" / "results.json"))["audit"]
    assert audit["held_out_scores"] == scores and audit["best_of_n"] == json.load(
        open(tmp_path / "results.json"))["best_of_n"]
    assert "$ " not in more.stdout and "[rollouts] " in more.stdout and "skipped" in more.stdout
    # --prm-count: the PRM trains again, on the Monte-Carlo labels and the count conversations
    count = subprocess.run([*cmd, "--n-eval", "5", "--prm-count", "4"], capture_output=True,
                           text=True, cwd=ROOT, timeout=900)
    assert count.returncode == 0, count.stdout[-2000:] + count.stderr[-2000:]
    prm = next(line for line in count.stdout.splitlines() if line.startswith("$ train.py"))
    assert f"--sft-meta {tmp_path.resolve() / 'prm_count4' / 'meta.json'} " in prm
    both = json.load(open(tmp_path / "prm_count4" / "meta.json"))
    assert {k: v["annotation"] for k, v in both.items()} == {"prm": "../prm/prm.jsonl",
                                                              "prm_count": "prm.jsonl"}
    assert len(open(tmp_path / "prm_count4" / "prm.jsonl").readlines()) == 4
    assert json.load(open(tmp_path / "results.json"))["args"]["prm_count"] == 4
    # --prm-tiles whole: the PRM trains again on the same conversations, each picture cut with
    # the whole budget, and its config says so
    whole = subprocess.run([*cmd, "--n-eval", "5", "--prm-tiles", "whole"], capture_output=True,
                           text=True, cwd=ROOT, timeout=900)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-2000:]
    prm = next(line for line in whole.stdout.splitlines() if line.startswith("$ train.py"))
    assert f"--sft-meta {tmp_path.resolve() / 'prm_whole' / 'meta.json'} " in prm
    assert sum(len(open(tmp_path / "prm_whole" / f).readlines()) for f in ("images1.jsonl",
               "images2.jsonl") if (tmp_path / "prm_whole" / f).exists()) == len(
        open(tmp_path / "prm" / "prm.jsonl").readlines())
    assert json.load(open(tmp_path / "prm_ckpt" / "ckpt" / "config.json"))["split_tiles"] is False
    # other training questions would leave the later stages stale: one line, nothing run
    other = subprocess.run([*cmd, "--n-train", "6"], capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
    assert other.returncode != 0 and "--n-train 6" in other.stderr
    assert "Traceback" not in other.stderr and len(other.stderr.strip().splitlines()) == 1
