"""
Image preprocessing: InternVL's dynamic resolution (SPEC §3).

An image of any size becomes N square tiles of S×S pixels (S = 448): the grid (cols × rows) whose aspect ratio is
closest to the image's is picked from all grids with min_num..max_num tiles, the whole image is resized onto that
grid and cut into tiles, and a thumbnail of the whole image is appended when there is more than one tile.

    tiles = load_image("photo.jpg")                  # FloatTensor [N,3,448,448], ImageNet-normalised
    find_grid(1920, 1080)                            # (4, 2): 8 tiles + thumbnail = 9

Shapes: N tiles, S tile side in pixels. A tile is an image crop (a ViT input); never a ViT patch.
References: InternVL2.5 (arXiv 2412.05271) §3.1 "dynamic high-resolution"; InternVL3 (arXiv 2504.10479);
upstream OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py (dynamic_preprocess, find_closest_aspect_ratio,
build_transform, simulate_jpeg_degradation).
Tests: python -m pytest -q tests/test_image.py
"""

import io
import os
import random

import numpy as np
import torch
from PIL import Image

from nanovl3.common import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# tiling (SPEC §3.1)


def find_grid(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448) -> tuple[int, int]:
    """The (cols, rows) grid for a width×height image: closest aspect ratio, ties broken towards more tiles."""
    if min_num < 1 or max_num < min_num:
        raise UserError(f"max_num={max_num}, min_num={min_num}: need 1 <= min_num <= max_num tiles per image")
    # every grid with min_num..max_num tiles, fewest tiles first (a stable sort; order among equal products
    # never changes the result, SPEC §3.1 step 2)
    grids = [(c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if min_num <= c * r <= max_num]
    grids.sort(key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            # same ratio (1:1 vs 2:2 vs 3:3): take more tiles while the image still fills over half the canvas
            best = (cols, rows)
    return best


def dynamic_preprocess(img: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                       use_thumbnail: bool = True) -> list[Image.Image]:
    """One PIL image -> cols*rows tiles of image_size² in row-major order (+ a thumbnail last if more than one)."""
    img = img.convert("RGB")
    cols, rows = find_grid(img.width, img.height, min_num, max_num, image_size)
    # resize the whole image onto the grid canvas; the aspect ratio may be distorted a little (by design)
    canvas = img.resize((cols * image_size, rows * image_size), Image.BICUBIC)  # [rows*S, cols*S] pixels
    tiles = []
    for k in range(cols * rows):
        x, y = (k % cols) * image_size, (k // cols) * image_size  # row-major: tile k is row k//cols, column k%cols
        tiles.append(canvas.crop((x, y, x + image_size, y + image_size)))
    if use_thumbnail and len(tiles) != 1:
        # the thumbnail gives the model the global view that single tiles lack (InternVL 1.5 / 2.5)
        tiles.append(img.resize((image_size, image_size), Image.BICUBIC))
    return tiles


# -----------------------------------------------------------------------------
# augmentation (SPEC §3.3)


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    """Encode as JPEG at `quality` and decode again."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()  # decode now, before the buffer goes away
    return out


def jpeg_compress(tile: Image.Image, rng: random.Random) -> Image.Image:
    """Re-encode as JPEG with a random quality in 75..100 and decode (InternVL2.5 "random JPEG compression")."""
    return jpeg_roundtrip(tile, rng.randint(75, 100))  # randint is inclusive of 100


# -----------------------------------------------------------------------------
# to tensor (SPEC §3.2)


def tiles_to_tensor(tiles: list[Image.Image], image_size: int = 448) -> torch.Tensor:
    """Tiles -> FloatTensor [N,3,S,S]: resize to S×S (no-op for tiles), scale to [0,1], ImageNet-normalise."""
    mean = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(1, 1, 3)
    std = np.array(IMAGENET_STD, dtype=np.float32).reshape(1, 1, 3)
    out = []
    for tile in tiles:
        tile = tile.convert("RGB")
        if tile.size != (image_size, image_size):
            tile = tile.resize((image_size, image_size), Image.BICUBIC)
        x = np.asarray(tile, dtype=np.float32) / 255.0  # [S,S,3] in [0,1]
        x = (x - mean) / std  # [S,S,3]
        out.append(x.transpose(2, 0, 1))  # [S,S,3] -> [3,S,S]
    if not out:
        return torch.zeros(0, 3, image_size, image_size)
    return torch.from_numpy(np.stack(out))  # [N,3,S,S] fp32


# -----------------------------------------------------------------------------
# entry points


def preprocess_image(img: Image.Image, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True,
                     augment_rng: random.Random | None = None, min_num: int = 1) -> torch.Tensor:
    """A PIL image already in memory -> FloatTensor [N,3,S,S]. augment_rng: JPEG-compress every tile (training)."""
    tiles = dynamic_preprocess(img, min_num, max_num, image_size, use_thumbnail)
    if augment_rng is not None:
        # after tiling, each tile and the thumbnail independently (SPEC §3.3)
        tiles = [jpeg_compress(t, augment_rng) for t in tiles]
    return tiles_to_tensor(tiles, image_size)


def open_image(path) -> Image.Image:
    """Open and fully decode an image file as RGB; any failure is one UserError line naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()  # PIL decodes lazily: force it here so a truncated file fails now, with the path
            return img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: image too large ({e})")
    except (OSError, SyntaxError, ValueError) as e:
        # UnidentifiedImageError (not an image) and "image file is truncated" are both OSErrors
        reason = "not an image file" if isinstance(e, Image.UnidentifiedImageError) else f"unreadable image ({e})"
        raise UserError(f"{path}: {reason}")


def load_image(path, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True,
               augment_rng: random.Random | None = None) -> torch.Tensor:
    """Image file -> FloatTensor [N,3,S,S] of InternVL tiles, as the original `load_image` of the model card."""
    return preprocess_image(open_image(path), max_num, image_size, use_thumbnail, augment_rng)


def tiles_per_image(budget: int, n_images: int) -> int:
    """Training splits one sample's tile budget among its images (SPEC §3.6); the model card instead gives
    every image the whole budget at inference."""
    return max(1, budget // max(1, n_images))


def load_images(paths, cfg, max_num: int | None = None, split: bool = False) -> tuple[list[torch.Tensor], list[int]]:
    """Image files -> (tiles [N_k,3,S,S] of each image, N_k), cut as the model config `cfg` says; max_num
    overrides its max_dynamic_patch; split=True shares that budget among the images as training does."""
    budget = cfg.max_dynamic_patch if max_num is None else max_num
    per_image = tiles_per_image(budget, len(paths)) if split else budget
    tiles = [load_image(p, per_image, cfg.vision.image_size, cfg.use_thumbnail) for p in paths]
    return tiles, [t.size(0) for t in tiles]
