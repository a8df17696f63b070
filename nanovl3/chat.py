"""
Tokenizer and chat template: the `internvl2_5` template that InternVL3 uses.

    tok = Tokenizer.from_dir("InternVL3-1B")                     # the checkpoint's tokenizer.json
    ids = tok.encode(render_prompt("Describe the image.", [13]))   # generation prompt, 13 tiles
    ids, labels = tokenize_conversation(tok, conversations, [13], 256)   # SFT: IGNORE but answers

The template ("MPT" separator style), shown with real newlines; each `<image>` becomes `<img>` +
`<IMG_CONTEXT>` × (256 · tiles) + `</img>`; image features replace the `<IMG_CONTEXT>` embeddings:

    <|im_start|>system
    {system_message}<|im_end|>
    <|im_start|>user
    <image>
    {question}<|im_end|>
    <|im_start|>assistant
    {answer}<|im_end|>

References: InternVL2.5 (arXiv 2412.05271); upstream OpenGVLab/InternVL internvl_chat/internvl/
conversation.py (template internvl2_5), model/internvl_chat/modeling_internvl_chat.py (`chat`),
train/dataset.py (`preprocess_internvl2_5`); the InternVL3-1B tokenizer files on the HF hub.
Tests: python -m pytest -q tests/test_chat.py"""

import json
import math
import os
import re
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

