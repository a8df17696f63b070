"""Image preprocessing: InternVL's dynamic resolution. An image of any size is resized onto the grid
(cols × rows, min_num..max_num tiles of S×S pixels, S = 448) closest to its aspect ratio and cut
into tiles, plus a thumbnail of the whole image when the grid has more than one tile.

    tiles = load_image("photo.jpg")        # FloatTensor [N,3,448,448], ImageNet-normalised
    find_grid(1920, 1080)                  # (4, 2): 8 tiles + thumbnail = 9

Shapes: N tiles, S tile side in pixels. A tile is an image crop (a ViT input); never a ViT patch.
Video: N frames sampled uniformly, one S×S tile each (load_video). Grounding boxes drawn with
Pillow (draw_boxes).
References: InternVL2.5 (arXiv 2412.05271) "Dynamic High-Resolution for Multimodal Data", random
JPEG compression ("Training Enhancements"); upstream OpenGVLab/InternVL internvl_chat/internvl/
train/dataset.py (`dynamic_preprocess`, `find_closest_aspect_ratio`, `build_transform`,
`simulate_jpeg_degradation`); the InternVL3 model card (`load_video`, `get_index`).
Tests: python -m pytest -q tests/test_image.py"""

import io
import os
import random
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw

from nanovl3.common import UserError, eprint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# tiling: dataset.py `dynamic_preprocess`, `find_closest_aspect_ratio`

