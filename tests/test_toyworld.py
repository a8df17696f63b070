"""
Tests for data/toyworld.py: determinism, official data formats, strict chain-of-thought answers,
held-out eval, speed.

    python -m pytest -q tests/test_toyworld.py
"""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data import toyworld as tw
from nanovl3.critic import final_answer, is_correct, normalise

ROOT = Path(__file__).resolve().parent.parent

SMALL = tw.SIZES["small"]

# -----------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "world"
    import nanovl3.chat  # noqa: F401  (imports torch, ~2 s): time the generation, not the import
    t0 = time.time()
    info = tw.generate(str(out), seed=0, **SMALL)
    info["elapsed"] = time.time() - t0
    return info


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): tw.file_digest(p) for p in sorted(root.rglob("*"))
            if p.is_file()}


def resolve(meta_path: Path, path: str) -> Path:
    """The documented rule: relative root / annotation paths start at the meta.json's directory."""
    p = Path(path)
    return p if p.is_absolute() else (meta_path.parent / p).resolve()


def entries(meta_path: Path):
    meta = json.loads(meta_path.read_text())
    for name, e in meta.items():
        assert {"root", "annotation", "repeat_time"} <= set(e), name
        rows = read_jsonl(resolve(meta_path, e["annotation"]))
        yield name, e, resolve(meta_path, e["root"]), rows


def images_of(row) -> list:
    img = row.get("image", [])
    return [img] if isinstance(img, str) else img


# -----------------------------------------------------------------------------
# generation: speed, determinism, idempotence, safety


def test_small_is_fast(world):
    assert world["elapsed"] < 10, world["elapsed"]


def test_same_seed_same_bytes(world, tmp_path):
    again = tw.generate(str(tmp_path / "again"), seed=0, **SMALL)
    a, b = tree_digest(Path(world["root"])), tree_digest(Path(again["root"]))
    assert a == b
    assert any(k.endswith(".png") for k in a) and "tokenizer.json" in a
    other = tree_digest(Path(tw.generate(str(tmp_path / "other"), seed=1, **SMALL)["root"]))
    assert other["sft/vqa.jsonl"] != a["sft/vqa.jsonl"]
    assert other["eval/eval.jsonl"] != a["eval/eval.jsonl"]


