"""
Tokenizer and chat template: the `internvl2_5` template of InternVL3 (SPEC §2.7, §4).

    tok = Tokenizer.from_dir("InternVL3-1B")                       # the checkpoint's tokenizer.json
    prompt = render_prompt("Describe the image.", num_tiles=[13])  # generation prompt, images expanded
    ids = tok.encode(prompt)
    ids, labels = tokenize_conversation(tok, conversations, [13], 256)   # SFT: labels -100 outside answers

The template ("MPT" separator style, SPEC §4.1), shown with real newlines:

    <|im_start|>system
    {system_message}<|im_end|>
    <|im_start|>user
    <image>
    {question}<|im_end|>
    <|im_start|>assistant
    {answer}<|im_end|>

and each `<image>` becomes `<img>` + `<IMG_CONTEXT>` × (256 · tiles) + `</img>` (SPEC §4.2); the model writes the
image features over the `<IMG_CONTEXT>` embeddings.
References: InternVL2.5 (arXiv 2412.05271); upstream OpenGVLab/InternVL internvl_chat/internvl/conversation.py
(template internvl2_5), model/internvl_chat/modeling_internvl_chat.py (chat), train/dataset.py (preprocess_internvl2_5).
Tests: python -m pytest -q tests/test_chat.py
"""

import os
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanovl3.common import UserError

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IMAGE_TAG = "<image>"  # the placeholder users and data files write; never a token itself
DEFAULT_SYSTEM_MESSAGE = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                          "多模态大语言模型。")
# the special tokens every nanovl3 tokenizer carries (Qwen2.5's chat tokens + InternVL's, SPEC §4.4);
# train_tokenizer gives them ids 0..11 in this order
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT,
                  "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
SEP = "<|im_end|>\n"
USER = "<|im_start|>user\n"
ASSISTANT = "<|im_start|>assistant\n"
IGNORE = -100  # label of a token without loss

# -----------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """A thin wrapper over a `tokenizers` tokenizer.json: no BOS, no EOS, special tokens never split (SPEC §2.7)."""

    def __init__(self, tk: HFTokenizer, path: str = "<in memory>"):
        self.tk, self.path = tk, path

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """A checkpoint directory holding tokenizer.json, or the path of the tokenizer.json file itself."""
        path = str(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise UserError(f"{file}: tokenizer file not found")
        try:
            tk = HFTokenizer.from_file(file)
        except Exception as e:  # tokenizers raises plain Exceptions for bad JSON / unknown models
            raise UserError(f"{file}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})")
        return cls(tk, file)

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

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    img_context_id = property(lambda self: self.token_to_id(IMG_CONTEXT))
    img_start_id = property(lambda self: self.token_to_id(IMG_START))
    img_end_id = property(lambda self: self.token_to_id(IMG_END))
    im_start_id = property(lambda self: self.token_to_id("<|im_start|>"))
    im_end_id = property(lambda self: self.token_to_id("<|im_end|>"))
    endoftext_id = property(lambda self: self.token_to_id("<|endoftext|>"))
    pad_id = endoftext_id  # Qwen2's pad token (SPEC §2.7); never id 0 of the real vocab ("!", SPEC §4.5)

    @property
    def stop_ids(self) -> list[int]:
        # the original chat() stops on <|im_end|> only; <|endoftext|> is a cheap extra guard (SPEC §2.7)
        return [self.im_end_id, self.endoftext_id]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A small byte-level BPE (GPT-2 / Qwen2 style) with SPECIAL_TOKENS at ids 0..11, for the toy world and tests.

    Byte-level means every UTF-8 byte is in the base alphabet, so any text (the Chinese system message too)
    round-trips even if the training texts never contained it.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise UserError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {len(SPECIAL_TOKENS) + 256}")
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)  # special tokens become "added" tokens: matched whole, never split
    return Tokenizer(tk)


# -----------------------------------------------------------------------------
# prompts (SPEC §4.1 - §4.3)


def expand_image_tokens(text: str, num_tiles: list[int], tokens_per_tile: int) -> str:
    """Replace the k-th <image> by <img><IMG_CONTEXT>*(tokens_per_tile*num_tiles[k])</img> (SPEC §4.2)."""
    parts = text.split(IMAGE_TAG)  # k tags -> k+1 parts
    if len(parts) - 1 != len(num_tiles):
        raise UserError(f"the prompt has {len(parts) - 1} {IMAGE_TAG} tags but {len(num_tiles)} images were given")
    out = [parts[0]]
    for n, part in zip(num_tiles, parts[1:]):
        out += [IMG_START, IMG_CONTEXT * (tokens_per_tile * n), IMG_END, part]  # no newlines added
    return "".join(out)


