"""
Dynamic-resolution tiling and normalisation (nanovl3/image.py) against upstream OpenGVLab/InternVL
internvl_chat/internvl/train/dataset.py `dynamic_preprocess` and `build_transform`.

    python -m pytest -q tests/test_image.py
"""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from nanovl3.common import UserError
from nanovl3.image import (IMAGENET_MEAN, IMAGENET_STD, draw_boxes, dynamic_preprocess,
                           find_grid, frame_indices, jpeg_compress, load_image, load_video,
                           preprocess_image, tiles_to_tensor)

# what upstream `dynamic_preprocess` (and transformers' GotOcr2ImageProcessorPil) gives with
# max_num=12 and the thumbnail on: input w×h -> grid (cols, rows), total tiles incl. thumbnail
WORKED = [
    ((448, 448), (1, 1), 1),
    ((800, 600), (4, 3), 13),
    ((1920, 1080), (4, 2), 9),
    ((300, 1200), (1, 4), 5),
    ((1000, 1000), (3, 3), 10),
    ((1280, 720), (4, 2), 9),
    ((4000, 300), (12, 1), 13),
    ((224, 224), (1, 1), 1),
]


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,grid,total", WORKED)
def test_worked_examples(size, grid, total):
    assert find_grid(*size) == grid
    tiles = dynamic_preprocess(Image.new("RGB", size, (10, 20, 30)))
    assert len(tiles) == total
    assert all(t.size == (448, 448) for t in tiles)


@pytest.mark.parametrize("size,total", [((448, 448), 1), ((800, 600), 13), ((300, 1200), 5)])
def test_tensor_shape(size, total):
    x = preprocess_image(noise(*size))
    assert x.shape == (total, 3, 448, 448) and x.dtype == torch.float32


def test_tie_rule():
    # equal ratios (1:1, 2:2, 3:3 or 2:1, 4:2): more tiles only while area > 0.5·448²·cols·rows
    assert find_grid(900, 900) == (2, 2)  # 810000 > 401408, but not > 903168
    assert find_grid(950, 950) == (2, 2)  # 902500 < 903168
    assert find_grid(951, 951) == (3, 3)  # 904401 > 903168
    assert find_grid(1000, 1000) == (3, 3)
    assert find_grid(634, 634) == (2, 2)  # 401956 > 401408
    assert find_grid(633, 633) == (1, 1)  # 400689 < 401408
    assert find_grid(1000, 500) == (2, 1)  # 500000 < 802816 for 4x2
    assert find_grid(2000, 1000) == (4, 2)
    # a strictly closer ratio always wins, whatever the area: an exact 4:3 gets 12 tiles even when
    # small (upstream `find_closest_aspect_ratio`)
    assert find_grid(64, 48) == (4, 3)


def test_grid_limits():
    assert find_grid(4000, 300, max_num=1) == (1, 1)
    assert find_grid(4000, 300, max_num=6) == (6, 1)
    cols, rows = find_grid(448, 448, min_num=2, max_num=12)
    assert cols * rows >= 2
    assert len(dynamic_preprocess(noise(4000, 300), max_num=1)) == 1  # one tile: no thumbnail
    assert len(dynamic_preprocess(noise(800, 600), use_thumbnail=False)) == 12
    with pytest.raises(UserError, match="max_num"):
        find_grid(100, 100, max_num=0)


