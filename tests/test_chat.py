"""
Tokenizer wrapper and the internvl2_5 chat template (nanovl3/chat.py) against upstream
OpenGVLab/InternVL conversation.py and train/dataset.py `preprocess_internvl2_5`.

    python -m pytest -q tests/test_chat.py
"""

import pytest

from nanovl3.chat import (DEFAULT_SYSTEM_MESSAGE, ADDED_TOKENS, Tokenizer, add_image_tags,
                          expand_image_tokens, parse_boxes, render_prompt, tokenize_conversation,
                          train_tokenizer)
from nanovl3.common import UserError

# written out by hand from conversation.py, template internvl2_5
SYS = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、"
       "清华大学及多家合作单位联合开发的多模态大语言模型。")
CTX = "<IMG_CONTEXT>"
TEXTS = ["What colour is the circle? It is red.",
         "How many shapes are there? There are three shapes.",
         "Describe the image. A red circle and a blue square.",
         "The answer is 5.", "user", "assistant", "system"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400)


# -----------------------------------------------------------------------------
# prompts


def test_system_message_is_the_upstream_string():
    assert DEFAULT_SYSTEM_MESSAGE == SYS


def test_text_only_prompt():
    want = ("<|im_start|>system\n" + SYS + "<|im_end|>\n"
            "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert render_prompt("What is 2 + 3?", []) == want


def test_one_image_prompt():
    want = ("<|im_start|>system\n" + SYS + "<|im_end|>\n"
            "<|im_start|>user\n<img>" + CTX * 8 + "</img>\nDescribe the image.<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert render_prompt("Describe the image.", [2], tokens_per_tile=4) == want
    # unexpanded form, for display
    assert render_prompt("Describe the image.", [2], tokens_per_tile=4, expand=False) == (
        "<|im_start|>system\n" + SYS + "<|im_end|>\n"
        "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n"
        "<|im_start|>assistant\n")
    # a tag already in the question stays where it is; nothing is prepended
    assert render_prompt("Look: <image> what is it?", [1], tokens_per_tile=4, expand=False) == (
        "<|im_start|>system\n" + SYS + "<|im_end|>\n"
        "<|im_start|>user\nLook: <image> what is it?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_two_image_prompt():
    want = ("<|im_start|>system\n" + SYS + "<|im_end|>\n"
            "<|im_start|>user\nImage-1: <img>" + CTX * 4 + "</img>\n"
            "Image-2: <img>" + CTX * 12 + "</img>\nWhich image has more shapes?<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert render_prompt("Which image has more shapes?", [1, 3], tokens_per_tile=4) == want
    question = "Which image has more shapes?"
    assert render_prompt(question, [1, 3], tokens_per_tile=4, expand=False) == (
        "<|im_start|>system\n" + SYS + "<|im_end|>\n"
        "<|im_start|>user\nImage-1: <image>\nImage-2: <image>\n" + question + "<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_history_prompt():
    # the first turn's image tag lives in the history; the new question gets none (as chat() does)
    want = ("<|im_start|>system\n" + SYS + "<|im_end|>\n"
            "<|im_start|>user\n<img>" + CTX * 4 + "</img>\nWhat is it?<|im_end|>\n"
            "<|im_start|>assistant\nA circle.<|im_end|>\n"
            "<|im_start|>user\nWhat colour?<|im_end|>\n"
            "<|im_start|>assistant\n")
    history = [("<image>\nWhat is it?", "A circle.")]
    assert render_prompt("What colour?", [1], tokens_per_tile=4, history=history) == want
    # text-only history and a custom system message
    history = [("What is 1 + 1?", "2")]
    assert render_prompt("And 3 + 4?", [], history=history, system_message="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\nAnd 3 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_expand_image_tokens():
    want = "a <img>" + CTX * 2 + "</img> b <img>" + CTX * 4 + "</img>"
    assert expand_image_tokens("a <image> b <image>", [1, 2], 2) == want
    assert expand_image_tokens("no images", [], 256) == "no images"
    with pytest.raises(UserError, match="2 <image> tags but 1 images"):
        expand_image_tokens("<image> and <image>", [3], 4)
    with pytest.raises(UserError, match="0 <image> tags but 2 images"):
        expand_image_tokens("nothing", [1, 1], 4)
    with pytest.raises(UserError, match="2 <image> tags but 1 images"):
        render_prompt("<image> and <image>?", [1])


# -----------------------------------------------------------------------------
# tokenizer


def test_round_trip_and_special_tokens(tok):
    assert [tok.token_to_id(t) for t in ADDED_TOKENS] == list(range(len(ADDED_TOKENS)))
    for text in [SYS, "What colour is the circle?", "unseen: Zebra ü ß 🙂 \t\n  x",
                 "<|im_start|>user\nhi<|im_end|>\n"]:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
    for t in ADDED_TOKENS:
        assert tok.encode(t) == [tok.token_to_id(t)]  # one id, never split
        assert tok.encode("x" + t + "y")[1] == tok.token_to_id(t)  # and never merged with others
    prompt = render_prompt("Describe the image.", [2], tokens_per_tile=4)
    ids = tok.encode(prompt)
    assert ids.count(tok.img_context_id) == 8
    assert ids.count(tok.img_start_id) == ids.count(tok.img_end_id) == 1
    plain = tok.decode(ids, skip_special_tokens=False)
    for special in ("<|im_start|>", "<|im_end|>", "<img>", "</img>", CTX):
        plain = plain.replace(special, "")
    assert tok.decode(ids) == plain


def test_tokenizer_ids_and_io(tok, tmp_path):
    assert tok.stop_ids == [tok.im_end_id, tok.endoftext_id] == [2, 0]
    assert tok.pad_id == tok.endoftext_id == 0 and tok.im_start_id == 1
    assert len(ADDED_TOKENS) + 256 < tok.vocab_size <= 400  # BPE stops early, out of pairs
    tok.save(tmp_path / "ckpt")
    for path in [tmp_path / "ckpt", tmp_path / "ckpt" / "tokenizer.json"]:
        again = Tokenizer.from_dir(path)
        assert again.encode(SYS + " The answer is 5.") == tok.encode(SYS + " The answer is 5.")
    with pytest.raises(UserError, match="<nope>"):
        tok.token_to_id("<nope>")
    with pytest.raises(UserError, match="missing"):
        Tokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="bad"):
        Tokenizer.from_dir(tmp_path / "bad")
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(TEXTS, vocab_size=100)


# -----------------------------------------------------------------------------
# SFT tokenisation and loss masking (dataset.py `preprocess_internvl2_5`)


def supervised_runs(ids, labels):
    """Split the positions with a label into contiguous runs -> list of id lists."""
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert l == i  # labels are the input ids themselves (the model shifts)
            cur.append(l)
    return runs + ([cur] if cur else [])


CONV = [
    {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nHow many shapes?"},
    {"from": "gpt", "value": "There are three shapes."},
    {"from": "human", "value": "<image>\nAnd here?"},
    {"from": "gpt", "value": "The answer is 5."},
    {"from": "human", "value": "What colour is the circle?"},
    {"from": "gpt", "value": "It is red."},
]


def test_loss_mask_multi_turn(tok):
    ids, labels = tokenize_conversation(tok, CONV, num_tiles=[1, 2, 3], tokens_per_tile=4)
    assert len(ids) == len(labels)
    runs = supervised_runs(ids, labels)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == [
        "There are three shapes.<|im_end|>", "The answer is 5.<|im_end|>", "It is red.<|im_end|>"]
    # the whole sequence is the template text, image tags expanded in order across human turns
    want = ("<|im_start|>system\n" + SYS + "<|im_end|>\n"
            "<|im_start|>user\nImage-1: <img>" + CTX * 4 + "</img>\n"
            "Image-2: <img>" + CTX * 8 + "</img>\nHow many shapes?<|im_end|>\n"
            "<|im_start|>assistant\nThere are three shapes.<|im_end|>\n"
            "<|im_start|>user\n<img>" + CTX * 12 + "</img>\nAnd here?<|im_end|>\n"
            "<|im_start|>assistant\nThe answer is 5.<|im_end|>\n"
            "<|im_start|>user\nWhat colour is the circle?<|im_end|>\n"
            "<|im_start|>assistant\nIt is red.<|im_end|>\n")
    assert tok.decode(ids, skip_special_tokens=False) == want
    # image, system and user tokens never carry a label
    assert ids.count(tok.img_context_id) == 24
    image_ids = (tok.img_context_id, tok.img_start_id, tok.img_end_id)
    assert all(l == -100 for i, l in zip(ids, labels) if i in image_ids)
    assert sum(l != -100 for l in labels) == sum(len(r) for r in runs)
    assert labels[-1] == -100  # the trailing "\n"


def test_system_override(tok):
    conv = [{"from": "system", "value": "You are a shape counter."}] + CONV[4:]
    ids, labels = tokenize_conversation(tok, conv, [], 4)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a shape counter.<|im_end|>\n"
                           "<|im_start|>user\n")
    assert SYS not in text
    runs = supervised_runs(ids, labels)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == ["It is red.<|im_end|>"]
    ids2, _ = tokenize_conversation(tok, CONV[4:], [], 4, system_message="You are a shape counter.")
    assert ids2 == ids
    ids3, _ = tokenize_conversation(tok, CONV[4:], [], 4)
    text3 = tok.decode(ids3, skip_special_tokens=False)
    assert text3.startswith("<|im_start|>system\n" + SYS + "<|im_end|>\n")


@pytest.mark.parametrize("conv,tiles,msg", [
    ([], [], "empty"),
    ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "hi"}], [], "alternate"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
      {"from": "gpt", "value": "c"}], [], "alternate"),
    ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], [], "alternate"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": None}], [], "string"),
    ([{"from": "human", "value": ["a"]}, {"from": "gpt", "value": "b"}], [], "string"),
    ([{"from": "human", "value": "a"}], [], "no 'gpt' turn"),
    ([{"from": "system", "value": "s"}, {"from": "human", "value": "a"}], [], "no 'gpt' turn"),
    ([{"from": "human"}, {"from": "gpt", "value": "b"}], [], "'from' and 'value'"),
    ("not a list", [], "list"),
    ([{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "b"}], [1, 1],
     "1 <image> tags but 2 images"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>"}], [1],
     "0 <image> tags but 1 images"),
])
def test_bad_conversations(tok, conv, tiles, msg):
    with pytest.raises(UserError, match=msg):
        tokenize_conversation(tok, conv, tiles, 4)


