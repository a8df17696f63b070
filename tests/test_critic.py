"""
Best-of-N critics: final answers, step splitting, VisualPRM step scores (one pass = step by step,
batched = alone), and a PRM built by hand whose preference is known, so Best-of-N must pick its
candidate.

    python -m pytest -q tests/test_critic.py
"""

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from nanovl3.chat import ASSISTANT, Tokenizer, render_prompt, train_tokenizer
from nanovl3.common import UserError
from nanovl3.config import preset
from nanovl3.critic import (PRM_SYSTEM_PROMPT, Critic, aggregate, best_of_n, final_answer,
                            is_correct, majority_vote, plus_minus_ids, prm_conversation, prm_inputs,
                            prm_step_scores, score_responses, split_steps)
from nanovl3.model import InternVL

TEXTS = ["How many shapes are there? There are three shapes.",
         "First count the circles: there are 2.", "Then add the squares: 2 + 1 = 3.",
         "The answer is 3.", "a red circle - a blue square"] * 20
QUESTION = "<image>\nHow many shapes are there?"
STEPS = ["First count the circles: there are 2.", "Then the squares: there is 1.", "So 2 + 1 = 3.",
         "The answer is 3."]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def tiny_model(tok, std, tie=True):
    torch.manual_seed(0)
    cfg = preset("toy")
    cfg.text.vocab_size = tok.vocab_size
    cfg.text.tie_word_embeddings = tie
    cfg.image_token_id = tok.img_context_id
    model = InternVL(cfg)
    model.init_weights(std=std)
    return model.eval()


@pytest.fixture(scope="module")
def prm(tok):
    return tiny_model(tok, std=0.1)


@pytest.fixture(scope="module")
def pix(prm):
    size = prm.cfg.vision.image_size
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, size, size, generator=g)  # one image of 2 tiles


# -----------------------------------------------------------------------------
# answers and steps


def test_final_answer_and_is_correct():
    assert final_answer("First 2.\n\nThen 1.\nThe answer is 3.") == "3"
    assert final_answer("The answer is 4.\nNo.\nThe answer is Red .") == "red"  # the last counts
    assert final_answer("  Blue.  ") == "blue"  # no answer line: the whole text
    assert is_correct("so\nThe answer is RED.", "red") and not is_correct("The answer is 3.", 4)
    assert is_correct("The answer is 3.", 3)


def test_split_steps():
    assert split_steps("a\n\nb\n\n\n\nc\n") == ["a", "b", "c"]  # runs of blank lines: one separator
    # single newlines stay inside a step
    assert split_steps("one line\nsecond line") == ["one line\nsecond line"]
    assert split_steps("   ") == [""]
    pieces = [f"p{i}" for i in range(7)]
    # 7 pieces, at most 3 steps: chunks of ceil(7/3) = 3 pieces
    want = ["p0\n\np1\n\np2", "p3\n\np4\n\np5", "p6"]
    assert split_steps("\n\n".join(pieces), max_steps=3) == want
    assert split_steps("\n\n".join(pieces), max_steps=7) == pieces


def test_majority_vote_and_best_of_n():
    responses = ["The answer is 3.", "The answer is 4.", "x\nThe answer is 4.", "The answer is 5.",
                 "The answer is 4"]
    scores = majority_vote(responses)
    assert scores == pytest.approx([0.2, 0.6, 0.6, 0.2, 0.6])
    assert best_of_n(scores) == 1  # the first of the majority
    assert best_of_n(score_responses(Critic("majority"), "q", responses)) == 1
    assert best_of_n([0.1, 0.9, 0.3, 0.9]) == 1 and best_of_n([0.5]) == 0
    # weighted: answer 3 (one sample, weight 0.9) against 4 (three samples, 0.2 each) and 5 (0.1)
    weighted = majority_vote(responses, [0.9, 0.2, 0.2, 0.1, 0.2])
    assert weighted == pytest.approx([0.9 / 1.6, 0.6 / 1.6, 0.6 / 1.6, 0.1 / 1.6, 0.6 / 1.6])
    assert best_of_n(weighted) == 0
    assert majority_vote(responses, [1.0] * 5) == pytest.approx(scores)  # equal weights: majority
    with pytest.raises(ValueError, match="5 responses but 4 weights"):
        majority_vote(responses, [1.0] * 4)


def test_aggregate():
    s = [0.9, 0.2, 0.6]
    assert aggregate(s) == pytest.approx(sum(s) / 3)
    assert aggregate(s, "min") == 0.2 and aggregate(s, "last") == 0.6
    with pytest.raises(ValueError):
        aggregate(s, "max")


# -----------------------------------------------------------------------------
# PRM inputs and step scores


def test_prm_inputs_positions(tok):
    ids, positions = prm_inputs(tok, QUESTION, STEPS, [2], 16)
    plus = tok.encode("+")
    role = tok.encode(ASSISTANT)
    assert len(positions) == len(STEPS) and positions == sorted(positions)
    assert len(plus) == 1 and plus_minus_ids(tok)[0] == plus[0]
    for k, p in enumerate(positions):
        assert ids[p + 1] == plus[0]  # position p predicts the "+" of turn k
        assert ids[:p + 1][-len(role):] == role  # ... right after "<|im_start|>assistant\n"
        seen = tok.decode(ids[:p + 1])
        # it has read step k, no more
        assert STEPS[k] in seen and (k + 1 == len(STEPS) or STEPS[k + 1] not in seen)
    assert ids.count(tok.img_context_id) == 2 * 16 and PRM_SYSTEM_PROMPT in tok.decode(ids)


def test_plus_minus_must_be_single_tokens():
    # a word-level BPE that never saw "+": encode("+") is empty, so there is no logit to read
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["plain words only"] * 5,
                           trainers.BpeTrainer(vocab_size=50, show_progress=False))
    with pytest.raises(UserError, match="one token"):
        plus_minus_ids(Tokenizer(tk))