def test_tiles_are_row_major_and_thumbnail_last():
    # 896x896 -> 2x2 grid on a canvas of the same size, so the tiles are the exact quadrants
    img = Image.new("RGB", (896, 896))
    # top-left, top-right, bottom-left, bottom-right
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for k, c in enumerate(colours):
        img.paste(c, ((k % 2) * 448, (k // 2) * 448, (k % 2) * 448 + 448, (k // 2) * 448 + 448))
    tiles = dynamic_preprocess(img)
    assert len(tiles) == 5
    for t, c in zip(tiles, colours):
        assert (np.asarray(t) == np.array(c, dtype=np.uint8)).all()
    # thumbnail: the original image resized straight to 448² with bicubic
    img = noise(800, 600)
    tiles = dynamic_preprocess(img)
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((448, 448), Image.BICUBIC)))


def test_modes_are_converted_to_rgb():
    for mode in ["L", "RGBA", "P"]:
        x = preprocess_image(Image.new(mode, (300, 200)))
        assert x.shape == (7, 3, 448, 448)  # 3x2 grid + thumbnail


def test_normalisation_of_white():
    x = tiles_to_tensor([Image.new("RGB", (448, 448), (255, 255, 255))])
    want = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert x.shape == (1, 3, 448, 448)
    assert torch.allclose(x[0, :, 0, 0], want)
    assert torch.allclose(x, want.view(1, 3, 1, 1).expand_as(x))


def test_tiles_to_tensor_matches_independent_computation():
    tiles = [noise(448, 448, seed=1), noise(100, 60, seed=2)]  # the second needs the 448² resize
    x = tiles_to_tensor(tiles)
    ref = []
    for t in [tiles[0], tiles[1].resize((448, 448), Image.BICUBIC)]:
        y = torch.tensor(np.array(t)).permute(2, 0, 1).float() / 255  # [3,S,S]: ToTensor
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        ref.append((y - mean) / std)
    assert torch.allclose(x, torch.stack(ref), atol=1e-6)


def test_jpeg_compress():
    tile = noise(448, 448, seed=3)
    out = jpeg_compress(tile, random.Random(0))
    assert out.size == tile.size and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), np.asarray(tile))
    again = jpeg_compress(tile, random.Random(0))
    assert np.array_equal(np.asarray(again), np.asarray(out))  # seeded: repeatable


def test_augmented_load(tmp_path):
    noise(600, 300, seed=4).save(tmp_path / "a.png")
    plain = load_image(tmp_path / "a.png")
    aug = load_image(tmp_path / "a.png", augment_rng=random.Random(0))
    assert aug.shape == plain.shape == (3, 3, 448, 448)  # 2x1 grid + thumbnail
    assert not torch.equal(aug, plain)
    # the file route equals the in-memory route
    assert torch.equal(plain, preprocess_image(Image.open(tmp_path / "a.png")))


def test_load_images_splits_the_budget_like_training(tmp_path):
    """split=True gives each of n images budget // n tiles (at least 1), as the SFT loader does;
    otherwise each image gets the whole budget (the model card's inference)."""
    from nanovl3.config import preset
    from nanovl3.image import load_images, tiles_per_image
    cfg = preset("toy")
    size = cfg.vision.image_size
    paths = []
    for k in range(3):
        noise(4 * size, size, seed=k).save(tmp_path / f"{k}.png")  # 4:1: a 4x1 grid + thumbnail
        paths.append(tmp_path / f"{k}.png")
    assert [tiles_per_image(6, n) for n in (1, 2, 3, 4, 7)] == [6, 3, 2, 1, 1]
    _, whole = load_images(paths, cfg, split=False)
    _, shared = load_images(paths, cfg, split=True)
    assert whole == [5, 5, 5]    # 4 tiles + thumbnail, under max_dynamic_patch 6
    assert shared == [3, 3, 3]   # 6 // 3 = 2 tiles -> a 2x1 grid + thumbnail
    assert load_images(paths[:1], cfg, split=True)[1] == [5]
    assert load_images(paths, cfg)[1] == shared  # split=None: the config's (toy: as trained)
    cfg.split_tiles = False
    assert load_images(paths, cfg)[1] == whole


@pytest.mark.parametrize("kind", ["missing", "not an image", "truncated png", "truncated jpeg",
                                  "directory"])
