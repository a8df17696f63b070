"""
sample.py end to end on a small saved checkpoint with its own tokenizer.json; bad input handling.

    python -m pytest -q tests/test_sample.py
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from nanovl3.chat import Tokenizer, render_prompt, train_tokenizer
from nanovl3.config import preset
from nanovl3.generate import generate
from nanovl3.image import load_image, preprocess_image
from nanovl3.model import InternVL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["What colour is the circle? It is red.",
         "How many shapes are there? There are three shapes.", "The answer is 5.",
         "a blue square and a green star"] * 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    tok = train_tokenizer(TEXTS, vocab_size=300)
    cfg = preset("toy")
    cfg.text.vocab_size = tok.vocab_size
    cfg.image_token_id = tok.img_context_id
    torch.manual_seed(0)
    model = InternVL(cfg)
    model.init_weights(std=0.3)
    model.save_pretrained(root / "ckpt", tokenizer=tok)
    Image.new("RGB", (300, 200), (200, 30, 30)).save(root / "red.png")
    return root


def run(*args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, input=stdin)


def test_stdout_is_only_the_response(ckpt):
    r = run("--ckpt", ckpt / "ckpt", "--image", ckpt / "red.png", "--prompt", "What colour is it?",
            "--max-new-tokens", 12, "--show-prompt")
    assert r.returncode == 0, r.stderr
    # the same answer computed in-process
    model = InternVL.from_pretrained(ckpt / "ckpt")
    tok = Tokenizer.from_dir(ckpt / "ckpt")
    pix = load_image(ckpt / "red.png", max_num=model.cfg.max_dynamic_patch,
                     image_size=model.cfg.vision.image_size)
    ids = tok.encode(render_prompt("What colour is it?", [pix.size(0)], model.cfg.num_image_token))
    new = generate(model, [ids], pix, max_new_tokens=12, stop_ids=tok.stop_ids)[0]
    assert r.stdout == tok.decode(new) + "\n"
    # --show-prompt goes to stderr
    assert "<|im_start|>assistant" in r.stderr and "<|im_start|>" not in r.stdout
    assert "tokens/s" in r.stderr


@pytest.mark.slow
def test_text_only_prompt(ckpt):
    r = run("--ckpt", ckpt / "ckpt", "--prompt", "How many shapes?", "--max-new-tokens", 5,
            "--temperature", 0.8, "--top-p", 0.9, "--top-k", 20, "--seed", 3)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")


def bad_checkpoints(ckpt, tmp):
    good = ckpt / "ckpt"
    out = {}
    out["missing dir"] = (tmp / "nope", "does not exist")
    (tmp / "empty").mkdir()
    out["empty dir"] = (tmp / "empty", "no config.json")
    for name, mutate, msg in [
        ("corrupt", lambda p: p.write_bytes(b"\x00garbage" * 10), "corrupt or truncated"),
        ("truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
         "corrupt or truncated"),
    ]:
        d = tmp / name
        shutil.copytree(good, d)
        mutate(d / "model.safetensors")
        out[name] = (d, msg)
    d = tmp / "internlm"
    shutil.copytree(good, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    cfg["llm_config"]["model_type"] = "internlm2"
    (d / "config.json").write_text(json.dumps(cfg))
    out["unsupported llm"] = (d, "InternLM2ForCausalLM (model_type 'internlm2'); nanovl3 supports")
    for name, change, msg in [
        ("config a list", lambda c: [c], "config.json: expected a JSON object, got [{"),
        ("vision_config a string", lambda c: {**c, "vision_config": "InternViT"},
         'config.json: vision_config = "InternViT": expected a JSON object'),
        ("hidden_size a string", lambda c: {**c, "llm_config": {**c["llm_config"],
                                                                "hidden_size": "big"}},
         'config.json: llm_config.hidden_size = "big": expected an integer'),
    ]:
        shutil.copytree(good, d := tmp / name.replace(" ", "_"))
        (d / "config.json").write_text(json.dumps(change(json.loads(
            (good / "config.json").read_text()))))
        out[name] = (d, msg)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing dir", "empty dir", "corrupt", "truncated",
                                  "unsupported llm", "config a list", "vision_config a string",
                                  "hidden_size a string"])
def test_bad_checkpoint(ckpt, tmp_path, case):
    path, msg = bad_checkpoints(ckpt, tmp_path)[case]
    r = run("--ckpt", path, "--prompt", "hi")
    assert_one_line_error(r, msg)


@pytest.mark.slow
def test_bad_images_and_prompts(ckpt, tmp_path):
    (tmp_path / "notimage.png").write_text("this is not an image")
    data = (ckpt / "red.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    good = ckpt / "ckpt"
    cases = [
        (["--image", tmp_path / "notimage.png"], "notimage.png"),
        (["--image", tmp_path / "truncated.png"], "truncated.png"),
        (["--image", tmp_path / "missing.png"], "missing.png"),
        (["--image", ckpt / "red.png", "--prompt", "<image> and <image>?"],
         "2 <image> tags but 1 images"),
        (["--max-new-tokens", 5000], "prompt too long"),
    ]
    for extra, msg in cases:
        argv = ["--ckpt", good, "--prompt", "hi"] + extra
        assert_one_line_error(run(*argv), msg)


def assert_one_line_error(r, msg):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith("error:") and msg in lines[-1], r.stderr
    assert sum(line.startswith("error:") for line in lines) == 1


# -----------------------------------------------------------------------------
# Best-of-N


def best_of_expected(ckpt, prompt, critic_spec, n=4, max_new_tokens=8):
    """What sample.py --best-of n should print, computed in-process (seed 0, temperature 1)."""
    from nanovl3.critic import best_of_n, load_critic, score_responses
    model = InternVL.from_pretrained(ckpt / "ckpt")
    tok = Tokenizer.from_dir(ckpt / "ckpt")
    pix = load_image(ckpt / "red.png", max_num=model.cfg.max_dynamic_patch,
                     image_size=model.cfg.vision.image_size)
    ids = tok.encode(render_prompt(prompt, [pix.size(0)], model.cfg.num_image_token))
    rows = generate(model, [ids], pix, max_new_tokens=max_new_tokens, temperature=1.0,
                    stop_ids=tok.stop_ids, num_samples=n)
    answers = [tok.decode(r) for r in rows]
    # no <image> tag: render_prompt puts the one image first, and so does the critic's question
    scores = score_responses(load_critic(critic_spec), "<image>\n" + prompt, answers, pix,
                             [pix.size(0)])
    return answers, scores, best_of_n(scores)


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["majority", "prm", "outcome", "vote"])
def test_best_of(ckpt, critic):
    spec = {"majority": "majority", "prm": str(ckpt / "ckpt"),
            "outcome": f"outcome:{ckpt / 'ckpt'}", "vote": f"vote:{ckpt / 'ckpt'}"}[critic]
    r = run("--ckpt", ckpt / "ckpt", "--image", ckpt / "red.png", "--prompt", "What colour is it?",
            "--max-new-tokens", 8, "--best-of", 4, "--temperature", 1, "--critic", spec,
            "--show-scores")
    assert r.returncode == 0, r.stderr
    answers, scores, best = best_of_expected(ckpt, "What colour is it?", spec)
    assert r.stdout == answers[best] + "\n"  # only the chosen answer on stdout
    listed = [line for line in r.stderr.splitlines() if "candidate" in line and "score" in line]
    assert len(listed) == 4
    for i, line in enumerate(listed):
        assert (f"candidate {i}: score {scores[i]:.4f}" in line
                and line.startswith("*" if i == best else " "))


@pytest.mark.slow
def test_best_of_errors(ckpt, tmp_path):
    good = ckpt / "ckpt"
    assert_one_line_error(run("--ckpt", good, "--prompt", "hi", "--best-of", 4),
                          "--best-of 4 needs --temperature > 0")
    assert_one_line_error(run("--ckpt", good, "--prompt", "hi", "--best-of", 0),
                          "--best-of 0: must be an integer >= 1")
    assert_one_line_error(run("--ckpt", good, "--prompt", "hi", "--best-of", 2, "--temperature", 1,
                              "--critic", tmp_path / "no-prm"), "does not exist")


# -----------------------------------------------------------------------------
# multi-turn chat, video, grounding boxes


def answer(model, tok, prompt, pix, n=12):
    """Upstream `chat`'s answer for one rendered prompt: decoded, stripped."""
    return tok.decode(generate(model, [tok.encode(prompt)], pix, max_new_tokens=n,
                               stop_ids=tok.stop_ids)[0]).strip()