def render_prompt(question: str, num_tiles: list[int], tokens_per_tile: int = 256,
                  history: list[tuple[str, str]] = (), system_message: str = DEFAULT_SYSTEM_MESSAGE,
                  expand: bool = True) -> str:
    """The generation prompt of the original `chat()`: system, past turns, the question, then the assistant role.

    Images with no <image> tag anywhere go before the question: "<image>\\n" for one image (as chat() does),
    "Image-1: <image>\\nImage-2: <image>\\n" for several (the model card's multi-image convention, SPEC §4.3).
    Tags in history questions count too, in order, as in chat() where the whole prompt is expanded at once.
    expand=False returns the prompt with <image> tags left in place (for display).
    """
    if num_tiles and not any(IMAGE_TAG in q for q, _ in history) and IMAGE_TAG not in question:
        if len(num_tiles) == 1:
            question = IMAGE_TAG + "\n" + question
        else:
            question = "".join(f"Image-{k + 1}: {IMAGE_TAG}\n" for k in range(len(num_tiles))) + question
    # MPT separator style: system + sep, then role + message + sep per message; the open assistant turn is
    # the bare role (generation starts right after "<|im_start|>assistant\n")
    prompt = f"<|im_start|>system\n{system_message}" + SEP
    for q, a in history:
        prompt += USER + q + SEP
        prompt += (ASSISTANT + a + SEP) if a else ASSISTANT  # an empty message is the bare role, as upstream
    prompt += USER + question + SEP + ASSISTANT
    return expand_image_tokens(prompt, num_tiles, tokens_per_tile) if expand else prompt


# -----------------------------------------------------------------------------
# SFT tokenisation with loss masking (SPEC §4.5)


def _check_conversation(conversations) -> None:
    """Raise UserError unless this is [system?] human, gpt, human, gpt, ... with string values and a gpt turn."""
    if not isinstance(conversations, list) or not conversations:
        raise UserError("the conversation is empty" if conversations == [] else "'conversations' must be a list")
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
            raise UserError(f"turn {i + len(conversations) - len(turns)} is from '{turn['from']}' but '{want}' was "
                            "expected: turns must alternate human, gpt, human, gpt (after an optional system turn)")
    if len(turns) < 2:
        raise UserError("the conversation has no 'gpt' turn, so nothing to learn from")


def tokenize_conversation(tok: Tokenizer, conversations: list[dict], num_tiles: list[int], tokens_per_tile: int,
                          system_message: str | None = None) -> tuple[list[int], list[int]]:
    """One SFT sample -> (input_ids, labels), as upstream preprocess_internvl2_5 (SPEC §4.5).

    conversations: [{"from": "system"|"human"|"gpt", "value": str}, ...] (the InternVL / LLaVA data format).
    System: the data's own leading system turn, else `system_message`, else the template default.
    Every segment is tokenised on its own and concatenated; loss falls only on each answer and its <|im_end|>.
    """
    _check_conversation(conversations)
    if conversations[0]["from"] == "system":
        system_message, conversations = conversations[0]["value"], conversations[1:]
    elif system_message is None:
        system_message = DEFAULT_SYSTEM_MESSAGE

    # expand <image> tags across the human turns, in order; gpt turns are left alone
    n_tags = sum(t["value"].count(IMAGE_TAG) for t in conversations if t["from"] == "human")
    if n_tags != len(num_tiles):
        raise UserError(f"the prompt has {n_tags} {IMAGE_TAG} tags but {len(num_tiles)} images were given")
    segments = [(f"<|im_start|>system\n{system_message}" + SEP, False)]  # (text, is_answer)
    k = 0
    for turn in conversations:
        if turn["from"] == "human":
            n = turn["value"].count(IMAGE_TAG)
            segments.append((USER + expand_image_tokens(turn["value"], num_tiles[k:k + n], tokens_per_tile) + SEP,
                             False))
            k += n
        else:
            segments.append((ASSISTANT + turn["value"] + SEP, True))

    n_role = len(tok.encode(ASSISTANT))  # 3 for Qwen2: <|im_start|> assistant \n
    input_ids, labels = [], []
    for text, is_answer in segments:
        ids = tok.encode(text)
        input_ids += ids
        if is_answer:
            # mask the role prefix and the trailing "\n": loss on the answer + <|im_end|> (the stop token)
            labels += [IGNORE] * n_role + ids[n_role:-1] + [IGNORE]
        else:
            labels += [IGNORE] * len(ids)
    return input_ids, labels