# -----------------------------------------------------------------------------
# image tags for several images and video frames; grounding answers


def test_add_image_tags():
    # the InternVL3 model card: "Frame1: <image>\n" per frame (no hyphen), images "Image-1: "
    assert add_image_tags("What?", 3, video=True) == \
        "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat?"
    assert add_image_tags("What?", 2) == "Image-1: <image>\nImage-2: <image>\nWhat?"
    assert add_image_tags("What?", 1) == add_image_tags("What?", 1, video=False) == "<image>\nWhat?"
    assert add_image_tags("What?", 0) == "What?"
    assert add_image_tags("Is <image> red?", 1, video=True) == "Is <image> red?"  # placed by user
    # later turns: the tags already sit in the history's first question
    assert add_image_tags("And?", 1, history=[("<image>\nWhat?", "red")]) == "And?"


def test_parse_boxes_well_formed():
    text = ("There are <ref>two cats</ref><box>[[10, 20, 300, 400], [500.5, 0, 1000, 1000]]</box>"
            " and <ref>a dog</ref> <box>[[0, 0, 0, 0]]</box>, then <box>[[1, 2, 3, 4]]</box>.")
    boxes, problems = parse_boxes(text)
    assert problems == []
    assert boxes == [("two cats", (10, 20, 300, 400)), ("two cats", (500.5, 0, 1000, 1000)),
                     ("a dog", (0, 0, 0, 0)), ("", (1, 2, 3, 4))]
    assert parse_boxes("no grounding here <ref>x</ref>") == ([], [])


