"""
MPO: the loss against hand-computed values, its special cases (DPO, SFT NLL), the running δ, the
preference data reader and its errors, and mpo.py end to end (learning signal, exact resume, bad
input).

    python -m pytest -q tests/test_mpo.py
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanovl3.chat import Tokenizer
from nanovl3.common import UserError
from nanovl3.data import DataConfig, DatasetSpec, SampleStream, build_sample
from nanovl3.losses import IGNORE, RunningMean, lm_loss, mpo_loss, sequence_logps
from nanovl3.model import InternVL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sig(x):
    return 1 / (1 + math.exp(-x))


# -----------------------------------------------------------------------------
# the loss


def test_mpo_loss_equals_hand_computed_values():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])  # log π_θ, chosen / rejected
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])  # log π_ref
    nll = torch.tensor(0.7)
    loss, stats = mpo_loss(pc, pr, rc, rr, nll, RunningMean(), beta=0.5, weights=(0.8, 0.2, 1.0))
    # by hand: r = β (policy - ref)
    r_c = [0.5 * (-3.0 + 3.5), 0.5 * (-5.0 + 4.0)]  # [0.25, -0.5]
    r_r = [0.5 * (-4.0 + 3.0), 0.5 * (-2.0 + 2.5)]  # [-0.5, 0.25]
    delta = (sum(r_c) + sum(r_r)) / 4  # first batch: δ = mean of its own rewards
    per_pair = [0.8 * -math.log(sig(c - r))
                + 0.2 * (-math.log(sig(c - delta)) - math.log(sig(-(r - delta))))
                for c, r in zip(r_c, r_r)]
    expected = sum(per_pair) / 2 + 1.0 * 0.7
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["delta"] == pytest.approx(delta)
    assert stats["accuracy"] == 0.5
    assert stats["margin"] == pytest.approx(((0.25 + 0.5) + (-0.5 - 0.25)) / 2)


def test_weights_100_is_exactly_dpo_and_001_is_exactly_sft_nll():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=g)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 5, IGNORE, IGNORE],
                           [IGNORE, IGNORE, IGNORE, 1, 2, 9, 10]])
    pc, pr, rc, rr = torch.randn(4, 3, generator=g).unbind(0)
    pc.requires_grad_(True)
    nll = lm_loss(logits, labels)
    dpo, _ = mpo_loss(pc, pr, rc, rr, nll, RunningMean(), beta=0.1, weights=(1, 0, 0))
    expected = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
    assert torch.equal(dpo, expected)
    sft, _ = mpo_loss(pc, pr, rc, rr, nll, RunningMean(), beta=0.1, weights=(0, 0, 1))
    assert torch.equal(sft, nll)


def test_delta_is_the_cumulative_mean_of_batch_means():
    running, means = RunningMean(), []
    g = torch.Generator().manual_seed(1)
    for B in (2, 3, 1, 4):  # batches of different sizes: each counts once
        pc, pr, rc, rr = torch.randn(4, B, generator=g).unbind(0)
        _, stats = mpo_loss(pc, pr, rc, rr, torch.tensor(0.0), running, beta=0.1)
        means.append((0.1 * torch.cat([pc - rc, pr - rr])).mean().item())
        assert stats["delta"] == pytest.approx(sum(means) / len(means), abs=1e-6)
    state = running.state_dict()
    again = RunningMean()
    again.load_state_dict(state)
    assert again.mean == running.mean and again.count == pytest.approx(4)


def test_sequence_logps_sums_supervised_shifted_tokens():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 9, generator=g)
    labels = torch.tensor([[IGNORE, IGNORE, 4, 2, IGNORE, IGNORE], [IGNORE, 1, 1, 1, 8, 0]])
    got = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    for b in range(2):
        want = sum(logp[b, t - 1, labels[b, t]].item() for t in range(6) if labels[b, t] != IGNORE)
        assert got[b].item() == pytest.approx(want, abs=1e-5)


# -----------------------------------------------------------------------------
# preference data


@pytest.fixture
def world(small_world):
    return small_world


@pytest.fixture
def start(untrained_ckpt):
    return untrained_ckpt


def pairs_from_world(world, n=12) -> list[dict]:
    """CoT SFT answers as chosen, the same answer with a wrong final number as rejected."""
    rows = []
    for line in open(world / "sft" / "cot.jsonl"):
        d = json.loads(line)
        conv = d["conversations"]
        answer = conv[1]["value"]
        last = answer.rsplit("The answer is ", 1)
        wrong = last[0] + f"The answer is {int(last[1].rstrip('.')) + 1}."
        question = conv[0]["value"]
        if isinstance(d["image"], str):
            question = question.replace("<image>\n", "")
        rows.append({"image": d["image"], "question": question, "chosen": answer,
                     "rejected": wrong})
        if len(rows) == n:
            break
    return rows


def write_pairs(world, rows, name="pairs") -> str:
    d = world / name
    d.mkdir(exist_ok=True)
    with open(d / "pairs.jsonl", "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    meta = {"toy_pairs": {"root": "..", "annotation": "pairs.jsonl", "repeat_time": 1}}
    (d / "meta.json").write_text(json.dumps(meta))
    return str(d / "meta.json")


def test_preference_sample_shares_the_prompt_and_masks_it(world):
    tok = Tokenizer.from_dir(world)
    rows = pairs_from_world(world, 2)
    spec = DatasetSpec("p", str(world), str(world / "pairs.jsonl"), kind="preference")
    dcfg = DataConfig(tokens_per_tile=16, image_size=112)
    chosen, rejected = build_sample(tok, spec, 1, rows[0], dcfg)
    assert torch.equal(chosen.pixel_values, rejected.pixel_values)
    n = len(tok.encode(rows[0]["chosen"]))  # answer tokens; +1 for <|im_end|>
    first = int((chosen.labels != IGNORE).nonzero()[0])
    assert torch.equal(chosen.input_ids[:first], rejected.input_ids[:first])  # the same prompt
    assert int((chosen.labels != IGNORE).sum()) == n + 1
    assert tok.decode(chosen.labels[chosen.labels != IGNORE].tolist()) == rows[0]["chosen"]
    assert tok.decode(rejected.labels[rejected.labels != IGNORE].tolist()) == rows[0]["rejected"]
    # "<image>\n" was prepended to the question
    assert tok.img_start_id in chosen.input_ids[:first].tolist()


@pytest.mark.parametrize("broken,message", [
    (lambda r: r.pop("chosen"), "needs a string 'chosen'"),
    (lambda r: r.pop("rejected"), "needs a string 'rejected'"),
    (lambda r: r.update(rejected=r["chosen"]), "are the same answer"),
    (lambda r: r.update(chosen="  "), "'chosen' is empty"),
])
def test_bad_preference_lines_name_file_and_line(world, broken, message):
    tok = Tokenizer.from_dir(world)
    rows = pairs_from_world(world, 3)
    broken(rows[1])
    meta = write_pairs(world, rows, "bad")
    from nanovl3.data import read_meta
    specs = read_meta(meta)
    specs[0].kind = "preference"
    dcfg = DataConfig(tokens_per_tile=16, image_size=112)
    stream = SampleStream(specs, tok, dcfg, seed=0)
    with pytest.raises(UserError, match=rf"pairs.jsonl:2: .*{message}"):
        for _ in range(3):
            next(stream)
    skipping = SampleStream(specs, tok, dcfg, seed=0, skip_bad=True)
    got = [next(skipping) for _ in range(4)]
    assert skipping.skipped >= 1 and all(len(p) == 2 for p in got)


# -----------------------------------------------------------------------------
# mpo.py end to end


def mpo(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "mpo.py"), *map(str, argv)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def losses(out_dir) -> list[dict]:
    return [r for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))) if "loss" in r]


@pytest.mark.slow
def test_mpo_trains_logs_and_resumes_exactly(world, start, tmp_path):
    # the same two pairs every step: margins must grow
    meta = write_pairs(world, pairs_from_world(world, 2))
    common = ["--init-from", start, "--data", meta, "--steps", 4, "--batch-size", 2, "--lr", 1e-3,
              "--log-interval", 1, "--ckpt-interval", 2, "--max-seq-len", 1024]
    full = mpo(*common, "--out-dir", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    recs = losses(tmp_path / "full")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    # step 1: the policy is the reference, so every reward is 0 and the preference term is log 2
    assert recs[0]["reward_chosen"] == pytest.approx(0, abs=1e-5)
    assert recs[0]["loss_pref"] == pytest.approx(math.log(2), abs=1e-5)
    assert 0 < recs[1]["margin"] < recs[-1]["margin"]  # the policy moves towards the chosen answers
    assert "pref acc" in full.stdout and "margin" in full.stdout
    InternVL.from_pretrained(str(tmp_path / "full" / "ckpt"))  # loads like any checkpoint

    part = mpo(*common, "--out-dir", tmp_path / "part", "--max-steps", 2)
    assert part.returncode == 0, part.stderr
    resumed = mpo(*common, "--out-dir", tmp_path / "part", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    again = losses(tmp_path / "part")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(recs, again):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["delta"] == pytest.approx(b["delta"], abs=1e-7)


@pytest.mark.slow
def test_mpo_bad_input_is_one_line_error(world, start, tmp_path):
    rows = pairs_from_world(world, 3)
    rows[2].pop("rejected")
    meta = write_pairs(world, rows, "bad_cli")
    r = mpo("--init-from", start, "--data", meta, "--steps", 2, "--batch-size", 3,
            "--out-dir", tmp_path)
    assert r.returncode != 0
    assert "pairs.jsonl:3:" in r.stderr and "'rejected'" in r.stderr and "Traceback" not in r.stderr
    r = mpo("--data", meta)
    assert r.returncode != 0 and "--init-from" in r.stderr and "Traceback" not in r.stderr