def test_chat_answers_one_line_per_turn(ckpt):
    questions = ["What colour is it?", "How many shapes are there?"]
    r = run("--ckpt", ckpt / "ckpt", "--image", ckpt / "red.png", "--chat", "--max-new-tokens", 12,
            stdin="".join(q + "\n" for q in questions))
    assert r.returncode == 0, r.stderr
    # the same conversation rendered by hand: turn 2 holds turn 1's stripped answer
    model = InternVL.from_pretrained(ckpt / "ckpt")
    tok = Tokenizer.from_dir(ckpt / "ckpt")
    T = model.cfg.num_image_token
    pix = load_image(ckpt / "red.png", max_num=model.cfg.max_dynamic_patch,
                     image_size=model.cfg.vision.image_size)
    n = [pix.size(0)]
    a1 = answer(model, tok, render_prompt(questions[0], n, T), pix)
    a2 = answer(model, tok, render_prompt(questions[1], n, T, [("<image>\n" + questions[0], a1)]),
                pix)
    assert r.stdout == a1 + "\n" + a2 + "\n"
    # stdin is a pipe: no prompt marker or timings anywhere
    assert "> " not in r.stderr and "tokens in" not in r.stderr


def test_video_frames_and_show_prompt(ckpt, tmp_path):
    frames = [Image.new("RGB", (60, 40), (20 * k, 240 - 20 * k, 90)) for k in range(12)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=50)
    r = run("--ckpt", ckpt / "ckpt", "--video", tmp_path / "clip.gif", "--num-frames", 5,
            "--prompt", "What happens?", "--max-new-tokens", 8, "--show-prompt")
    assert r.returncode == 0, r.stderr
    assert "12 frames -> frames [1, 3, 5, 8, 10]" in r.stderr  # get_index: seg 11/5
    model = InternVL.from_pretrained(ckpt / "ckpt")
    tok = Tokenizer.from_dir(ckpt / "ckpt")
    S = model.cfg.vision.image_size  # the checkpoint's tile size (112), not 448
    pix = torch.cat([preprocess_image(frames[k], max_num=1, image_size=S)
                     for k in [1, 3, 5, 8, 10]])
    question = "".join(f"Frame{i}: <image>\n" for i in range(1, 6)) + "What happens?"
    ids = tok.encode(render_prompt(question, [1] * 5, model.cfg.num_image_token))
    assert question in r.stderr
    assert r.stdout == tok.decode(generate(model, [ids], pix, max_new_tokens=8,
                                           stop_ids=tok.stop_ids)[0]) + "\n"