def find_grid(width: int, height: int, min_num: int = 1, max_num: int = 12,
              image_size: int = 448) -> tuple[int, int]:
    """The (cols, rows) grid for a width×height image: closest aspect ratio, ties to more tiles."""
    if min_num < 1 or max_num < min_num:
        raise UserError(f"max_num={max_num}, min_num={min_num}: "
                        "need 1 <= min_num <= max_num tiles per image")
    # fewest tiles first (a stable sort; the order among equal products never changes the pick)
    grids = sorted([(c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1)
                    if min_num <= c * r <= max_num], key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            # same ratio (1:1, 2:2, 3:3): more tiles while the image fills over half the canvas
            best = (cols, rows)
    return best


def dynamic_preprocess(img: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                       use_thumbnail: bool = True) -> list[Image.Image]:
    """One image -> cols*rows tiles of image_size², row-major (+ a thumbnail last if several)."""
    img = img.convert("RGB")
    cols, rows = find_grid(img.width, img.height, min_num, max_num, image_size)
    # the whole image onto the grid canvas: its aspect ratio may be distorted a little (by design)
    canvas = img.resize((cols * image_size, rows * image_size), Image.BICUBIC)  # [rows*S, cols*S]
    tiles = [canvas.crop((x, y, x + image_size, y + image_size))  # row-major
             for y in range(0, rows * image_size, image_size)
             for x in range(0, cols * image_size, image_size)]
    if use_thumbnail and len(tiles) != 1:
        # the thumbnail gives the global view that single tiles lack (InternVL 1.5 / 2.5)
        tiles.append(img.resize((image_size, image_size), Image.BICUBIC))
    return tiles


# -----------------------------------------------------------------------------
# JPEG augmentation and tensors: dataset.py `simulate_jpeg_degradation`, `build_transform`

def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()  # decode now, before the buffer goes away
    return out


def jpeg_compress(tile: Image.Image, rng: random.Random) -> Image.Image:
    """Re-encode as JPEG at a random quality in 75..100 (InternVL2.5 "random JPEG compression")."""
    return jpeg_roundtrip(tile, rng.randint(75, 100))  # randint includes 100


def tiles_to_tensor(tiles: list[Image.Image], image_size: int = 448) -> torch.Tensor:
    """Tiles -> FloatTensor [N,3,S,S]: resized to S×S (no-op for tiles), in [0,1], normalised."""
    mean, std = np.array(IMAGENET_MEAN, dtype=np.float32), np.array(IMAGENET_STD, dtype=np.float32)
    out = []
    for tile in tiles:
        tile = tile.convert("RGB")
        if tile.size != (image_size, image_size):
            tile = tile.resize((image_size, image_size), Image.BICUBIC)
        x = (np.asarray(tile, dtype=np.float32) / 255.0 - mean) / std  # [S,S,3], from [0,1]
        out.append(x.transpose(2, 0, 1))  # [S,S,3] -> [3,S,S]
    return torch.from_numpy(np.stack(out)) if out else torch.zeros(0, 3, image_size, image_size)


# -----------------------------------------------------------------------------
# entry points

def preprocess_image(img: Image.Image, max_num: int = 12, image_size: int = 448,
                     use_thumbnail: bool = True, augment_rng: random.Random | None = None,
                     min_num: int = 1) -> torch.Tensor:
    """A PIL image in memory -> FloatTensor [N,3,S,S]; augment_rng JPEG-compresses each tile."""
    tiles = dynamic_preprocess(img, min_num, max_num, image_size, use_thumbnail)
    if augment_rng is not None:
        # after tiling: each tile and the thumbnail independently, as upstream
        tiles = [jpeg_compress(t, augment_rng) for t in tiles]
    return tiles_to_tensor(tiles, image_size)


def lost_in_rgb(img: Image.Image) -> str | None:
    """What img.convert("RGB") (the reference's `Image.open(p).convert('RGB')`) loses, or None."""
    if (n := getattr(img, "n_frames", 1)) > 1:
        return (f"an animated image of {n} frames: only the first is used (sample.py --video "
                "samples its frames)")
    if "A" in img.getbands() or "transparency" in img.info:
        with warnings.catch_warnings():  # Pillow's advice on palette transparency, not ours
            warnings.simplefilter("ignore")
            if img.convert("RGBA").getextrema()[3][0] < 255:
                return "transparent areas take their stored colour (the alpha channel is dropped)"
    if img.mode.startswith(("I", "F")):  # 32-bit int, 16-bit, float
        lo, hi = img.getextrema()
        if lo < 0 or hi > 255:
            return f"{img.mode} pixel values {lo}..{hi} are clipped to 0..255"
    return None


_warned = set()  # one warning per file: sample.py may cut an image twice (policy, critic)


def open_image(path) -> Image.Image:
    """Open and fully decode an image file as RGB; any failure is one UserError naming the file.
    A picture that RGB loses part of (lost_in_rgb) is converted all the same, with one warning."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()  # PIL decodes lazily: force it, so a truncated file fails now, with the path
            if (lost := lost_in_rgb(img)) and str(path) not in _warned:
                _warned.add(str(path))
                eprint(f"warning: {path}: {lost}")
            return img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: image too large ({e})")
    except (OSError, SyntaxError, ValueError) as e:
        # UnidentifiedImageError (not an image) and "image file is truncated" are both OSErrors
        reason = "not an image file" if isinstance(e, Image.UnidentifiedImageError) \
            else f"unreadable image ({e})"
        raise UserError(f"{path}: {reason}")


def load_image(path, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True,
               augment_rng: random.Random | None = None) -> torch.Tensor:
    """Image file -> FloatTensor [N,3,S,S] of InternVL tiles, as `load_image` of the model card."""
    return preprocess_image(open_image(path), max_num, image_size, use_thumbnail, augment_rng)


def tiles_per_image(budget: int, n_images: int) -> int:
    """Training splits a sample's tile budget among its images (dataset.py, multi-image samples);
    the model card gives every image the whole budget at inference."""
    return max(1, budget // max(1, n_images))


def tile_budget(cfg, n_images: int, max_num: int | None = None, split: bool | None = None) -> int:
    """Most tiles for each of n_images images under model config `cfg`: max_num (None: its
    max_dynamic_patch), shared among the images when split (None: its split_tiles)."""
    budget = cfg.max_dynamic_patch if max_num is None else max_num
    split = cfg.split_tiles if split is None else split
    return tiles_per_image(budget, n_images) if split else budget


def load_images(paths, cfg, max_num: int | None = None,
                split: bool | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """Image files -> (tiles [N_k,3,S,S] of each image, N_k), cut as the model config `cfg` says
    (tile size, thumbnail, budget: tile_budget)."""
    per_image = tile_budget(cfg, len(paths), max_num, split)
    tiles = [load_image(p, per_image, cfg.vision.image_size, cfg.use_thumbnail) for p in paths]
    return tiles, [t.size(0) for t in tiles]


# -----------------------------------------------------------------------------
# video: the model card's `load_video` and `get_index`, with no time bound

def frame_indices(n_frames: int, num_segments: int) -> list[int]:
    """The middle frame of each of num_segments equal segments of 0..n_frames-1 (`get_index`:
    seg = max_frame / N, index_i = int(seg/2 + round(seg*i)), round half to even as np.round)."""
    seg = (n_frames - 1) / num_segments
    return [int(seg / 2 + round(seg * i)) for i in range(num_segments)]


def load_video(path, num_frames: int = 8, image_size: int = 448
               ) -> tuple[torch.Tensor, list[int], int]:
    """An animated GIF / WebP / APNG, or a directory of frame images sorted by file name ->
    (frames [num_frames,3,S,S], the chosen frame indices, the frame count). Each frame is cut with
    max_num=1: one S×S bicubic resize, no thumbnail, as the model card does for video."""
    if num_frames < 1:
        raise UserError(f"--num-frames {num_frames}: must be at least 1")
    if os.path.isdir(path):
        exts = Image.registered_extensions()  # the extensions Pillow can open
        files = sorted(f for f in os.listdir(path)
                       if os.path.splitext(f)[1].lower() in exts and not f.startswith("."))
        if not files:
            raise UserError(f"{path}: no image files in this directory (--video wants an animated "
                            "GIF / WebP / APNG or a directory of frame images)")
        index = frame_indices(len(files), num_frames)
        frames, total = [open_image(os.path.join(path, files[i])) for i in index], len(files)
    elif os.path.isfile(path):
        try:
            with Image.open(path) as img:
                if (total := getattr(img, "n_frames", 1)) < 2:
                    raise UserError(f"{path}: a still image, not a video (--video wants an "
                                    "animated GIF / WebP / APNG or a directory of frame images; "
                                    "use --image for a still image)")
                index, frames = frame_indices(total, num_frames), []
                for i in index:
                    img.seek(i)
                    frames.append(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise UserError(f"{path}: not a readable video or image file ({e})")
    else:
        raise UserError(f"{path}: no such video file or directory")
    tiles = [preprocess_image(f, max_num=1, image_size=image_size) for f in frames]
    return torch.cat(tiles), index, total


# -----------------------------------------------------------------------------
# grounding: boxes normalised to 0..1000 (chat.parse_boxes) drawn on the image

BOX_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6"]


def draw_boxes(img: Image.Image, boxes: list[tuple[str, tuple[float, ...]]]) -> Image.Image:
    """A copy of img with each (label, (x1, y1, x2, y2)) box, coordinates in 0..1000, drawn on it:
    a coloured outline and the label on a filled strip at its top-left corner."""
    img = img.convert("RGB")  # a copy
    draw, (w, h) = ImageDraw.Draw(img), img.size
    width = max(1, round(min(w, h) / 150))
    for k, (label, (x1, y1, x2, y2)) in enumerate(boxes):
        colour = BOX_COLOURS[k % len(BOX_COLOURS)]
        xy = (x1 * w / 1000, y1 * h / 1000, x2 * w / 1000, y2 * h / 1000)
        draw.rectangle(xy, outline=colour, width=width)
        if label:
            left, top, right, bottom = draw.textbbox((xy[0], xy[1]), label)
            draw.rectangle((left, top, right + 2, bottom + 2), fill=colour)
            draw.text((xy[0] + 1, xy[1] + 1), label, fill="white")
    return img