@pytest.mark.parametrize("box,why", [
    ("[[10, 20, 1200, 400]]", "outside 0-1000"),
    ("[[-1, 20, 100, 400]]", "outside 0-1000"),
    ("[[10, 20, 300]]", "not four numbers"),
    ("[[10, 20, \"a\", 400]]", "not four numbers"),
    ("[[300, 20, 10, 400]]", "x2 < x1"),
    ("10, 20, 300, 400", "not a list"),
    ("[[10, 20, 300, 400]", "not a list"),
    ("[]", "not a list"),
])
def test_parse_boxes_malformed_is_reported(box, why):
    text = f"<ref>bad</ref><box>{box}</box> <ref>good</ref><box>[[1, 2, 3, 4]]</box>"
    boxes, problems = parse_boxes(text)
    assert boxes == [("good", (1, 2, 3, 4))]  # the good box survives its bad neighbour
    assert len(problems) == 1 and why in problems[0] and "'bad'" in problems[0]


def test_parse_boxes_unclosed():
    text = "<ref>cat</ref><box>[[1, 2, 3, 4]]</box><ref>dog</ref><box>[[5, 6"
    boxes, problems = parse_boxes(text)
    assert boxes == [("cat", (1, 2, 3, 4))] and problems == ["1 <box> without </box>"]