@pytest.mark.slow
def test_draw_boxes_writes_the_picture(ckpt, tmp_path):
    out = tmp_path / "sub" / "boxes.png"
    r = run("--ckpt", ckpt / "ckpt", "--image", ckpt / "red.png", "--prompt", "Where?",
            "--max-new-tokens", 4, "--draw-boxes", out)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (300, 200) and f"-> {out}" in r.stderr
    assert os.listdir(out.parent) == ["boxes.png"]  # no temporary file left behind


@pytest.mark.slow
def test_chat_video_and_box_errors(ckpt, tmp_path):
    good, red = ckpt / "ckpt", ckpt / "red.png"
    (tmp_path / "empty").mkdir()
    frames = [Image.new("RGB", (60, 40), (k, k, k)) for k in range(3)]
    frames[0].save(tmp_path / "short.gif", save_all=True, append_images=frames[1:])
    cases = [
        (["--chat", "--best-of", 2, "--temperature", 1], "cannot be combined with --best-of"),
        (["--chat", "--prompt", "hi"], "--chat reads the questions from stdin"),
        ([], "--prompt is required"),
        (["--video", red, "--prompt", "hi"], "a still image, not a video"),
        (["--video", tmp_path / "empty", "--prompt", "hi"], "no image files in this directory"),
        (["--video", tmp_path / "short.gif", "--num-frames", 0, "--prompt", "hi"],
         "--num-frames 0: must be at least 1"),
        # 16 tokens a frame: 300 frames (repeats of 3) do not fit the toy context of 4,096
        (["--video", tmp_path / "short.gif", "--num-frames", 300, "--prompt", "hi"],
         "do not fit the model's context of 4096"),
        (["--video", tmp_path / "short.gif", "--num-frames", 250, "--prompt", "hi",
          "--max-new-tokens", 500], "prompt too long"),
        (["--video", tmp_path / "short.gif", "--image", red, "--prompt", "hi"],
         "--video cannot be combined with --image"),
        (["--prompt", "hi", "--draw-boxes", tmp_path / "b.png"], "--draw-boxes needs an --image"),
        (["--image", red, "--prompt", "hi", "--draw-boxes", tmp_path / "b.nope"],
         "unknown image extension"),
    ]
    for extra, msg in cases:
        assert_one_line_error(run("--ckpt", good, *extra, stdin=""), msg)


# -----------------------------------------------------------------------------
# flags, tile budgets, the checkpoint's own settings, save -> sample


@pytest.mark.slow
@pytest.mark.parametrize("flag,value,msg", [
    ("--temperature", -1, "--temperature -1.0: must be a finite number >= 0"),
    ("--temperature", "nan", "--temperature nan: must be a finite number"),
    ("--top-p", 0, "--top-p 0.0: must be a number in (0, 1]"),
    ("--top-p", 1.5, "--top-p 1.5: must be a number in (0, 1]"),
    ("--top-k", -1, "--top-k -1: must be an integer >= 0"),
    ("--max-new-tokens", 0, "--max-new-tokens 0: must be an integer >= 1"),
    ("--best-of", 0, "--best-of 0: must be an integer >= 1"),
    ("--max-tiles", 0, "--max-tiles 0: must be at least 1 (or -1"),
    ("--max-tiles", -2, "--max-tiles -2: must be at least 1 (or -1"),
    ("--num-frames", 0, "--num-frames 0: must be at least 1"),
])
def test_flags_are_checked_before_the_model_loads(tmp_path, flag, value, msg):
    # no checkpoint at all: the flag's error comes first
    assert_one_line_error(run("--ckpt", tmp_path / "nope", "--prompt", "hi", flag, value), msg)


