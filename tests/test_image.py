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
from nanovl3.image import (IMAGENET_MEAN, IMAGENET_STD, dynamic_preprocess, find_grid,
                           jpeg_compress, load_image, preprocess_image, tiles_to_tensor)

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
    _, whole = load_images(paths, cfg)
    _, shared = load_images(paths, cfg, split=True)
    assert whole == [5, 5, 5]    # 4 tiles + thumbnail, under max_dynamic_patch 6
    assert shared == [3, 3, 3]   # 6 // 3 = 2 tiles -> a 2x1 grid + thumbnail
    assert load_images(paths[:1], cfg, split=True)[1] == [5]


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
