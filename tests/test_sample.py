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
from nanovl3.image import load_image
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


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


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
    out["unsupported llm"] = (d, "supports only Qwen2")
    return out


@pytest.mark.parametrize("case", ["missing dir", "empty dir", "corrupt", "truncated",
                                  "unsupported llm"])
def test_bad_checkpoint(ckpt, tmp_path, case):
    path, msg = bad_checkpoints(ckpt, tmp_path)[case]
    r = run("--ckpt", path, "--prompt", "hi")
    assert_one_line_error(r, msg)


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


def test_best_of_errors(ckpt, tmp_path):
    good = ckpt / "ckpt"
    assert_one_line_error(run("--ckpt", good, "--prompt", "hi", "--best-of", 4),
                          "--best-of 4 needs --temperature > 0")
    assert_one_line_error(run("--ckpt", good, "--prompt", "hi", "--best-of", 0),
                          "--best-of must be at least 1")
    assert_one_line_error(run("--ckpt", good, "--prompt", "hi", "--best-of", 2, "--temperature", 1,
                              "--critic", tmp_path / "no-prm"), "does not exist")