def wide_images(root, n, size=112):
    """n images of 4:1: a 4x1 grid + thumbnail under a budget of 6, 2x1 + thumbnail under 2."""
    paths = []
    for k in range(n):
        Image.new("RGB", (4 * size, size), (40 * k, 90, 200 - 40 * k)).save(root / f"w{k}.png")
        paths.append(root / f"w{k}.png")
    return paths


@pytest.mark.slow
def test_split_tiles_follows_the_checkpoint_and_show_prompt_shows_the_grid(ckpt, tmp_path):
    images = [a for p in wide_images(tmp_path, 3) for a in ("--image", p)]
    shown = {}
    for flags in [(), ("--split-tiles",), ("--no-split-tiles",)]:
        r = run("--ckpt", ckpt / "ckpt", *images, "--prompt", "hi", "--max-new-tokens", 1,
                "--show-prompt", *flags)
        assert r.returncode == 0, r.stderr
        shown[flags] = [line for line in r.stderr.splitlines() if line.startswith("image ")]
    # the toy checkpoint was trained sharing its 6 tiles: 6 // 3 = 2 per image
    assert shown[()] == shown[("--split-tiles",)] == [
        f"image {k + 1}: w{k}.png 448x112 -> 2x1 tiles + thumbnail = 3 tiles, 48 image tokens"
        for k in range(3)]
    assert shown[("--no-split-tiles",)][0].endswith("-> 4x1 tiles + thumbnail = 5 tiles, "
                                                    "80 image tokens")


def test_readme_python_calls_match_sample_py(ckpt, tmp_path):
    """load_images + chat (the README's Python) on a toy checkpoint: its tile size, tokens per
    tile and tile budget, the answer sample.py prints."""
    from nanovl3.generate import chat
    from nanovl3.image import load_images
    paths = [ckpt / "red.png", wide_images(tmp_path, 1)[0]]
    q = "What differs?"
    r = run("--ckpt", ckpt / "ckpt", "--image", paths[0], "--image", paths[1], "--prompt", q,
            "--max-new-tokens", 12)
    assert r.returncode == 0, r.stderr
    model = InternVL.from_pretrained(ckpt / "ckpt")
    tok = Tokenizer.from_dir(ckpt / "ckpt")
    tiles, num_tiles = load_images(paths, model.cfg)
    assert num_tiles == [3, 4]  # 3 tiles each (6 shared by 2), as the toy model was trained
    answer, _ = chat(model, tok, q, torch.cat(tiles), num_tiles, max_new_tokens=12)
    assert r.stdout == answer + "\n"


@pytest.mark.slow
def test_the_checkpoints_system_message_is_used(ckpt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt / "ckpt", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["system_message"] = "You answer in one word."
    (d / "config.json").write_text(json.dumps(cfg))
    r = run("--ckpt", d, "--prompt", "hi", "--max-new-tokens", 1, "--show-prompt")
    assert r.returncode == 0, r.stderr
    assert "<|im_start|>system\nYou answer in one word.<|im_end|>" in r.stderr
    # generate.chat renders with it too
    from nanovl3.generate import chat
    model, tok, seen = InternVL.from_pretrained(d), Tokenizer.from_dir(d), []
    tok.encode = lambda text, encode=tok.encode: seen.append(text) or encode(text)
    chat(model, tok, "hi", max_new_tokens=1)
    assert seen[0].startswith("<|im_start|>system\nYou answer in one word.<|im_end|>")


@pytest.mark.slow
def test_save_pretrained_keeps_the_tokenizer_for_sample_py(ckpt, tmp_path, capsys):
    shutil.copytree(ckpt / "ckpt", a := tmp_path / "a")
    for name in ("vocab.json", "merges.txt"):  # a release's other tokenizer files travel too
        (a / name).write_text("{}")
    InternVL.from_pretrained(a).save_pretrained(tmp_path / "b")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (tmp_path / "b" / name).read_bytes() == (a / name).read_bytes()
    assert capsys.readouterr().err == ""
    argv = ["--prompt", "How many shapes?", "--max-new-tokens", 6]
    r, want = run("--ckpt", tmp_path / "b", *argv), run("--ckpt", a, *argv)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.stdout
    # from scratch, no tokenizer: one warning line
    InternVL(preset("toy")).save_pretrained(tmp_path / "scratch")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: save_pretrained(")
    assert "sample.py will need a tokenizer" in err[0]
