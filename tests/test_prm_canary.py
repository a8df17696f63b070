"""
The PRM canary: a label the step text alone decides ("+" iff the step says red) must be learned by
a tiny model through the PRM's whole path (prm_conversation -> tokenize_conversation -> packing ->
lm_loss -> prm_step_scores). Reading the wrong position or the wrong label ids must break it.

    python -m pytest -q tests/test_prm_canary.py
"""

import json
import random
import subprocess
import sys

import pytest
import torch

from data import toyworld
from experiments import prm_canary
from experiments.reasoning import ROOT
from nanovl3 import critic
from nanovl3.chat import train_tokenizer
from nanovl3.common import UserError, write_jsonl
from nanovl3.config import preset
from nanovl3.critic import PRM_SYSTEM_PROMPT
from nanovl3.model import InternVL


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run faster on 1 thread (5x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny text-only PRM trained on the word canary, and held-out labelled items."""
    rng = random.Random(0)
    train, held = (prm_canary.canary_items(rng, n, "word") for n in (600, 120))
    texts = [PRM_SYSTEM_PROMPT, "<|im_start|>user\n### Question:\n### Solution Process:\n",
             "<|im_start|>assistant\n+-", prm_canary.QUESTIONS["word"]]
    texts += [s for it in train for s in it["steps"]]
    tok = train_tokenizer(texts * 4, vocab_size=400)
    cfg = preset("toy", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    cfg.text.vocab_size, cfg.image_token_id = tok.vocab_size, tok.img_context_id
    torch.manual_seed(0)
    model = InternVL(cfg)
    model.init_weights()
    data = tmp_path_factory.mktemp("canary")
    prm_canary.write_canary(data, train)
    losses = prm_canary.train_in_process(model, tok, data, steps=200, lr=3e-3,
                                         max_packed_tokens=512)
    return model, tok, held, losses


def auc_and_gap(model, tok, held) -> tuple[float, float]:
    """The step AUC, and the mean P("+") of "+" steps minus that of "-" steps."""
    scores = prm_canary.score_items(model, tok, held)
    pairs = [(x, y == "+") for it, s in zip(held, scores) for x, y in zip(s, it["labels"])]
    plus, minus = ([x for x, y in pairs if y == want] for want in (True, False))
    gap = sum(plus) / len(plus) - sum(minus) / len(minus)
    return prm_canary.step_aucs(held, scores)["all"]["auc"], gap


def test_canary_is_learned(trained):
    model, tok, held, losses = trained
    assert losses[-1] < losses[0]
    auc, gap = auc_and_gap(model, tok, held)
    assert auc > 0.95 and gap > 0.3  # measured: 1.0 and 0.50


def test_canary_fails_at_the_wrong_position(trained, monkeypatch):
    """The canary's teeth: the same model read one token late (at the answer token itself, not the
    "\\n" before it) no longer separates the labels. (A wrong label id cannot get this far:
    prm_inputs checks that every answer token is plus_minus_ids' "+".)"""
    model, tok, held, _ = trained
    prm_inputs = critic.prm_inputs

    def one_late(*args):
        ids, positions = prm_inputs(*args)
        return ids, [p + 1 for p in positions]

    monkeypatch.setattr(critic, "prm_inputs", one_late)
    auc, gap = auc_and_gap(model, tok, held)
    assert auc < 0.9 and abs(gap) < 0.1  # measured: 0.74 and 0.0004


def test_auc():
    assert prm_canary.auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert prm_canary.auc([0.5, 0.5], [True, False]) == 0.5  # ties count half
    assert prm_canary.auc([0.1, 0.9], [True, False]) == 0.0
    assert prm_canary.auc([0.3], [True]) is None


def test_count_canary_labels_follow_the_picture(tmp_path):
    """The count canary's label is the picture's: "+" iff the step states the number of shapes
    drawn; a wrong count is one off; the training rows carry the picture."""
    bank = toyworld.ImageBank("images")
    items = prm_canary.canary_items(random.Random(0), 200, "count", bank=bank)
    scenes = dict(bank.items)
    for it in items:
        n, said = len(scenes[it["image"][0]].objects), prm_canary.stated_count(it)
        assert it["labels"] == ["+" if said == n else "-"] and abs(said - n) <= 1
    assert 0.3 < sum(it["labels"] == ["-"] for it in items) / len(items) < 0.5  # p_good 0.6
    prm_canary.write_canary(tmp_path, items[:3])
    rows = [json.loads(line) for line in (tmp_path / "prm.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == [it["image"] for it in items[:3]]


def test_step_kind_reads_the_toy_templates():
    """Each step of the toy's reference solutions is named by what can check it."""
    rng = random.Random(0)
    kinds = {}
    for qtype in ("arith_two", "arith_add", "count_cot"):
        _, qa = toyworld.build(rng, qtype)
        kinds[qtype] = [prm_canary.step_kind(s) for s in critic.split_steps(qa["reply"])]
    count, item, total = "count (picture)", "item of a counting chain (picture)", "sum (text)"
    assert kinds["arith_two"] == [count, count, total, "answer"]
    assert kinds["arith_add"] == [count, total, "answer"]
    assert kinds["count_cot"][0] == "other" and kinds["count_cot"][-1] == "answer"
    assert set(kinds["count_cot"][1:-1]) == {item}


def test_label_audit_holds_the_labels_against_the_reference(tmp_path):
    """A right answer whose steps leave the reference (two counts swapped) is "+" throughout: the
    audit counts its steps as "+ wrong" and the answer under "wrong steps"; a wrong count that is
    labelled "-" agrees."""
    two = "Image-1: <image>\nImage-2: <image>\nHow many shapes are there in total in both images?"
    ref = ["There are 2 shapes in the first image.", "There is 1 shape in the second image.",
           "2 + 1 = 3.", "The answer is 3."]
    swapped = ["There is 1 shape in the first image.", "There are 2 shapes in the second image.",
               "1 + 2 = 3.", "The answer is 3."]
    q = {"image": ["a.png", "b.png"], "question": two, "answer": "3", "type": "arith_two",
         "reference": "\n\n".join(ref)}
    rows = [{"image": q["image"], "conversations": critic.prm_conversation(two, steps, labels)}
            for steps, labels in [(ref, None), (swapped, None), (swapped[:1], ["-"])]]
    write_jsonl(tmp_path / "questions" / "train.jsonl", [q])
    write_jsonl(tmp_path / "prm" / "prm.jsonl", rows)
    res = prm_canary.label_audit(tmp_path)
    count = res["steps"]["arith_two"]["count (picture)"]
    assert count == {"+ right": 2, "+ wrong": 2, "- wrong": 1, "n": 5, "agree": 0.6}
    assert res["steps"]["arith_two"]["answer"] == {"+ right": 1, "+ wrong": 1, "n": 2,
                                                   "agree": 0.5}
    assert res["right_answer_wrong_steps"] == {"arith_two": {"right answers": 2, "wrong steps": 1}}
    rows[0]["image"] = ["c.png", "b.png"]   # a conversation whose question is not in the run
    write_jsonl(tmp_path / "prm" / "prm.jsonl", rows)
    with pytest.raises(UserError, match="c.png"):
        prm_canary.label_audit(tmp_path)


def test_score_audit_compares_the_kth_steps_of_one_questions_samples_after_right_steps(tmp_path):
    """Held-out step scores against the reference, as the PRM was trained: a sample counts up to
    its first wrong step, and the AUC compares only the k-th steps of one question's samples (a
    PRM whose later steps all score higher is not credited for it)."""
    two = "Image-1: <image>\nImage-2: <image>\nHow many shapes are there in total in both images?"
    ref = ["There are 2 shapes in the first image.", "There is 1 shape in the second image.",
           "2 + 1 = 3.", "The answer is 3."]
    q = {"image": ["a.png", "b.png"], "question": two, "answer": "3", "type": "arith_two",
         "reference": "\n\n".join(ref)}
    first_wrong = ["There are 3 shapes in the first image.", ref[1], "3 + 1 = 4.",
                   "The answer is 4."]
    second_wrong = ref[:1] + ["There are 2 shapes in the second image.", "2 + 2 = 4.",
                              "The answer is 4."]
    samples = [(ref, [0.2, 0.5, 0.8, 0.9]), (first_wrong, [0.1, 0.9, 0.9, 0.9]),
               (second_wrong, [0.3, 0.4, 0.9, 0.9])]
    write_jsonl(tmp_path / "questions" / "eval.jsonl", [q])
    write_jsonl(tmp_path / "best_of_n.jsonl", [{"question": two, "answer": "3", "samples": [
        {"response": "\n\n".join(steps), "correct": False, "step_scores": scores}
        for steps, scores in samples]}])
    rows = prm_canary.held_out_rows(tmp_path, tmp_path / "best_of_n.jsonl")
    res = prm_canary.score_audit(rows)["arith_two"]
    # first counts 0.2, 0.3 (right) > 0.1; second counts 0.5 > 0.4; the first_wrong sample's
    # second count (0.9) comes after a wrong step. Pooled over both positions: 4 of 6 pairs
    assert res["count (picture)"] == {"auc": 1.0, "n": 5, "right": 0.6}
    assert res["sum (text)"] == {"auc": None, "n": 1, "right": 1.0}   # one sample got that far
    q["answer"] = "4"   # best_of_n.jsonl from another run's questions
    write_jsonl(tmp_path / "questions" / "eval.jsonl", [q])
    with pytest.raises(UserError, match="best_of_n.jsonl:1: not held-out question 1"):
        prm_canary.held_out_rows(tmp_path, tmp_path / "best_of_n.jsonl")


def test_prm_ranking_compares_right_and_wrong_samples_of_one_question(tmp_path):
    """The MPO learn check: the share of (right, wrong) sample pairs of the same question in which
    the right sample has the higher mean step score; pairs across questions do not count. By
    question type (ranking_by_type), each type's questions alone."""
    def sample(correct, *steps):
        return {"response": "", "correct": correct, "step_scores": list(steps)}
    rows = [{"samples": [sample(True, 0.9, 0.7), sample(False, 0.2), sample(False, 0.9)]},
            {"samples": [sample(True, 0.1), sample(True, 0.3), sample(False, 0.3)]},
            {"samples": [sample(True, 0.0)]}]   # no wrong sample: no pair
    # question 1: 0.8 beats 0.2, loses to 0.9; question 2: 0.1 loses, 0.3 ties -> 1.5 of 4
    assert prm_canary.prm_ranking(rows) == 1.5 / 4
    assert prm_canary.prm_ranking(rows[2:]) == 0.5
    questions = [{"question": f"q{i}", "answer": "1", "type": t}
                 for i, t in enumerate(["a", "b", "a"])]
    write_jsonl(tmp_path / "questions" / "eval.jsonl", questions)
    write_jsonl(tmp_path / "best_of_n.jsonl", [{"question": q["question"], "answer": "1", **r}
                                               for q, r in zip(questions, rows)])
    rows = prm_canary.held_out_rows(tmp_path, tmp_path / "best_of_n.jsonl")
    assert prm_canary.ranking_by_type(rows) == {
        "all": 1.5 / 4, "a": 1 / 2, "b": 0.5 / 2}


def test_tile_check_grades_each_pictures_stated_count(untrained_ckpt, tmp_path, monkeypatch):
    """--tile-check: a chain of thought that states the first picture's count and misses the
    second's scores half; a picture alone answered right scores all; a two-picture question's
    shared budget cuts its pictures into fewer tiles than the whole one."""
    def sample(model, tok, out, jobs, n, temperature, seed, max_new_tokens=96, **cut):
        return [[f"There are {it['counts'][0]} shapes in the first image.\n\nThere are "
                 f"{it['counts'][1] + 1} shapes in the second image.\n\nThe answer is 0."]
                if "counts" in it else [f"{it['answer']}."] for it, _ in jobs]
    monkeypatch.setattr(prm_canary, "sample", sample)
    args = type("Args", (), dict(out=str(tmp_path), seed=0, tile_check=6,
                                 sft=str(untrained_ckpt)))
    res = prm_canary.tile_check(args)
    for budget in ("shared", "whole"):
        assert res[f"two pictures, {budget}"]["count"] == 0.5
        assert res[f"one picture, {budget}"]["count"] == 1.0
        assert res[f"two pictures, {budget}"]["tiles"] == res[f"one picture, {budget}"]["tiles"]
    assert res["two pictures, shared"]["tiles"] < res["two pictures, whole"]["tiles"]


@pytest.mark.slow
def test_the_experiment_runs_end_to_end(untrained_ckpt, tmp_path):
    """python -m experiments.prm_canary at a tiny size: canary and real-label PRMs via train.py."""
    out, real = tmp_path / "out", tmp_path / "real"
    subprocess.run([sys.executable, "-m", "experiments.prm_canary", "--tasks", "word,addk,count",
                    "--steps", "2", "--n-train", "40", "--init", str(untrained_ckpt), "--out",
                    str(out), "--real", str(real), "--sft", str(untrained_ckpt), "--n-real", "3",
                    "--real-steps", "2", "--held-out", "0.5", "--mistakes", "2", "--audit",
                    str(real), "--tile-check", "2"], check=True, cwd=ROOT)
    res = json.loads((out / "results.json").read_text())
    assert set(res["canary"]) == {"word", "addk", "count"}
    assert res["canary"]["addk"]["step_auc"]["step 2"]["n"] == 300  # every item has a sum step
    aucs = res["canary"]["count"]["count_aucs"]
    assert aucs["text prior"]["same_count_auc"] == 0.5   # the prior is one number per count
    assert set(aucs) == {"text prior", "PRM", "initial model's own count"}
    assert sum(res["mistakes"]["first_departure"].values()) == res["mistakes"]["wrong"]
    assert {k: 0 <= c["count"] <= 1 for k, c in res["tile_check"].items()} == {
        f"{n} picture{'s' * (n == 'two')}, {b}": True for n in ("one", "two")
        for b in ("shared", "whole")}
    assert res["real"]["held_out_conversations"] > 0 and (real / "prm" / "prm.jsonl").is_file()
    audited = sum(c["n"] for kinds in res["audit"]["steps"].values() for c in kinds.values())
    rows = [json.loads(line) for line in (real / "prm" / "prm.jsonl").read_text().splitlines()]
    assert audited == sum(len(r["conversations"]) // 2 for r in rows)   # every labelled step
