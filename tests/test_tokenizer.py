"""
Tokenizer files as releases ship them: tokenizer.json, or vocab.json + merges.txt + the added
tokens of tokenizer_config.json / added_tokens.json, from which Tokenizer.from_dir builds the same
tokenizer.

    python -m pytest -q tests/test_tokenizer.py

The release here is small but built like Qwen2.5's: a byte-level BPE trained with the tokenizers
library behind Qwen2's NFC normaliser and split regex, then the Qwen2.5 + InternVL added tokens
(some of them, like <tool_call>, not special), saved the way transformers saves it.
"""

import json
import os
import shutil

import pytest
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from nanovl3.chat import ADDED_TOKENS, Tokenizer
from nanovl3.checkpoint import _tokenizer_image_token_id
from nanovl3.common import UserError

# transformers' tokenization_qwen2.py PRETOKENIZE_REGEX, restated so the test does not check the
# code against itself
SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
         r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2.5's added tokens in id order (<tool_call>... are not special), then InternVL's
QWEN25 = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
          "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
          "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
          "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
          "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
PLAIN_ADDED = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
ADDED = QWEN25 + [t for t in ADDED_TOKENS if t not in QWEN25]
TRAIN = ["The quick brown fox jumps over the lazy dog. It's 2025; we've 3.14159 reasons.",
         "你是书生·万象，英文名是InternVL，"
         "是由上海人工智能实验室开发的多模态大语言模型。",
         "def f(x):\n    return x ** 2  # squares\n\n\nprint(f(12))", "naïve café résumé 🙂👍🏽"] * 20
CORPUS = [
    "Hello, world! I'm here; they'll see. DON'T SHOUT.",
    "图中有三个红色的圆形和两个蓝色的正方形。书生·万象",
    "emoji: 🙂👍🏽👨‍👩‍👧 🇫🇷 and ZWJ runs",
    "numbers 1234567890, 3.14159, -42, 1e-6, 2,048 tokens",
    "tabs\tand   three spaces,\n\n\nnewline runs\r\n and trailing spaces   ",
    "    leading indent\n\tx = [1, 2, 3]  # comment",
    "decomposed e\u0301 vs composed \u00e9 (NFC), full-width ＡＢＣ",
    "".join(ADDED) + " then " + " ".join(ADDED),
    "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
    "<img>" + "<IMG_CONTEXT>" * 5 + "</img><ref>cat</ref><box>[[1, 2, 3, 4]]</box><quad>q</quad>",
    "<tool_call>{\"name\": \"f\"}</tool_call><|endoftext|>",
    "",
]


def write_release(d):
    """A release's tokenizer files: tokenizer.json, vocab.json, merges.txt, added_tokens.json,
    tokenizer_config.json (with added_tokens_decoder)."""
    tk = HFTokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TRAIN, trainers.BpeTrainer(
        vocab_size=500, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    base = tk.get_vocab_size()
    tk.add_tokens([AddedToken(t, special=t not in PLAIN_ADDED, normalized=False) for t in ADDED])
    os.makedirs(d, exist_ok=True)
    tk.save(os.path.join(d, "tokenizer.json"))
    tk.model.save(str(d))  # vocab.json (base vocabulary only) + merges.txt ("#version" header)
    ids = {t: base + i for i, t in enumerate(ADDED)}
    with open(os.path.join(d, "added_tokens.json"), "w") as f:
        json.dump(ids, f, ensure_ascii=False, indent=2)
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": t not in PLAIN_ADDED}
               for t, i in ids.items()}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": decoder, "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "model_max_length": 12288}, f, indent=2)
    return ids


def mismatches(a: Tokenizer, b: Tokenizer) -> list[str]:
    """Corpus texts on which a and b differ: ids, or decodes with or without special tokens."""
    bad = []
    for text in CORPUS:
        ids = a.encode(text)
        if (ids != b.encode(text) or a.decode(ids) != b.decode(ids)
                or a.decode(ids, skip_special_tokens=False) != b.decode(ids, False)):
            bad.append(text)
    return bad


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    full = tmp_path_factory.mktemp("tok") / "full"
    ids = write_release(full)
    bare = full.parent / "bare"
    shutil.copytree(full, bare)
    os.remove(bare / "tokenizer.json")
    return full, bare, ids


def test_files_give_the_same_tokenizer_as_tokenizer_json(release):
    full, bare, ids = release
    a, b = Tokenizer.from_dir(full), Tokenizer.from_dir(bare)
    assert a.path.endswith("tokenizer.json") and not b.path.endswith("tokenizer.json")
    assert mismatches(a, b) == []
    assert a.vocab_size == b.vocab_size
    for t, i in ids.items():  # every added token, at its id, one token and never split
        assert a.token_to_id(t) == b.token_to_id(t) == i
        assert b.encode(t) == [i]
    # the corpus really exercises the BPE and the byte-level round trip
    assert len(b.encode(CORPUS[1])) > 5 and b.decode(b.encode(CORPUS[2])) == CORPUS[2]
    assert b.decode(b.encode("<tool_call>x<|im_end|>")) == "<tool_call>x"  # not special: kept


def test_only_added_tokens_json_still_works(release, tmp_path):
    _, bare, _ = release
    shutil.copytree(bare, tmp_path / "d")
    os.remove(tmp_path / "d" / "tokenizer_config.json")
    b = Tokenizer.from_dir(tmp_path / "d")
    assert b.img_context_id == release[2]["<IMG_CONTEXT>"]
    assert b.encode("<|im_end|><box>") == [release[2]["<|im_end|>"], release[2]["<box>"]]


def test_a_missing_added_token_is_caught(release, tmp_path):
    full, bare, _ = release
    d = tmp_path / "d"
    shutil.copytree(bare, d)
    for name in ("added_tokens.json", "tokenizer_config.json"):  # drop the last one, </box>
        cfg = json.loads((d / name).read_text())
        table = cfg["added_tokens_decoder"] if name == "tokenizer_config.json" else cfg
        table.pop(max(table, key=lambda k: int(k)) if name == "tokenizer_config.json" else "</box>")
        (d / name).write_text(json.dumps(cfg))
    assert mismatches(Tokenizer.from_dir(full), Tokenizer.from_dir(d)) != []


def test_image_token_id_read_from_either_kind_of_files(release):
    full, bare, ids = release
    assert _tokenizer_image_token_id(str(full)) == _tokenizer_image_token_id(str(bare)) \
        == ids["<IMG_CONTEXT>"]


@pytest.mark.parametrize("drop,msg", [("merges.txt", "no merges.txt"),
                                      ("vocab.json", "no vocab.json")])
def test_missing_file_is_one_clear_line(release, tmp_path, drop, msg):
    _, bare, _ = release
    shutil.copytree(bare, tmp_path / "d")
    os.remove(tmp_path / "d" / drop)
    with pytest.raises(UserError, match=msg) as e:
        Tokenizer.from_dir(tmp_path / "d")
    assert "\n" not in str(e.value) and "tokenizer.json" in str(e.value)


def test_gap_in_added_ids_is_an_error(release, tmp_path):
    _, bare, ids = release
    shutil.copytree(bare, tmp_path / "d")
    os.remove(tmp_path / "d" / "tokenizer_config.json")
    (tmp_path / "d" / "added_tokens.json").write_text(json.dumps({"<img>": ids["<img>"] + 5}))
    with pytest.raises(UserError, match="added token <img> has id"):
        Tokenizer.from_dir(tmp_path / "d")
