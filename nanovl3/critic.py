"""
Test-time scaling: sample N answers, let a critic pick one (InternVL3 arXiv 2504.10479 §2.4, VisualPRM arXiv
2503.10291). Also the one rule that reads a final answer, shared by evaluation, preference data and majority voting.

    steps = split_steps(response)                              # "\\n\\n" separates the steps of a solution
    conv = prm_conversation(question, steps, ["+", "-", "+"])  # PRM training sample (SFT format)
    scores = prm_step_scores(prm, tok, question, responses, pixel_values, num_tiles)   # P("+") per step, per response
    best = best_of_n([aggregate(s, "mean") for s in scores])   # VisualPRM: a response scores the mean of its steps

    critic = load_critic("majority" | "PRM_DIR" | "outcome:PRM_DIR" | "vote:PRM_DIR")   # sample.py --critic
    best = best_of_n(score_responses(critic, question, responses, pixel_values, num_tiles))

The PRM is an ordinary InternVL checkpoint trained (SFT) on multi-turn conversations: the user gives the question
and the first step, then one step per turn; the assistant answers each with "+" (correct so far) or "-" (SPEC §8).
Reading P("+") at every assistant position of one conversation scores all steps in one forward pass.
Critics: "majority" (self-consistency, no model), "prm" (mean of the step scores, VisualPRM), "outcome" (the
score of the last step, which judges the whole solution: an outcome reward from the same checkpoint), "vote"
(PRM-weighted majority: each final answer collects the mean step scores of the samples that give it).
`question` always keeps its <image> tags; `pixel_values` [N,3,S,S] are its tiles, cut for the PRM's own config.
Shapes: B rows of a batch, T padded tokens, C hidden size, V vocab, K judged positions (steps) in a batch.
Tests: python -m pytest -q tests/test_critic.py
"""

import re
from collections import Counter
from dataclasses import dataclass

import torch

from nanovl3.attention import causal_mask
from nanovl3.chat import IGNORE, Tokenizer, tokenize_conversation
from nanovl3.common import UserError
from nanovl3.model import InternVL

# our own wording of VisualPRM's system prompt (the reward model reads it as the conversation's system turn)
PRM_SYSTEM_PROMPT = ("You are a careful grader. You will see a question and a solution, one step at a time. "
                     "After each step, reply \"+\" if every step so far is correct and \"-\" if there is a mistake.")
PLUS, MINUS = "+", "-"

# -----------------------------------------------------------------------------
# final answers (the one grading rule of the project)