def test_idempotent_and_atomic(world):
    root = Path(world["root"])
    mtime = (root / "DONE").stat().st_mtime_ns
    t0 = time.time()
    info = tw.generate(str(root), seed=0, **SMALL)
    assert time.time() - t0 < 0.5 and (root / "DONE").stat().st_mtime_ns == mtime
    assert info["counts"] == world["counts"]
    # no temp dirs left behind
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        tw.generate(str(tmp_path / "mine"), **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_cli_same_bytes_in_another_process(world, tmp_path):
    # a fresh interpreter has another str-hash seed: catches set / hash ordering leaking into files
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "data.toyworld", "--out", str(out), "--size", "small"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["counts"]["eval"] == SMALL["n_eval"] * len(tw.EVAL_TYPES)
    assert tree_digest(out) == tree_digest(Path(world["root"]))


# -----------------------------------------------------------------------------
# formats


def check_turns(row):
    conv, n_img = row["conversations"], len(images_of(row))
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and conv
    tags = [t["value"].count("<image>") for t in conv]
    assert sum(tags) == n_img and tags[0] == n_img  # all tags in the first human turn
    if n_img > 1:
        assert conv[0]["value"].startswith("".join(f"Image-{i + 1}: <image>\n"
                                                   for i in range(n_img)))
    assert len(row["qa"]) == len(conv) // 2
    for human, gpt, qa in zip(conv[0::2], conv[1::2], row["qa"]):
        assert qa["cot"] == human["value"].endswith(tw.COT_SUFFIX)
        if qa["cot"]:
            steps = gpt["value"].split("\n\n")
            assert len(steps) >= 2 and all(s.strip() == s and s for s in steps)
            assert steps[-1] == f"The answer is {qa['answer']}."
        else:
            assert "The answer is" not in gpt["value"]
            assert normalise(gpt["value"]) == qa["answer"]
        assert final_answer(gpt["value"]) == qa["answer"] and is_correct(gpt["value"], qa["answer"])


def test_sft_format(world):
    seen = set()
    for name, e, root, rows in entries(Path(world["sft_meta"])):
        assert rows and e["length"] == len(rows)
        assert [r["id"] for r in rows] == list(range(len(rows)))
        for row in rows:
            check_turns(row)
            for p in images_of(row):
                assert (root / p).is_file(), p
            seen.add((name, len(images_of(row)), len(row["conversations"]) // 2 > 1))
    # text-only, multi-image
    assert ("toy_text", 0, False) in seen and ("toy_cot", 2, False) in seen
    assert any(multi_turn for _, n, multi_turn in seen if n == 1)
    text = read_jsonl(Path(world["root"]) / "sft/text.jsonl")
    assert all("image" not in r and "<image>" not in json.dumps(r) for r in text)


def test_pretrain_format(world):
    kinds = {}
    for name, e, root, rows in entries(Path(world["pretrain_meta"])):
        kinds[e["kind"]] = rows
        assert rows and e["length"] == len(rows)
        for row in rows:
            assert isinstance(row["text"], str) and row["text"]
            assert row["text"].count("<image>") == len(images_of(row))
            for p in images_of(row):
                assert (root / p).is_file(), p
    assert set(kinds) == {"interleaved", "text"}
    assert all(len(r["image"]) >= 2 for r in kinds["interleaved"])
    assert all("image" not in r for r in kinds["text"])


def test_eval(world):
    eval_file = Path(world["eval_file"])
    items = read_jsonl(eval_file)
    types = json.loads(Path(world["eval_types"]).read_text())
    assert set(types) == {"color", "shape", "count", "count_color", "position", "arith"}
    chance = {"color": 1 / 6, "shape": 1 / 4, "count": 1 / 5, "count_color": 1 / 4,
              "position": 1 / 2, "arith": 1 / 7}
    for t, info in types.items():
        assert info["chance"] == pytest.approx(chance[t])
        assert info["n"] == SMALL["n_eval"] == sum(it["type"] == t for it in items)
        assert info["majority"] >= info["chance"] - 1e-9
    for it in items:
        assert it["answer"] in types[it["type"]]["answers"]
        assert it["cot"] == (it["type"] == "arith") == it["question"].endswith(tw.COT_SUFFIX)
        assert it["question"].count("<image>") == len(images_of(it))
        for p in images_of(it):
            # eval paths are relative to the eval file's directory
            assert (eval_file.parent / p).is_file(), p
    prompts = json.loads(Path(world["eval_prompts"]).read_text())
    assert {p["type"] for p in prompts} == set(types) | {"describe"}
    assert all((eval_file.parent / q).is_file() for p in prompts for q in images_of(p))


def test_eval_images_held_out(world):
    root = Path(world["root"])
    train = {tw.file_digest(p) for p in (root / "images").rglob("*.png")}
    held = {tw.file_digest(p) for p in (root / "eval/images").rglob("*.png")}
    assert held and train and not (held & train)


def test_tokenizer(world):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(world["tokenizer"])
    text = "There are 2 shapes in the first image.\n\nThe answer is 5."
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id("<|im_end|>") is not None


# -----------------------------------------------------------------------------
# the world itself: answer helpers, scenes, rendering


def test_answer_forms_grade_back_to_the_eval_form():
    assert tw.short("red") == "Red." and tw.short("3") == "3."
    assert tw.cot(["a.", "b."], "4") == "a.\n\nb.\n\nThe answer is 4."
    for answer in ("red", "circle", "3", "left", "image-1"):   # the grading rule reads both back
        assert final_answer(tw.short(answer)) == answer
        assert final_answer(tw.cot(["2 + 3 = 5."], answer)) == answer


def test_steps_agree_with_the_answer():
    rng = random.Random(0)
    for qtype in ("arith_two", "arith_add", "count_cot"):  # each reference solution agrees
        for _ in range(30):
            _, qa = tw.build(rng, qtype)
            assert tw.steps_agree(qa["reply"], qa["question"]), qa
    add2 = "If you add 2 more shapes, how many shapes will there be? Think step by step."
    two = "There are 3 shapes in the first image.\n\nThere is 1 shape in the second image."
    count = "I count the shapes from left to right.\n\nOne: a red star.\n\nTwo: a blue circle."
    three, skipped = "There are 3 shapes in the image.", count.replace("Two", "Three")
    assert tw.steps_agree(f"{three}\n\n3 + 2 = 5.\n\nThe answer is 5.", add2)
    assert tw.steps_agree(f"{two}\n\n3 + 1 = 4.\n\nThe answer is 4.", "")
    assert tw.steps_agree(f"{count}\n\nThe answer is 2.", "")
    for bad, question in [(f"{three}\n\n4 + 2 = 6.\n\nThe answer is 6.", add2),  # a term
                          (f"{three}\n\n3 + 1 = 4.\n\nThe answer is 4.", add2),  # k
                          (f"{two}\n\n3 + 1 = 5.\n\nThe answer is 5.", ""),  # the sum
                          (f"{two}\n\n3 + 1 = 4.\n\nThe answer is 5.", ""),  # the answer
                          (f"{two}\n\n3 + 1 = 4.", ""),  # no final answer
                          (f"{count}\n\nThe answer is 3.", ""),  # the count
                          (f"{skipped}\n\nThe answer is 2.", "")]:  # a skipped number
        assert not tw.steps_agree(bad, question), bad


def boxes_overlap(a, b):
    return abs(a.cx - b.cx) * 2 < a.size + b.size and abs(a.cy - b.cy) * 2 < a.size + b.size


def test_scenes_visible_and_disjoint():
    rng = random.Random(0)
    for i in range(300):
        n = 2 if i % 3 == 0 else rng.randint(1, 6)
        specs = [tw.random_spec(rng) for _ in range(n)]
        scene = tw.sample_scene(rng, specs, split=(i % 3 == 0))
        short_side = min(scene.width, scene.height)
        for j, o in enumerate(scene.objects):
            assert o.size >= short_side / 6 - 0.1
            assert o.size / 2 <= o.cx <= scene.width - o.size / 2
            assert o.size / 2 <= o.cy <= scene.height - o.size / 2
            assert not any(boxes_overlap(o, p) for p in scene.objects[j + 1:])
        if i % 3 == 0:
            assert {scene.side(o) for o in scene.objects} == {"left", "right"}
    sizes = {tw.sample_scene(rng, [("red", "circle")]).width for _ in range(100)}
    assert len(sizes) >= 3  # several canvas sizes, so dynamic tiling is exercised


def test_closeups_are_one_toy_tile():
    from nanovl3.config import preset
    from nanovl3.image import find_grid
    cfg = preset("toy")
    grid = find_grid(tw.CLOSEUP, tw.CLOSEUP, 1, cfg.max_dynamic_patch, cfg.vision.image_size)
    assert grid == (1, 1)
    rng = random.Random(0)
    sizes = []
    for _ in range(200):
        scene = tw.closeup_scene(rng, "red", "star")
        o, = scene.objects
        assert (scene.width, scene.height) == (tw.CLOSEUP, tw.CLOSEUP)
        assert o.size / 2 <= o.cx <= tw.CLOSEUP - o.size / 2
        assert o.size / 2 <= o.cy <= tw.CLOSEUP - o.size / 2
        sizes.append(o.size / tw.CLOSEUP)
    lo, hi = tw.CLOSEUP_SIZE
    assert lo - 0.01 <= min(sizes) < lo + 0.05 and hi - 0.05 < max(sizes) <= hi + 0.01


def test_colour_and_shape_questions_use_closeups(world):
    from PIL import Image
    eval_file = Path(world["eval_file"])
    for it in read_jsonl(eval_file):
        size = Image.open(eval_file.parent / images_of(it)[0]).size
        closeup = size == (tw.CLOSEUP, tw.CLOSEUP)
        assert closeup == (it["type"] in ("color", "shape")), (it["type"], size)
    root = Path(world["root"])
    closeups = read_jsonl(root / "sft/closeup.jsonl")
    assert {qa["type"] for r in closeups for qa in r["qa"]} == {"color", "shape"}
    docs = read_jsonl(root / "pretrain/interleaved.jsonl")
    sizes = [{Image.open(root / p).size for p in d["image"]} for d in docs]
    assert {(tw.CLOSEUP, tw.CLOSEUP)} in sizes  # captioned close-ups in pre-training too
    assert any((tw.CLOSEUP, tw.CLOSEUP) not in s for s in sizes)


@pytest.mark.parametrize("shape", tw.SHAPES)
def test_render_centre_has_object_colour(shape):
    rng = random.Random(1)
    scene = tw.sample_scene(rng, [("blue", shape)])
    o = scene.objects[0]
    img = tw.render(scene)
    assert img.size == (scene.width, scene.height)
    assert img.getpixel((round(o.cx), round(o.cy + o.size / 8))) == o.rgb
    assert img.getpixel((0, 0)) == scene.background


def test_stripes_are_fine_detail_that_jpeg_10_wipes_out():
    """The JPEG ablation's pictures (experiments/ablations.py): the pixel check reads every clean,
    quality-75 and quality-40 one, and loses one in six or more at quality 10."""
    from nanovl3.image import jpeg_roundtrip
    rng = random.Random(0)
    read = {None: 0, 75: 0, 40: 0, 10: 0}
    for i in range(60):
        direction = tw.STRIPE_DIRECTIONS[i % 3]
        img, (x0, y0, w, h) = tw.stripes_picture(rng, direction)
        assert img.size == (tw.CLOSEUP, tw.CLOSEUP) and img.getpixel((1, 1)) != img.getpixel(
            (x0 + w // 2, y0 + h // 2))
        for q in read:
            out = img if q is None else jpeg_roundtrip(img, q)
            read[q] += tw.stripes_direction(out, (x0, y0, w, h)) == direction
    assert read[None] == read[75] == read[40] == 60
    assert read[10] <= 50


def test_stripes_amplitude_sets_their_contrast():
    """Training pictures of the JPEG task may have stronger stripes (STRIPE_AMPLITUDE_TRAIN): the
    grey levels inside the patch span twice the amplitude asked for."""
    for amp in (12, 60):
        img, (x0, y0, w, h) = tw.stripes_picture(random.Random(1), "vertical", (amp, amp))
        lo, hi = img.convert("L").crop((x0, y0, x0 + w, y0 + h)).getextrema()
        assert 2 * amp - 2 <= hi - lo <= 2 * amp + 2