def test_bad_files(tmp_path, kind):
    img = noise(300, 200, seed=5)
    path = tmp_path / "img.x"
    if kind == "not an image":
        path.write_text("this is not an image")
    elif kind.startswith("truncated"):
        img.save(path, format=kind.split()[1].upper())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(UserError) as e:
        load_image(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_matches_transformers_got_ocr2():
    """transformers' PIL GotOcr2 processor with crop_to_patches gives the same pixels."""
    mod = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2",
                              reason="transformers is not installed (optional cross-check)")
    proc = mod.GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=12,
                                        size={"height": 448, "width": 448},
                                        image_mean=list(IMAGENET_MEAN),
                                        image_std=list(IMAGENET_STD))
    for size, seed in [((800, 600), 6), ((317, 911), 7), ((448, 448), 8)]:
        img = noise(*size, seed=seed)
        ref = proc(images=[img], return_tensors="pt")
        ours = preprocess_image(img)
        assert ref["num_patches"].tolist() == [ours.size(0)]
        assert (ref["pixel_values"] - ours).abs().max().item() < 1e-5


# -----------------------------------------------------------------------------
# video: the model card's `get_index` (no bound) and `load_video` (max_num=1)

# worked by hand: seg = (n-1)/N, index_i = int(seg/2 + round(seg*i)), round half to even
FRAMES = [
    (11, 8, [0, 1, 2, 4, 5, 6, 8, 9]),   # seg 1.25: round(2.5) = 2 (half-up would give 3)
    (24, 8, [1, 4, 7, 10, 13, 15, 18, 21]),
    (12, 5, [1, 3, 5, 8, 10]),
    (3, 4, [0, 0, 1, 2]),                # fewer frames than segments: repeats; round(0.5) = 0
    (1, 2, [0, 0]),
]


@pytest.mark.parametrize("n,num,want", FRAMES)
def test_frame_indices_worked_examples(n, num, want):
    assert frame_indices(n, num) == want


def test_frame_indices_match_numpy_get_index():
    for n in range(1, 60):
        for num in (1, 4, 8, 16, 32):
            seg = float(n - 1) / num  # upstream: start_idx 0, end_idx max_frame = n - 1
            want = [int(0 + seg / 2 + np.round(seg * i)) for i in range(num)]
            assert frame_indices(n, num) == want, (n, num)


def colour(k):
    return (10 * k, 200 - 10 * k, 7 * k)


def tile_of(k, size):
    return preprocess_image(Image.new("RGB", (40, 30), colour(k)), max_num=1, image_size=size)[0]


@pytest.mark.parametrize("kind", ["gif", "apng", "webp", "dir"])
def test_load_video_picks_the_frames(tmp_path, kind):
    frames = [Image.new("RGB", (40, 30), colour(k)) for k in range(12)]
    if kind == "dir":
        path = tmp_path / "frames"
        path.mkdir()
        for k in [5, 0, 11, 3, 1, 2, 4, 6, 7, 8, 9, 10]:  # written out of order: name order counts
            frames[k].save(path / f"frame{k:03d}.png")
        (path / "notes.txt").write_text("not a frame")
    else:
        path = tmp_path / f"clip.{'png' if kind == 'apng' else kind}"
        extra = {"lossless": True} if kind == "webp" else {}
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, **extra)
    tiles, index, total = load_video(path, 5, image_size=56)
    assert total == 12 and index == [1, 3, 5, 8, 10]
    assert tiles.shape == (5, 3, 56, 56)  # one tile per frame, no thumbnail, the given size
    for tile, k in zip(tiles, index):
        assert (tile - tile_of(k, 56)).abs().max().item() < 1e-5, k


@pytest.mark.parametrize("kind,msg", [
    ("still png", "a still image, not a video"),
    ("still gif", "a still image, not a video"),
    ("empty dir", "no image files in this directory"),
    ("missing", "no such video file or directory"),
    ("not an image", "not a readable video or image file"),
    ("zero frames", "--num-frames 0: must be at least 1"),
])
def test_load_video_errors(tmp_path, kind, msg):
    path, num = tmp_path / "v.gif", 0 if kind == "zero frames" else 8
    if kind.startswith("still") or kind == "zero frames":
        Image.new("RGB", (40, 30), (1, 2, 3)).save(path, format=kind.split()[-1].upper()
                                                   if kind.startswith("still") else "GIF")
    elif kind == "empty dir":
        path.mkdir()
        (path / "readme.txt").write_text("no frames here")
    elif kind == "not an image":
        path.write_text("GIF89a but not really")
    with pytest.raises(UserError, match=msg):
        load_video(path, num, image_size=56)


