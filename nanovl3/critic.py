"""
Test-time scaling: sample N answers, a critic picks one (InternVL3 arXiv 2504.10479 §2.4, VisualPRM
arXiv 2503.10291); also the one rule that reads final answers (evaluation, preference data, voting).

    steps = split_steps(response)                              # "\\n\\n" separates the steps
    conv = prm_conversation(question, steps, ["+", "-", "+"])  # PRM training sample (SFT format)
    scores = prm_step_scores(prm, tok, question, responses, pixel_values, num_tiles)  # P("+")
    best = best_of_n([aggregate(s, "mean") for s in scores])   # VisualPRM: the mean of the steps
    critic = load_critic("majority" | "PRM_DIR" | "outcome:PRM_DIR" | "vote:PRM_DIR")  # --critic
    best = best_of_n(score_responses(critic, question, responses, pixel_values, num_tiles))

The PRM is an InternVL checkpoint SFT-trained on conversations of one step per user turn (the first
with the question), each answered "+" (correct so far) or "-": P("+") at every assistant position
scores all steps in one forward. `question` keeps its <image> tags; `pixel_values` [N,3,S,S] are its
tiles, cut for the PRM's config. Shapes: B rows, T tokens, C hidden, V vocab, K judged positions.
References: upstream OpenGVLab/InternVL internvl_chat/tools/reasoning_data_pipeline/ (PRM data and
step splitting); the VisualPRM checkpoint's remote code (`InternVLRewardModel`: step scoring).
Tests: python -m pytest -q tests/test_critic.py"""

import re
from collections import Counter
from dataclasses import dataclass

import torch

from nanovl3.attention import causal_mask
from nanovl3.chat import Tokenizer, tokenize_conversation
from nanovl3.common import UserError
from nanovl3.losses import IGNORE
from nanovl3.model import InternVL

PRM_SYSTEM_PROMPT = (  # our own wording of VisualPRM's system prompt (the PRM's system turn)
    "You are a careful grader. You will see a question and a solution, one step at a time. After "
    "each step, reply \"+\" if every step so far is correct and \"-\" if there is a mistake.")
PLUS, MINUS = "+", "-"
AGGREGATE = {"prm": "mean", "outcome": "last", "vote": "mean"}  # a PRM critic's rule (aggregate)