ANSWER_RE = re.compile(r"The answer is\s*(.+?)\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)


def normalise(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def final_answer(text: str) -> str:
    """Final answer of a response: the last 'The answer is X.' line if there is one, else the whole text."""
    found = ANSWER_RE.findall(text)
    return normalise(found[-1] if found else text)


def is_correct(response: str, answer) -> bool:
    return final_answer(response) == normalise(str(answer))


# -----------------------------------------------------------------------------
# steps and the PRM conversation (SPEC §8)


def split_steps(response: str, max_steps: int | None = None) -> list[str]:
    """Steps are separated by blank lines. With max_steps m, consecutive pieces are grouped into chunks of
    ceil(n/m) pieces so that a long solution gets at most m judgments (the VisualPRM data pipeline uses m = 12)."""
    pieces = [p.strip() for p in response.strip().split("\n\n") if p.strip()]
    if max_steps and len(pieces) > max_steps:
        k = -(-len(pieces) // max_steps)  # ceil(n / m) pieces per chunk
        pieces = ["\n\n".join(pieces[i:i + k]) for i in range(0, len(pieces), k)]
    return pieces or [response.strip()]


def prm_conversation(question: str, steps: list[str], labels: list[str] | None = None) -> list[dict]:
    """Question + steps -> the PRM conversation in the SFT data format (system turn first).

    Turn 1 user: "### Question:\\n{question}\\n\\n### Solution Process:\\n{step 0}"; turn k user: step k; every
    assistant turn: its label ("+" placeholders when scoring). `question` keeps its <image> tags.
    """
    labels = labels or [PLUS] * len(steps)
    if len(labels) != len(steps):
        raise ValueError(f"prm_conversation: {len(steps)} steps but {len(labels)} labels")
    conv = [{"from": "system", "value": PRM_SYSTEM_PROMPT}]
    for k, (step, label) in enumerate(zip(steps, labels)):
        user = f"### Question:\n{question}\n\n### Solution Process:\n{step}" if k == 0 else step
        conv += [{"from": "human", "value": user}, {"from": "gpt", "value": label}]
    return conv


# -----------------------------------------------------------------------------
# critics without a model


def majority_vote(responses: list[str], weights: list[float] | None = None) -> list[float]:
    """Self-consistency: each response scores the share of responses with the same final answer. With weights
    (a critic's score per response), the share of the total weight: a weighted vote, which keeps the averaging
    over samples that majority voting does and lets the critic discount the samples it doubts."""
    weights = [1.0] * len(responses) if weights is None else weights
    if len(weights) != len(responses):
        raise ValueError(f"majority_vote: {len(responses)} responses but {len(weights)} weights")
    answers = [final_answer(r) for r in responses]
    totals = Counter()
    for a, w in zip(answers, weights):
        totals[a] += w
    whole = sum(weights) or 1.0  # every weight 0: all answers tie at 0
    return [totals[a] / whole for a in answers]


# -----------------------------------------------------------------------------
# scoring steps with a PRM (SPEC §8)


def plus_minus_ids(tok: Tokenizer) -> tuple[int, int]:
    """Ids of "+" and "-": the PRM's two answers. Each must be one token, else there is no single logit to read."""
    ids = []
    for s in (PLUS, MINUS):
        enc = tok.encode(s)
        if len(enc) != 1:
            raise UserError(f"{tok.path}: the PRM tokenizer encodes {s!r} as {len(enc)} tokens {enc}; "
                            "step scores need it to be one token")
        ids.append(enc[0])
    return ids[0], ids[1]


def prm_inputs(tok: Tokenizer, question: str, steps: list[str], num_tiles: list[int],
               tokens_per_tile: int) -> tuple[list[int], list[int]]:
    """The PRM conversation of one response -> (input_ids, positions): positions[k] predicts step k's "+".

    Tokenised by the SFT code itself, so scoring reads exactly the positions PRM training supervised: a supervised
    span starts at each assistant answer (labels[i] != IGNORE after IGNORE); position i - 1 is the "\\n" that ends
    "<|im_start|>assistant\\n", whose logits predict the answer token i.
    """
    ids, labels = tokenize_conversation(tok, prm_conversation(question, steps), num_tiles, tokens_per_tile)
    starts = [i for i in range(1, len(ids)) if labels[i] != IGNORE and labels[i - 1] == IGNORE]
    if len(starts) != len(steps):
        raise ValueError(f"prm_inputs: {len(steps)} steps but {len(starts)} answer spans in the tokenised conversation")
    plus = plus_minus_ids(tok)[0]
    for i in starts:
        if ids[i] != plus:  # e.g. a tokenizer that merges "+" with a neighbour
            raise UserError(f"{tok.path}: the PRM answer token at {i} is {tok.decode([ids[i]])!r}, not {PLUS!r}")
    return ids, [i - 1 for i in starts]


@torch.no_grad()
def prm_step_scores(prm: InternVL, tok: Tokenizer, question: str, responses: list[str], pixel_values=None,
                    num_tiles: list[int] = (), max_steps: int | None = None, batch_size: int = 8) -> list[list[float]]:
    """P("+") of every step of every response (SPEC §8): softmax over [logit("+"), logit("-")].

    All steps of a response are judged in one forward over its whole conversation ("+" placeholders as answers).
    question keeps its <image> tags; pixel_values [N,3,S,S] are the question's tiles ONCE (None: text only) and
    num_tiles the tiles per image. Rows are right-padded, which causal attention never lets a real token see,
    so a response scores the same alone or in a batch.
    """
    prm.eval()
    weight = prm.language_model.lm_head.weight
    device, dtype = weight.device, weight.dtype
    plus, minus = plus_minus_ids(tok)
    rows = [prm_inputs(tok, question, split_steps(r, max_steps), list(num_tiles), prm.cfg.num_image_token)
            for r in responses]
    # every row shows the same image: run the ViT once and write its features into each row
    vit = None if pixel_values is None else prm.extract_feature(pixel_values.to(device=device, dtype=dtype))

    scores = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        B, T = len(chunk), max(len(row_ids) for row_ids, _ in chunk)
        ids = torch.full((B, T), tok.pad_id, dtype=torch.long)  # right padding
        for r, (row_ids, _) in enumerate(chunk):
            ids[r, :len(row_ids)] = torch.tensor(row_ids)
        ids = ids.to(device)
        x = prm.embed(ids, features=None if vit is None else vit.repeat(B, 1, 1))  # [B, T, C]: each row its copy
        pos_ids = torch.arange(T, device=device).expand(B, T)  # real tokens 0..n-1 as in SFT
        # padding sits to the right of every real token, so a causal mask alone keeps it out of sight (no doc ids)
        h = prm.language_model(x, pos_ids, causal_mask(B, T, device))  # [B, T, C]
        # gather the judged positions of all rows and project only those (never [B, T, V])
        row_of = [r for r, (_, pos) in enumerate(chunk) for _ in pos]
        pos_of = [p for _, pos in chunk for p in pos]
        logits = prm.language_model.lm_head(h[row_of, pos_of]).float()  # [K, V]
        p_plus = logits[:, [plus, minus]].softmax(-1)[:, 0]  # [K]
        scores += [s.tolist() for s in p_plus.split([len(pos) for _, pos in chunk])]
    return scores


def aggregate(step_scores: list[float], how: str = "mean") -> float:
    """One score per response from its step scores: "mean" (VisualPRM), "min" (the weakest step), "last" (the
    last step's judgment covers the whole solution: our outcome-reward option)."""
    if how == "mean":
        return sum(step_scores) / len(step_scores)
    if how == "min":
        return min(step_scores)
    if how == "last":
        return step_scores[-1]
    raise ValueError(f"aggregate: unknown rule '{how}' (use mean, min or last)")


# -----------------------------------------------------------------------------
# Best-of-N: one interface for sample.py and scripts


def best_of_n(scores: list[float]) -> int:
    """Index of the highest score; ties go to the first (the earliest sample)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


@dataclass
class Critic:
    """How Best-of-N ranks candidates. kind: "majority" (no model), "prm" (mean step score), "outcome" (last step),
    "vote" (majority weighted by the mean step score)."""
    kind: str = "majority"
    model: InternVL | None = None
    tok: Tokenizer | None = None
    max_steps: int | None = None


AGGREGATE = {"prm": "mean", "outcome": "last", "vote": "mean"}


def load_critic(spec: str, dtype=None, device=None) -> Critic:
    """'majority' | 'PRM_DIR' | 'outcome:PRM_DIR' | 'vote:PRM_DIR' (a checkpoint directory with its own
    tokenizer.json)."""
    if spec == "majority":
        return Critic()
    kind, path = "prm", spec
    for prefix in ("outcome", "vote"):
        if spec.startswith(prefix + ":"):
            kind, path = prefix, spec[len(prefix) + 1:]
    model = InternVL.from_pretrained(path, dtype=dtype, device=device)  # UserError for a bad directory
    tok = Tokenizer.from_dir(path)
    plus_minus_ids(tok)  # fail now, not after sampling, if "+" / "-" are not single tokens
    return Critic(kind, model, tok)


def score_responses(critic: Critic, question: str, responses: list[str], pixel_values=None,
                    num_tiles: list[int] = ()) -> list[float]:
    """One score per response, higher = better; pick with best_of_n. pixel_values: tiles for the critic's model."""
    if critic.kind == "majority":
        return majority_vote(responses)
    if critic.kind not in AGGREGATE:
        raise ValueError(f"score_responses: unknown critic '{critic.kind}' (use majority, prm, outcome or vote)")
    steps = prm_step_scores(critic.model, critic.tok, question, responses, pixel_values, num_tiles, critic.max_steps)
    scores = [aggregate(s, AGGREGATE[critic.kind]) for s in steps]
    return majority_vote(responses, scores) if critic.kind == "vote" else scores
