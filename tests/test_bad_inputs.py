"""
The sweep of bad inputs: every script, given a mistake a user makes, prints ONE line `error: ...`
naming the flag, file, line or key, exits with code 2, shows no traceback and leaves nothing
half-written. Each case runs the script's own code in this process (runpy, as `python script.py`
would), so the whole table takes seconds; tests/test_sample.py and tests/test_train.py run a few of
the same through real subprocesses.

    python -m pytest -q tests/test_bad_inputs.py
"""

import contextlib
import io
import json
import os
import runpy
import shutil
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, argv: list) -> tuple[int, str, str]:
    """`python script argv...` in this process -> (exit code, stdout, stderr); an exception that
    escapes the script fails the test with its traceback (that is the bug being tested for)."""
    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = [os.path.join(ROOT, script)] + [str(a) for a in argv]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(untrained_ckpt, small_world, tmp_path_factory):
    """Good files to start from, and the bad ones the cases point at."""
    d = tmp_path_factory.mktemp("bad")
    Image.new("RGB", (60, 40), (200, 30, 30)).save(d / "red.png")
    (d / "text.png").write_text("not an image")
    frames = [Image.new("RGB", (32, 32), (10 * i, 0, 0)) for i in range(4)]
    frames[0].save(d / "clip.gif", save_all=True, append_images=frames[1:])
    (d / "frames").mkdir()

    def ckpt(name, config=None, tensors=None):
        """A copy of the untrained checkpoint with config.json replaced or tensors changed."""
        out = d / name
        shutil.copytree(untrained_ckpt, out)
        if config is not None:
            (out / "config.json").write_text(config if isinstance(config, str)
                                             else json.dumps(config))
        if tensors is not None:
            state = load_file(out / "model.safetensors")
            save_file(tensors(state), out / "model.safetensors")
        return out

    cfg = json.loads((untrained_ckpt / "config.json").read_text())
    ckpt("cfg-list", [cfg])
    ckpt("cfg-vision-str", {**cfg, "vision_config": "big"})
    ckpt("cfg-llm-null", {**cfg, "llm_config": None})
    ckpt("cfg-hidden-str", {**cfg, "llm_config": {**cfg["llm_config"], "hidden_size": "big"}})
    ckpt("cfg-not-json", "{nope")
    ckpt("cfg-moe", {**cfg, "llm_config": {**cfg["llm_config"], "model_type": "qwen2_moe",
                                           "architectures": ["Qwen2MoeForCausalLM"]}})
    key = "mlp1.1.weight"
    ckpt("int-weights", tensors=lambda s: {**s, key: s[key].to(torch.int32)})
    ckpt("fp8-weights", tensors=lambda s: {**s, key: s[key].to(torch.float8_e4m3fn)})
    ckpt("missing-key", tensors=lambda s: {k: v for k, v in s.items() if k != key})
    ckpt("no-tokenizer")
    os.remove(d / "no-tokenizer" / "tokenizer.json")
    meta = {"d": {"root": ".", "annotation": "d.jsonl"}}
    for name, meta_text, lines in [
            ("meta-list", json.dumps([meta]), ""),
            ("meta-not-json", "{", ""),
            ("meta-no-annotation", json.dumps({"d": {"root": "."}}), ""),
            ("meta-missing-jsonl", json.dumps({"d": {"annotation": "gone.jsonl"}}), ""),
            ("jsonl-malformed", json.dumps(meta), '{"conversations": [\n'),
            ("jsonl-no-answer", json.dumps(meta),
             json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")]:
        (d / name).mkdir()
        (d / name / "meta.json").write_text(meta_text)
        (d / name / "d.jsonl").write_text(lines)
    return d


CKPT = "{ckpt}"  # replaced by the untrained checkpoint's path
CASES = [
    # (id, script, argv, what the error line must contain); {d}: the bad files, {ckpt}, {world}
    ("no ckpt dir", "sample.py", ["--ckpt", "{d}/nope", "--prompt", "hi"], "does not exist"),
    ("ckpt not a dir of one", "sample.py", ["--ckpt", "{d}/frames", "--prompt", "hi"],
     "no config.json"),
    ("config not JSON", "sample.py", ["--ckpt", "{d}/cfg-not-json", "--prompt", "hi"],
     "config.json"),
    ("config a list", "sample.py", ["--ckpt", "{d}/cfg-list", "--prompt", "hi"], "config.json"),
    ("vision_config a string", "sample.py", ["--ckpt", "{d}/cfg-vision-str", "--prompt", "hi"],
     "vision_config"),
    ("llm_config null", "sample.py", ["--ckpt", "{d}/cfg-llm-null", "--prompt", "hi"],
     "llm_config"),
    ("hidden_size a string", "sample.py", ["--ckpt", "{d}/cfg-hidden-str", "--prompt", "hi"],
     "hidden_size"),
    ("MoE language model", "sample.py", ["--ckpt", "{d}/cfg-moe", "--prompt", "hi"],
     "Qwen2MoeForCausalLM"),
    ("int weights", "sample.py", ["--ckpt", "{d}/int-weights", "--prompt", "hi"], "mlp1.1.weight"),
    ("fp8 weights", "sample.py", ["--ckpt", "{d}/fp8-weights", "--prompt", "hi"], "F8_E4M3"),
    ("missing weight", "sample.py", ["--ckpt", "{d}/missing-key", "--prompt", "hi"],
     "1 missing keys: mlp1.1.weight"),
    ("no tokenizer", "sample.py", ["--ckpt", "{d}/no-tokenizer", "--prompt", "hi"], "tokenizer"),
    ("no prompt", "sample.py", ["--ckpt", CKPT], "--prompt"),
    ("image missing", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--image", "{d}/gone.png"],
     "gone.png"),
    ("image not an image", "sample.py",
     ["--ckpt", CKPT, "--prompt", "hi", "--image", "{d}/text.png"], "text.png"),
    ("more tags than images", "sample.py",
     ["--ckpt", CKPT, "--prompt", "<image> <image>", "--image", "{d}/red.png"], "<image>"),
    ("temperature < 0", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--temperature", "-1"],
     "--temperature"),
    ("temperature nan", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--temperature", "nan"],
     "--temperature"),
    ("top-p 0", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--top-p", "0"], "--top-p"),
    ("top-p > 1", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    ("top-k < 0", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--top-k", "-2"], "--top-k"),
    ("max-new-tokens 0", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--max-new-tokens", "0"],
     "--max-new-tokens"),
    ("max-new-tokens too many", "sample.py",
     ["--ckpt", CKPT, "--prompt", "hi", "--max-new-tokens", "100000"], "prompt too long"),
    ("max-tiles 0", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--max-tiles", "0"],
     "--max-tiles"),
    ("best-of 0", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--best-of", "0"], "--best-of"),
    ("best-of greedy", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--best-of", "3"],
     "--temperature"),
    ("critic missing", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--best-of", "2",
                                     "--temperature", "1", "--critic", "{d}/nope"], "nope"),
    ("chat with best-of", "sample.py", ["--ckpt", CKPT, "--chat", "--best-of", "2",
                                        "--temperature", "1"], "--best-of"),
    ("video a still image", "sample.py",
     ["--ckpt", CKPT, "--prompt", "hi", "--video", "{d}/red.png"], "still image"),
    ("video dir without images", "sample.py",
     ["--ckpt", CKPT, "--prompt", "hi", "--video", "{d}/frames"], "no image files"),
    ("num-frames 0", "sample.py",
     ["--ckpt", CKPT, "--prompt", "hi", "--video", "{d}/clip.gif", "--num-frames", "0"],
     "--num-frames"),
    ("draw-boxes without image", "sample.py",
     ["--ckpt", CKPT, "--prompt", "hi", "--draw-boxes", "{d}/boxes.png"], "--draw-boxes"),
    ("device unknown", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--device", "tpu"],
     "--device"),
    ("dtype unknown", "sample.py", ["--ckpt", CKPT, "--prompt", "hi", "--dtype", "int8"],
     "--dtype"),
    # train.py
    ("preset unknown", "train.py", ["--preset", "huge", "--data-dir", "{world}"], "huge"),
    ("sft meta missing", "train.py", ["--stage", "sft", "--sft-meta", "{d}/nope.json",
                                      "--data-dir", "{world}"], "nope.json"),
    ("meta a list", "train.py", ["--stage", "sft", "--sft-meta", "{d}/meta-list/meta.json",
                                 "--data-dir", "{world}"], "meta.json"),
    ("meta not JSON", "train.py", ["--stage", "sft", "--sft-meta", "{d}/meta-not-json/meta.json",
                                   "--data-dir", "{world}"], "meta.json:1"),
    ("meta without annotation", "train.py",
     ["--stage", "sft", "--sft-meta", "{d}/meta-no-annotation/meta.json", "--data-dir", "{world}"],
     "'annotation'"),
    ("annotation missing", "train.py",
     ["--stage", "sft", "--sft-meta", "{d}/meta-missing-jsonl/meta.json", "--data-dir", "{world}"],
     "gone.jsonl"),
    ("jsonl line malformed", "train.py",
     ["--stage", "sft", "--sft-meta", "{d}/jsonl-malformed/meta.json", "--data-dir", "{world}"],
     "d.jsonl:1"),
    ("jsonl line without answer", "train.py",
     ["--stage", "sft", "--sft-meta", "{d}/jsonl-no-answer/meta.json", "--data-dir", "{world}"],
     "d.jsonl:1"),
    ("init-from missing", "train.py", ["--init-from", "{d}/nope", "--data-dir", "{world}"],
     "nope"),
    ("resume without checkpoint", "train.py", ["--resume", "--data-dir", "{world}"], "--resume"),
    ("freeze unknown part", "train.py", ["--freeze", "eyes", "--data-dir", "{world}"], "--freeze"),
    ("grad-accum 0", "train.py", ["--grad-accum", "0", "--data-dir", "{world}"], "--grad-accum"),
    ("text-ratio 2", "train.py", ["--text-ratio", "2", "--data-dir", "{world}"], "ratio"),
    ("eval file missing", "train.py", ["--eval-file", "{d}/gone.jsonl", "--data-dir", "{world}"],
     "gone.jsonl"),
    ("loss reduction unknown", "train.py", ["--loss-reduction", "mean"], "--loss-reduction"),
    # mpo.py
    ("mpo without init", "mpo.py", ["--data", "{d}/x.json"], "--init-from"),
    ("mpo beta 0", "mpo.py", ["--init-from", CKPT, "--data", "{d}/x.json", "--beta", "0"],
     "--beta"),
    ("mpo data missing", "mpo.py", ["--init-from", CKPT, "--data", "{d}/nope.json"], "nope.json"),
    ("mpo eval file missing", "mpo.py", ["--init-from", CKPT, "--data", "{d}/x.json",
                                         "--eval-file", "{d}/gone.jsonl"], "gone.jsonl"),
    ("train lr 0", "train.py", ["--lr", "0", "--data-dir", "{world}"], "--lr"),
    ("train sft-steps < 0", "train.py", ["--sft-steps", "-5", "--data-dir", "{world}"],
     "--sft-steps"),
    ("train threads 0", "train.py", ["--threads", "0", "--data-dir", "{world}"], "--threads"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error(case, files, untrained_ckpt, small_world, tmp_path):
    name, script, argv, msg = case
    fill = {"d": files, "ckpt": untrained_ckpt, "world": small_world}
    argv = [a.format(**fill) for a in argv]
    if script in ("train.py", "mpo.py"):
        argv += ["--out-dir", tmp_path / "out"]
    before = sorted(os.listdir(files))
    code, out, err = run_script(script, argv)
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error:") and msg in lines[-1], err[-2000:]
    assert sum(line.startswith("error:") for line in lines) == 1, err
    # nothing written: no output directory, no temporary left behind, the inputs untouched
    assert not (tmp_path / "out" / "ckpt").exists() and sorted(os.listdir(files)) == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_the_sweep_is_wide():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1] for c in CASES} == {"sample.py", "train.py", "mpo.py"}