from nanovl3.common import UserError, read_json
from nanovl3.losses import IGNORE

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_TAG = "<image>"  # the placeholder users and data files write; never a token itself
DEFAULT_SYSTEM_MESSAGE = ("你是书生·万象，英文名是InternVL，"
                          "是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                          "多模态大语言模型。")
# the released tokenizers' added tokens (Qwen2.5's + InternVL's), ids 0..11 in train_tokenizer
ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT,
                  "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
SEP, USER, ASSISTANT = "<|im_end|>\n", "<|im_start|>user\n", "<|im_start|>assistant\n"
# Qwen2's pre-tokeniser split (transformers' models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX):
# contractions, letter runs with one leading non-letter, single digits, punctuation, whitespace
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


class Tokenizer:
    """Wraps a `tokenizers` tokenizer.json: no BOS/EOS, special tokens never split (as Qwen2)."""

    def __init__(self, tk: HFTokenizer, path: str = "<in memory>"):
        self.tk, self.path = tk, path

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """A checkpoint directory (its tokenizer.json, else the same tokenizer built from
        vocab.json + merges.txt + its added tokens), or a tokenizer.json itself."""
        path = str(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if os.path.isdir(path) and not os.path.isfile(file):
            return cls(_bpe_from_vocab(path), path)
        if not os.path.isfile(file):
            raise UserError(f"{file}: tokenizer file not found")
        try:
            return cls(HFTokenizer.from_file(file), file)
        except Exception as e:  # tokenizers raises plain Exceptions for bad JSON / unknown models
            why = str(e).splitlines()[0][:200]
            raise UserError(f"{file}: not a readable tokenizer.json ({why})")

    def save(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.tk.save(os.path.join(str(out_dir), "tokenizer.json"))

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise UserError(f"{self.path}: the tokenizer has no token {token}")
        return i

    vocab_size = property(lambda self: self.tk.get_vocab_size(with_added_tokens=True))
    img_context_id = property(lambda self: self.token_to_id(IMG_CONTEXT))
    img_start_id = property(lambda self: self.token_to_id(IMG_START))
    img_end_id = property(lambda self: self.token_to_id(IMG_END))
    im_start_id = property(lambda self: self.token_to_id("<|im_start|>"))
    im_end_id = property(lambda self: self.token_to_id("<|im_end|>"))
    endoftext_id = property(lambda self: self.token_to_id("<|endoftext|>"))
    pad_id = endoftext_id  # the released pad_token (upstream's collator pads with id 0, a real "!")
    # upstream `chat` stops on <|im_end|> only; <|endoftext|> is a cheap extra guard
    stop_ids = property(lambda self: [self.im_end_id, self.endoftext_id])


def added_tokens(d: str) -> dict[int, dict]:
    """{id: {"content": ..., "special": ...}}: the added tokens a checkpoint directory declares,
    in tokenizer.json, else in added_tokens.json ({content: id}) and tokenizer_config.json
    (`added_tokens_decoder`, which also says which are special)."""
    if os.path.isfile(file := os.path.join(d, "tokenizer.json")):
        return {t["id"]: t for t in read_json(file).get("added_tokens", [])}
    out = {}
    if os.path.isfile(file := os.path.join(d, "added_tokens.json")):
        out = {i: {"content": c, "special": True} for c, i in read_json(file).items()}
    if os.path.isfile(file := os.path.join(d, "tokenizer_config.json")):
        decoder = read_json(file).get("added_tokens_decoder") or {}
        out.update({int(i): t for i, t in decoder.items()})
    return out


def _bpe_from_vocab(d: str) -> HFTokenizer:
    """The tokenizer a release's vocab.json + merges.txt + added tokens describe, built as
    transformers' Qwen2Tokenizer builds it: NFC, the split regex, byte-level BPE, added tokens."""
    files = [os.path.join(d, f) for f in ("vocab.json", "merges.txt")]
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f"{d}: no tokenizer.json, and no {os.path.basename(f)} to build the "
                            "tokenizer from (it needs vocab.json + merges.txt)")
    try:
        tk = HFTokenizer(models.BPE.from_file(*files))
    except Exception as e:  # tokenizers raises plain Exceptions
        why = str(e).splitlines()[0][:200]
        raise UserError(f"{d}: vocab.json / merges.txt are not a readable BPE ({why})")
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    for i, t in sorted(added_tokens(d).items()):  # in id order: each takes the next free id
        flags = {k: t[k] for k in ("lstrip", "rstrip", "single_word") if k in t}
        tk.add_tokens([AddedToken(t["content"], special=t.get("special", True),
                                  normalized=t.get("normalized", False), **flags)])
        if (got := tk.token_to_id(t["content"])) != i:
            raise UserError(f"{d}: added token {t['content']} has id {i} but would get {got} "
                            "(added ids must follow vocab.json's without gaps)")
    return tk


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 / Qwen2 style) with ADDED_TOKENS at ids 0..11, for the toy world
    and tests. Every UTF-8 byte is in its base alphabet: any text round-trips (Chinese too)."""
    if vocab_size < (need := len(ADDED_TOKENS) + 256):
        raise UserError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {need}")
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=ADDED_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)  # special tokens become "added" tokens: never split
    return Tokenizer(tk)


# -----------------------------------------------------------------------------
# prompts: conversation.py template internvl2_5, modeling_internvl_chat.py `chat`

def _check_images(n_tags: int, n: int):
    if n_tags != n:
        raise UserError(f"the prompt has {n_tags} {IMAGE_TAG} tags but {n} images were given")


def expand_image_tokens(text: str, num_tiles: list[int], tokens_per_tile: int) -> str:
    """Replace the k-th <image> by <img><IMG_CONTEXT>*(tokens_per_tile*num_tiles[k])</img>."""
    parts = text.split(IMAGE_TAG)  # k tags -> k+1 parts
    _check_images(len(parts) - 1, len(num_tiles))
    out = [parts[0]]
    for n, part in zip(num_tiles, parts[1:]):
        out += [IMG_START, IMG_CONTEXT * (tokens_per_tile * n), IMG_END, part]  # no newlines added
    return "".join(out)


def add_image_tags(question: str, n_images: int, history: list[tuple[str, str]] = (),
                   video: bool = False) -> str:
    """Put n images' <image> tags before a question when neither it nor its history has any:
    "<image>\\n" for one (upstream `chat`), "Image-1: <image>\\nImage-2: <image>\\n" for several,
    "Frame1: <image>\\n...FrameN: <image>\\n" for video frames (both: the InternVL3 model card)."""
    if not n_images or IMAGE_TAG in question or any(IMAGE_TAG in q for q, _ in history):
        return question
    label = "Frame{}: " if video else "Image-{}: " if n_images > 1 else ""
    return "".join(label.format(k + 1) + IMAGE_TAG + "\n" for k in range(n_images)) + question


def render_prompt(question: str, num_tiles: list[int], tokens_per_tile: int = 256,
                  history: list[tuple[str, str]] = (), system_message: str | None = None,
                  expand: bool = True) -> str:
    """The generation prompt of upstream `chat`: system (None: the template's; a checkpoint's own is
    cfg.system_message), past turns, question, assistant role. Images with no <image> tag anywhere
    go before the question (add_image_tags). Tags in history questions count too, in order.
    expand=False leaves the <image> tags in place (for display)."""
    question = add_image_tags(question, len(num_tiles), history)
    system_message = DEFAULT_SYSTEM_MESSAGE if system_message is None else system_message
    # MPT style: system + sep, then role + message + sep per message; an open turn is the bare role
    prompt = f"<|im_start|>system\n{system_message}" + SEP
    for q, a in history:
        prompt += USER + q + SEP
        prompt += (ASSISTANT + a + SEP) if a else ASSISTANT  # empty message: bare role, as upstream
    prompt += USER + question + SEP + ASSISTANT
    return expand_image_tokens(prompt, num_tiles, tokens_per_tile) if expand else prompt


# -----------------------------------------------------------------------------
# SFT tokenisation with loss masking: train/dataset.py `preprocess_internvl2_5`

def _check_conversation(conversations) -> None:
    """Raise UserError unless this is [system?] human, gpt, human, gpt, ... with string values."""
    if not isinstance(conversations, list) or not conversations:
        raise UserError("the conversation is empty" if conversations == []
                        else "'conversations' must be a list")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise UserError(f"turn {i} must be an object with 'from' and 'value'")
        if not isinstance(turn["value"], str):
            kind = type(turn["value"]).__name__
            raise UserError(f"turn {i} ('{turn['from']}'): 'value' must be a string, got {kind}")
    turns = conversations[1:] if conversations[0]["from"] == "system" else conversations
    for i, turn in enumerate(turns):
        want = ("human", "gpt")[i % 2]
        if turn["from"] != want:
            k = i + len(conversations) - len(turns)
            raise UserError(f"turn {k} is from '{turn['from']}' but '{want}' was expected: turns "
                            "must alternate human, gpt, human, gpt (after an optional system turn)")
    if len(turns) < 2:
        raise UserError("the conversation has no 'gpt' turn, so nothing to learn from")


def tokenize_conversation(tok: Tokenizer, conversations: list[dict], num_tiles: list[int],
                          tokens_per_tile: int, system_message: str | None = None
                          ) -> tuple[list[int], list[int]]:
    """One SFT sample -> (input_ids, labels), as upstream `preprocess_internvl2_5`.
    conversations: [{"from": "system"|"human"|"gpt", "value": str}, ...] (InternVL / LLaVA format).
    System: the data's own leading system turn, else `system_message`, else the template default.
    Each turn is tokenised on its own; loss falls only on each answer and its <|im_end|>."""
    _check_conversation(conversations)
    if conversations[0]["from"] == "system":
        system_message, conversations = conversations[0]["value"], conversations[1:]
    elif system_message is None:
        system_message = DEFAULT_SYSTEM_MESSAGE
    # expand <image> tags across the human turns, in order; gpt turns are left alone
    n_tags = sum(t["value"].count(IMAGE_TAG) for t in conversations if t["from"] == "human")
    _check_images(n_tags, len(num_tiles))
    n_role = len(tok.encode(ASSISTANT))  # 3 for Qwen2: <|im_start|> assistant \n
    input_ids = tok.encode(f"<|im_start|>system\n{system_message}" + SEP)
    labels, k = [IGNORE] * len(input_ids), 0
    for turn in conversations:
        if turn["from"] == "human":
            n = turn["value"].count(IMAGE_TAG)
            text = expand_image_tokens(turn["value"], num_tiles[k:k + n], tokens_per_tile)
            ids, k = tok.encode(USER + text + SEP), k + n
            labels += [IGNORE] * len(ids)
        else:  # loss on the answer + <|im_end|> (the stop), not the role prefix or the final "\n"
            ids = tok.encode(ASSISTANT + turn["value"] + SEP)
            labels += [IGNORE] * n_role + ids[n_role:-1] + [IGNORE]
        input_ids += ids
    return input_ids, labels


# -----------------------------------------------------------------------------
# grounding answers: <ref>label</ref><box>[[x1, y1, x2, y2], ...]</box>

BOX_RE = re.compile(r"(?:<ref>([^<]*)</ref>\s*)?<box>(.*?)</box>", re.S)


def parse_boxes(text: str) -> tuple[list[tuple[str, tuple[float, ...]]], list[str]]:
    """A grounding answer -> ([(label, (x1, y1, x2, y2))], problems). Coordinates are normalised
    to 0..1000 of the image, as InternVL's grounding data (upstream eval/refcoco/
    evaluate_grounding.py scales them by width/1000 and height/1000). A malformed box is described
    in `problems` and skipped, never raised: the text comes from a model."""
    boxes, problems = [], []
    for m in BOX_RE.finditer(text):
        label, body = (m.group(1) or "").strip(), m.group(2).strip()
        try:
            lists = json.loads(body)
        except ValueError:
            lists = None
        if isinstance(lists, list) and lists and not isinstance(lists[0], list):
            lists = [lists]  # one flat [x1, y1, x2, y2]
        if not isinstance(lists, list) or not lists:
            problems.append(f"{label!r}: {body[:40]!r} is not a list of [x1, y1, x2, y2]")
            continue
        for b in lists:
            if not (isinstance(b, list) and len(b) == 4 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
                problems.append(f"{label!r}: {b!r} is not four numbers [x1, y1, x2, y2]")
            elif not all(math.isfinite(v) and 0 <= v <= 1000 for v in b):
                problems.append(f"{label!r}: {b} has coordinates outside 0-1000")
            elif b[2] < b[0] or b[3] < b[1]:
                problems.append(f"{label!r}: {b} has x2 < x1 or y2 < y1")
            else:
                boxes.append((label, tuple(float(v) for v in b)))
    if (n := text.count("<box>") - text.count("</box>")) > 0:
        problems.append(f"{n} <box> without </box>")
    return boxes, problems