def truncated_score(prm, tok, question, steps, k, pix, num_tiles):
    """P("+") of step k from the generation prompt that ends right after step k (no prm_inputs)."""
    conv = prm_conversation(question, steps[:k + 1])
    users = [t["value"] for t in conv if t["from"] == "human"]
    prompt = render_prompt(users[-1], num_tiles, prm.cfg.num_image_token,
                           history=[(u, "+") for u in users[:-1]], system_message=PRM_SYSTEM_PROMPT)
    with torch.no_grad():
        logits = prm(torch.tensor([tok.encode(prompt)]), pix, last_only=True)[0, -1]  # [V]
    plus, minus = plus_minus_ids(tok)
    return logits[[plus, minus]].softmax(-1)[0].item()


def test_one_pass_equals_step_by_step(prm, tok, pix):
    scores = prm_step_scores(prm, tok, QUESTION, ["\n\n".join(STEPS)], pix, [2])[0]
    assert len(scores) == len(STEPS)
    for k in range(len(STEPS)):
        want = truncated_score(prm, tok, QUESTION, STEPS, k, pix, [2])
        assert scores[k] == pytest.approx(want, abs=1e-5)
    # the steps get different scores: a wrong position could not pass
    assert max(scores) - min(scores) > 1e-3


def test_batched_with_padding_equals_one_by_one(prm, tok, pix):
    responses = ["\n\n".join(STEPS), "The answer is 3.",
                 "\n\n".join(STEPS[:2]) + "\n\nThe answer is 4.", "Count them.\n\nThe answer is 3."]
    alone = [prm_step_scores(prm, tok, QUESTION, [r], pix, [2])[0] for r in responses]
    for batch_size in (2, 8):
        batched = prm_step_scores(prm, tok, QUESTION, responses, pix, [2], batch_size=batch_size)
        assert [len(s) for s in batched] == [len(s) for s in alone] == [4, 1, 3, 2]
        for b, a in zip(batched, alone):
            assert b == pytest.approx(a, abs=1e-5)
    # max_steps groups steps before scoring
    assert len(prm_step_scores(prm, tok, QUESTION, responses[:1], pix, [2], max_steps=2)[0]) == 2


def test_text_only_and_image_mismatch(prm, tok, pix):
    scores = prm_step_scores(prm, tok, "How many shapes?", ["a\n\nb"], None, [])
    assert len(scores[0]) == 2 and all(0 < s < 1 for s in scores[0])
    with pytest.raises(UserError, match="image tokens"):  # 2 tiles announced, 1 given
        prm_step_scores(prm, tok, QUESTION, ["a"], pix[:1], [2])


# -----------------------------------------------------------------------------
# a PRM with a known preference: P("+") > 1/2 exactly where a marker token has been seen, else 1/2


def marker_prm(tok, marker: int) -> InternVL:
    """Every block adds nothing except one head of layer 0, which attends uniformly to the past
    (q = 0) and copies channel 0 (set only in the marker's embedding) into channel 1; the lm_head
    reads channel 1 as logit("+") and minus it as logit("-"). Without the marker in view both
    logits are exactly 0."""
    model = tiny_model(tok, std=0.02, tie=False)
    plus, minus = plus_minus_ids(tok)
    lm = model.language_model
    with torch.no_grad():
        emb = lm.model.embed_tokens.weight  # [V, C]
        emb[:, :2] = 0
        emb[marker, 0] = 5.0
        for block in lm.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        attn = lm.model.layers[0].self_attn
        attn.q_proj.weight.zero_()
        attn.q_proj.bias.zero_()
        attn.v_proj.weight.zero_()
        attn.v_proj.bias.zero_()
        attn.v_proj.weight[0, 0] = 1.0  # value dim 0 of kv head 0 = channel 0
        attn.o_proj.weight[1, 0] = 1.0  # head 0, dim 0 -> channel 1
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[plus, 1], lm.lm_head.weight[minus, 1] = 10.0, -10.0
    return model


def test_best_of_n_picks_the_prm_favourite(tok):
    question = "How many shapes are there?"
    responses = ["First count the circles.\n\nThe answer is 2.",
                 "First count the circles.\n\nThen add the squares: 2 + 1.\n\nThe answer is 3.",
                 "Count them.\n\nThe answer is 4."]
    rows = [prm_inputs(tok, question, split_steps(r), [], 16) for r in responses]
    # the marker: a token of the favourite's (index 1) conversation that no other conversation has
    marker = sorted(set(rows[1][0]) - set(rows[0][0]) - set(rows[2][0]))[0]
    prm = marker_prm(tok, marker)
    steps = prm_step_scores(prm, tok, question, responses)
    for r, (ids, positions) in enumerate(rows):
        for k, p in enumerate(positions):
            if marker in ids[:p + 1]:
                assert steps[r][k] > 0.9
            else:
                assert steps[r][k] == pytest.approx(0.5, abs=1e-6)
    assert any(s > 0.9 for s in steps[1])  # the construction works: a favourite's step above 1/2
    # vote: every final answer differs, so the heaviest is the favourite
    for kind in ("prm", "outcome", "vote"):
        scores = score_responses(Critic(kind, prm, tok), question, responses)
        assert best_of_n(scores) == 1, (kind, scores)
    vote = score_responses(Critic("vote", prm, tok), question, responses[:2] + [responses[0]] * 2)
    assert best_of_n(vote) == 0  # two low-scored votes for 2 outweigh the favourite's one
    # majority voting on these candidates has no favourite: all answers differ, ties go to the first
    assert best_of_n(score_responses(Critic("majority"), question, responses)) == 0