# -----------------------------------------------------------------------------
# final answers (the one grading rule of the project) and majority voting
ANSWER_RE = re.compile(r"The answer is\s*(.+?)\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)


def normalise(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def final_answer(text: str) -> str:
    """The last 'The answer is X.' line of a response if there is one, else the whole text."""
    found = ANSWER_RE.findall(text)
    return normalise(found[-1] if found else text)


def is_correct(response: str, answer) -> bool:
    return final_answer(response) == normalise(str(answer))


def majority_vote(responses: list[str], weights: list[float] | None = None) -> list[float]:
    """Self-consistency: each response scores the share of responses with its final answer; with
    weights (a critic's score per response), its share of the total weight: a weighted vote."""
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
# the PRM (steps, conversation, step scores) and Best-of-N, one interface for sample.py and scripts

def split_steps(response: str, max_steps: int | None = None) -> list[str]:
    """Steps are separated by blank lines. With max_steps m, consecutive pieces are grouped into
    chunks of ceil(n/m) pieces: at most m judgments for a long solution (upstream uses m = 12)."""
    pieces = [p.strip() for p in response.strip().split("\n\n") if p.strip()]
    if max_steps and len(pieces) > max_steps:
        k = -(-len(pieces) // max_steps)  # ceil(n / m) pieces per chunk
        pieces = ["\n\n".join(pieces[i:i + k]) for i in range(0, len(pieces), k)]
    return pieces or [response.strip()]


def prm_conversation(question: str, steps: list[str],
                     labels: list[str] | None = None) -> list[dict]:
    """Question + steps -> the PRM conversation in the SFT data format: the system turn, then a user
    turn per step (the first with the question), each answered by its label ("+" when scoring)."""
    labels = labels or [PLUS] * len(steps)
    if len(labels) != len(steps):
        raise ValueError(f"prm_conversation: {len(steps)} steps but {len(labels)} labels")
    conv = [{"from": "system", "value": PRM_SYSTEM_PROMPT}]
    for k, (step, label) in enumerate(zip(steps, labels)):
        user = f"### Question:\n{question}\n\n### Solution Process:\n{step}" if k == 0 else step
        conv += [{"from": "human", "value": user}, {"from": "gpt", "value": label}]
    return conv


def plus_minus_ids(tok: Tokenizer) -> tuple[int, int]:
    """Ids of "+" and "-", the PRM's two answers: each must be one token, to give one logit."""
    ids = [tok.encode(s) for s in (PLUS, MINUS)]
    for s, enc in zip((PLUS, MINUS), ids):
        if len(enc) != 1:
            raise UserError(f"{tok.path}: the PRM tokenizer encodes {s!r} as {len(enc)} tokens "
                            f"{enc}; step scores need it to be one token")
    return ids[0][0], ids[1][0]


def prm_inputs(tok: Tokenizer, question: str, steps: list[str], num_tiles: list[int],
               tokens_per_tile: int) -> tuple[list[int], list[int]]:
    """One response's PRM conversation -> (input_ids, positions), positions[k] predicting step k's
    "+". Tokenised by the SFT code, so scoring reads the positions that PRM training supervised: an
    answer starting at i is predicted at i - 1, the "\\n" ending "<|im_start|>assistant\\n"."""
    conv = prm_conversation(question, steps)
    ids, labels = tokenize_conversation(tok, conv, num_tiles, tokens_per_tile)
    starts = [i for i in range(1, len(ids)) if labels[i] != IGNORE and labels[i - 1] == IGNORE]
    if len(starts) != len(steps):
        raise ValueError(f"prm_inputs: {len(steps)} steps but {len(starts)} answer spans in the "
                         "tokenised conversation")
    plus = plus_minus_ids(tok)[0]
    for i in starts:
        if ids[i] != plus:  # e.g. a tokenizer that merges "+" with a neighbour
            got = tok.decode([ids[i]])
            raise UserError(f"{tok.path}: the PRM answer token at {i} is {got!r}, not {PLUS!r}")
    return ids, [i - 1 for i in starts]


@torch.no_grad()
def prm_step_scores(prm: InternVL, tok: Tokenizer, question: str, responses: list[str],
                    pixel_values=None, num_tiles: list[int] = (), max_steps: int | None = None,
                    batch_size: int = 8) -> list[list[float]]:
    """P("+") of every step of every response (softmax over the "+" and "-" logits). pixel_values
    [N,3,S,S]: the question's tiles ONCE (None: text only); num_tiles: tiles per image. Rows are
    right-padded, hidden from real tokens by causal attention: a row scores the same in a batch."""
    prm.eval()
    weight = prm.language_model.lm_head.weight
    device, dtype = weight.device, weight.dtype
    plus, minus = plus_minus_ids(tok)
    steps = [split_steps(r, max_steps) for r in responses]
    rows = [prm_inputs(tok, question, s, list(num_tiles), prm.cfg.num_image_token) for s in steps]
    vit = None if pixel_values is None else prm.extract_feature(pixel_values.to(device, dtype))
    scores = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        B, T = len(chunk), max(len(row) for row, _ in chunk)
        ids = torch.tensor([row + [tok.pad_id] * (T - len(row)) for row, _ in chunk], device=device)
        x = prm.embed(ids, features=None if vit is None else vit.repeat(B, 1, 1))  # [B,T,C]
        pos_ids = torch.arange(T, device=device).expand(B, T)  # real tokens 0..n-1 as in SFT
        h = prm.language_model(x, pos_ids, causal_mask(B, T, device))  # [B,T,C]
        # gather the judged positions of all rows and project only those (never [B,T,V])
        row_of = [r for r, (_, pos) in enumerate(chunk) for _ in pos]
        pos_of = [p for _, pos in chunk for p in pos]
        logits = prm.language_model.lm_head(h[row_of, pos_of]).float()  # [K,V]
        p_plus = logits[:, [plus, minus]].softmax(-1)[:, 0]  # [K]
        scores += [s.tolist() for s in p_plus.split([len(pos) for _, pos in chunk])]
    return scores


def aggregate(step_scores: list[float], how: str = "mean") -> float:
    """A response's score from its steps': "mean" (VisualPRM), "min", "last" (an outcome reward)."""
    rules = {"mean": lambda s: sum(s) / len(s), "min": min, "last": lambda s: s[-1]}
    if how not in rules:
        raise ValueError(f"aggregate: unknown rule '{how}' (use mean, min or last)")
    return rules[how](step_scores)


def best_of_n(scores: list[float]) -> int:
    """Index of the highest score; ties go to the first (the earliest sample)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


@dataclass
class Critic:
    """How Best-of-N ranks candidates. kind: "majority" (self-consistency, no model), "prm" (mean
    step score, VisualPRM), "outcome" (the last step's score), "vote" (PRM-weighted majority)."""
    kind: str = "majority"
    model: InternVL | None = None
    tok: Tokenizer | None = None
    max_steps: int | None = None


def load_critic(spec: str, dtype=None, device=None) -> Critic:
    """'majority' | 'PRM_DIR' | 'outcome:PRM_DIR' | 'vote:PRM_DIR' (checkpoint + tokenizer.json)."""
    if spec == "majority":
        return Critic()
    prefix, colon, rest = spec.partition(":")
    kind, path = (prefix, rest) if colon and prefix in ("outcome", "vote") else ("prm", spec)
    model = InternVL.from_pretrained(path, dtype=dtype, device=device)  # UserError for a bad dir
    tok = Tokenizer.from_dir(path)
    plus_minus_ids(tok)  # fail now, not after sampling, if "+" / "-" are not single tokens
    return Critic(kind, model, tok)


def score_responses(critic: Critic, question: str, responses: list[str], pixel_values=None,
                    num_tiles: list[int] = ()) -> list[float]:
    """One score per response, higher = better (pick with best_of_n); pixel_values: the critic's."""
    if critic.kind == "majority":
        return majority_vote(responses)
    if critic.kind not in AGGREGATE:
        raise ValueError(f"score_responses: unknown critic '{critic.kind}' "
                         "(use majority, prm, outcome or vote)")
    steps = prm_step_scores(critic.model, critic.tok, question, responses, pixel_values, num_tiles,
                            critic.max_steps)
    scores = [aggregate(s, AGGREGATE[critic.kind]) for s in steps]
    return majority_vote(responses, scores) if critic.kind == "vote" else scores