# -----------------------------------------------------------------------------
# grounding boxes


def test_draw_boxes_scales_0_to_1000():
    img = Image.new("RGB", (200, 100), "white")
    out = draw_boxes(img, [("", (100, 200, 600, 900))])  # -> pixels (20, 20)-(120, 90)
    px = np.asarray(out).astype(int)  # [H, W, 3]
    white = np.array([255, 255, 255])
    for x, y in [(20, 50), (120, 50), (70, 20), (70, 90)]:  # on each edge
        assert (px[y, x] != white).any(), (x, y)
    for x, y in [(19, 50), (121, 50), (70, 19), (70, 91), (70, 50)]:  # outside and inside
        assert (px[y, x] == white).all(), (x, y)
    assert (np.asarray(img) == 255).all()  # the input image is left alone
    labelled = np.asarray(draw_boxes(img, [("cat", (100, 200, 600, 900))])).astype(int)
    assert (labelled[22:28, 22:30] != white).any()  # the label strip inside the corner


# -----------------------------------------------------------------------------
# every mode Pillow makes: converted as the reference does (`.convert('RGB')`), warned when lossy

def mode_image(mode: str, lossy: bool) -> Image.Image:
    """A 60x30 image of `mode`; lossy: with what RGB loses (transparency, values beyond 255)."""
    ramp = np.tile(np.arange(60), (30, 1))  # [30, 60]
    if mode in ("I", "I;16", "F"):
        scale = 1000 if lossy else 4  # 59 * 4 = 236 fits 8 bits
        a = (ramp * scale).astype({"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode])
        return Image.fromarray(a)
    img = noise(60, 30, seed=7).convert(mode)
    if mode in ("RGBA", "LA", "PA"):
        img.putalpha(Image.fromarray((ramp * 4 if lossy else ramp * 0 + 255).astype(np.uint8)))
    if mode == "P" and lossy:
        img.info["transparency"] = 0
        img.putpixel((0, 0), 0)
    return img


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "I", "I;16", "F"]
LOSSY = ["P", "RGBA", "LA", "PA", "I", "I;16", "F"]  # each also tried without the loss


@pytest.mark.parametrize("mode,lossy", [(m, False) for m in MODES] + [(m, True) for m in LOSSY])
def test_every_mode_loads_and_warns_when_rgb_loses_the_picture(tmp_path, capsys, mode, lossy):
    img = mode_image(mode, lossy)
    ext = "png" if mode in ("1", "L", "P", "RGB", "RGBA", "LA", "I;16") else "tiff"  # TIFF: others
    path = tmp_path / f"{mode.replace(';', '_')}.{ext}"
    img.save(path)
    assert Image.open(path).mode == mode
    x = load_image(path, max_num=6, image_size=112)
    assert x.shape == (3, 3, 112, 112)  # 2:1 -> a 2x1 grid + thumbnail
    assert torch.equal(x, preprocess_image(Image.open(path).convert("RGB"), 6, 112))
    err = capsys.readouterr().err.strip().splitlines()
    if lossy:
        assert len(err) == 1 and err[0].startswith(f"warning: {path}: "), err
        assert ("transparent" if mode in ("P", "RGBA", "LA", "PA") else "clipped") in err[0]
    else:
        assert err == []


def test_animated_image_loads_its_first_frame_with_a_warning(tmp_path, capsys):
    frames = [Image.new("RGB", (60, 30), colour(k)) for k in range(4)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    x = load_image(tmp_path / "a.gif", max_num=6, image_size=112)
    assert torch.equal(x, preprocess_image(Image.open(tmp_path / "a.gif").convert("RGB"), 6, 112))
    assert torch.equal(x, preprocess_image(frames[0], 6, 112))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.gif: an animated image of 4 frames" in err[0]
    assert "--video" in err[0]
