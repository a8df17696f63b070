"""Training data: the official InternVL formats (meta.json + JSONL) -> tokenised samples -> packed
or padded batches.

    specs = read_meta("data/toy/sft/meta.json")                 # one DatasetSpec per dataset
    stream = SampleStream(specs, tok, DataConfig(tokens_per_tile=16, image_size=112), seed=0)
    packs = pack_samples([next(stream) for _ in range(64)], max_packed_tokens=4096, max_tiles=48)
    batch = collate_packed(packs[0], pad_id=tok.pad_id, image_size=112, max_len=4096)  # one row

JSONL lines by meta.json "kind" (ours; official files are all "sft"); a bad line raises UserError:
  sft          {"image": str | [str] | absent, "conversations": [{"from", "value"}, ...]}
  interleaved  {"image": [str], "text": "... <image> ... <image> ..."}   (native pre-training)
  text         {"text": "..."}                                            (pure-text pre-training)
  preference   {"image", "question", "chosen", "rejected"}               (MMPR, read by mpo.py)
labels[t] is the target of *token t*, predicted from position t-1 (the losses shift by one), and
loss_weight[t] goes with it. Shapes: T tokens, N tiles, S tile side (a tile: an image crop).
References: InternVL3 (arXiv 2504.10479) §2.2 native pre-training, §2.3 SFT; InternVL2.5 (arXiv
2412.05271) "Training Enhancements" (random JPEG compression, loss reweighting); upstream
OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py (`len2weight`, `preprocess_internvl2_5`),
dataset_packed.py (`PackedDataset`), internvl_chat_finetune.py.
Tests: python -m pytest -q tests/test_data.py"""

import functools
import math
import os
import random
from dataclasses import dataclass, field

import torch
from PIL import Image

from nanovl3.chat import expand_image_tokens, tokenize_conversation
from nanovl3.common import UserError, read_json, read_jsonl
from nanovl3.image import load_image, preprocess_image, tiles_per_image
from nanovl3.losses import IGNORE

KINDS = ("sft", "interleaved", "text", "preference")

# -----------------------------------------------------------------------------
# reading meta.json and JSONL files

@dataclass
class DatasetSpec:
    name: str
    root: str  # image root, absolute
    annotation: str  # JSONL path, absolute
    repeat_time: float = 1.0  # <1 subsamples, >1 repeats (weight in the mix: size x repeat_time)
    data_augment: bool = False  # random JPEG quality per tile (image.jpeg_compress)
    max_dynamic_patch: int | None = None  # tile budget per sample; None = DataConfig's
    kind: str = "sft"


def read_meta(meta_path) -> list[DatasetSpec]:
    """The official meta.json: {name: {root, annotation, repeat_time, data_augment?,
    max_dynamic_patch?, kind?}}; relative paths start at the meta file's directory."""
    meta = read_json(meta_path, "meta file")
    if not isinstance(meta, dict) or not meta:
        raise UserError(f"{meta_path}: expected a JSON object "
                        "{name: {root, annotation, repeat_time}}")
    here = os.path.dirname(os.path.abspath(meta_path))
    specs = []
    for name, d in meta.items():
        where = f"{meta_path}: dataset '{name}'"
        if not isinstance(d, dict) or not isinstance(d.get("annotation"), str):
            raise UserError(f"{where}: needs an 'annotation' (path of a .jsonl file)")
        if not isinstance(d.get("root", ""), str):
            raise UserError(f"{where}: 'root' must be a path (the image directory)")
        repeat = d.get("repeat_time", 1.0)
        if not isinstance(repeat, (int, float)) or repeat <= 0:
            raise UserError(f"{where}: 'repeat_time' must be a number > 0, got {repeat!r}")
        kind = d.get("kind", "sft")
        if kind not in KINDS:
            raise UserError(f"{where}: unknown 'kind' {kind!r} (use one of {', '.join(KINDS)})")
        mdp = d.get("max_dynamic_patch")
        if mdp is not None and (not isinstance(mdp, int) or mdp < 1):
            raise UserError(f"{where}: 'max_dynamic_patch' must be an integer >= 1, got {mdp!r}")
        root, annotation = (os.path.join(here, d.get(k, "")) for k in ("root", "annotation"))
        augment = bool(d.get("data_augment", False))
        specs.append(DatasetSpec(name, root, annotation, float(repeat), augment, mdp, kind))
    return specs


# -----------------------------------------------------------------------------
# one line -> one Sample

@dataclass
class DataConfig:
    tokens_per_tile: int = 256  # model cfg.num_image_token
    image_size: int = 448  # model cfg.vision.image_size
    max_dynamic_patch: int = 12  # tiles per sample unless meta.json says otherwise
    use_thumbnail: bool = True
    max_seq_len: int = 16384
    system_message: str | None = None  # None = the template's default


@dataclass
class Sample:
    input_ids: torch.Tensor  # LongTensor [T], image tokens expanded
    labels: torch.Tensor  # LongTensor [T], IGNORE = no loss; labels[0] is made IGNORE
    pixel_values: torch.Tensor | None  # [N,3,S,S], tiles of all images in order; None for text
    num_tiles: list[int]  # tiles per image, sum = N
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end): <img>..</img>
    source: str = ""  # "file:line", for messages

    def __post_init__(self):
        # token 0 has no context in its sample, so it is never a target; the one home of this rule,
        # which also keeps a packed document from being predicted from the one before it
        if len(self.labels) and self.labels[0] != IGNORE:
            self.labels = torch.cat([self.labels.new_full((1,), IGNORE), self.labels[1:]])


def truncate(s: Sample, max_tokens: int, max_tiles: int | None = None) -> Sample:
    """Cut a sample to <= max_tokens tokens and <= max_tiles tiles without splitting an image
    span: the cut moves back to the <img> of the first image that does not fit whole."""
    if len(s.image_spans) != len(s.num_tiles):
        raise ValueError(f"{s.source}: Sample.image_spans must give the token span of each of its "
                         "images")
    cut, keep, tiles = min(len(s.input_ids), max_tokens), 0, 0
    for (start, end), n in zip(s.image_spans, s.num_tiles):
        if end > cut or (max_tiles is not None and tiles + n > max_tiles):
            cut = min(cut, start)
            break
        keep, tiles = keep + 1, tiles + n
    if cut == len(s.input_ids) and keep == len(s.num_tiles):
        return s
    pixels = s.pixel_values[:tiles] if keep else None  # [N',3,S,S]
    return Sample(s.input_ids[:cut], s.labels[:cut], pixels, s.num_tiles[:keep],
                  s.image_spans[:keep], s.source)


def _images(record, where, root, n_tags, cfg, max_dynamic_patch, augment_rng):
    """Load the line's images -> (pixel_values [N,3,S,S] | None, tiles per image)."""
    paths = record.get("image")
    paths = [] if paths is None else [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise UserError(f"{where}: 'image' must be a path or a list of paths")
    if n_tags != len(paths):
        raise UserError(f"{where}: {n_tags} <image> placeholder(s) but {len(paths)} image(s)")
    if not paths:
        return None, []
    max_num = tiles_per_image(max_dynamic_patch or cfg.max_dynamic_patch, len(paths))
    tiles = []
    for p in paths:
        try:
            tiles.append(load_image(os.path.join(root, p), max_num, cfg.image_size,
                                    cfg.use_thumbnail, augment_rng))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return torch.cat(tiles), [t.size(0) for t in tiles]  # [N,3,S,S]


def _finish(tok, ids, labels, pixels, num_tiles, where, cfg) -> Sample:
    """Common tail: locate image spans, truncate to max_seq_len, insist on a supervised token."""
    ids, labels = torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
    starts = (ids == tok.img_start_id).nonzero().flatten().tolist()
    if len(starts) != len(num_tiles):
        raise UserError(f"{where}: {len(starts)} <img> tokens for {len(num_tiles)} images "
                        "(is <img> in the text?)")
    spans = [(a, a + 2 + n * cfg.tokens_per_tile) for a, n in zip(starts, num_tiles)]  # <img>...
    s = truncate(Sample(ids, labels, pixels, num_tiles, spans, where), cfg.max_seq_len)
    if not (s.labels != IGNORE).any():
        raise UserError(f"{where}: no supervised token (after truncation to {cfg.max_seq_len} "
                        "tokens)")
    return s


def _tokenize(tok, conv, num_tiles, cfg, where):
    try:
        return tokenize_conversation(tok, conv, num_tiles, cfg.tokens_per_tile, cfg.system_message)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def sft_sample(tok, record, where, cfg: DataConfig, root="", max_dynamic_patch=None,
               augment_rng=None) -> Sample:
    """Official SFT line -> Sample, loss on the answers + <|im_end|> (`preprocess_internvl2_5`)."""
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise UserError(f"{where}: empty conversation ('conversations' must be a non-empty list "
                        "of turns)")
    # tokenize_conversation reports malformed turns; here only well-formed human turns are looked at
    human = [i for i, t in enumerate(convs) if isinstance(t, dict) and t.get("from") == "human"
             and isinstance(t.get("value"), str)]
    n_tags = sum(convs[i]["value"].count("<image>") for i in human)
    if n_tags == 0 and isinstance(record.get("image"), str) and human:
        # one image and no placeholder: the official loader prepends it to the first question
        convs = list(convs)
        convs[human[0]] = {**convs[human[0]], "value": "<image>\n" + convs[human[0]]["value"]}
        n_tags = 1
    pixels, num_tiles = _images(record, where, root, n_tags, cfg, max_dynamic_patch, augment_rng)
    ids, labels = _tokenize(tok, convs, num_tiles, cfg, where)
    return _finish(tok, ids, labels, pixels, num_tiles, where, cfg)


def interleaved_sample(tok, record, where, cfg: DataConfig, root="", max_dynamic_patch=None,
                       augment_rng=None) -> Sample:
    """Image-text document -> Sample with next-token loss on text tokens only (InternVL3 §2.2)."""
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: 'text' must be a non-empty string")
    n_tags = text.count("<image>")
    pixels, num_tiles = _images(record, where, root, n_tags, cfg, max_dynamic_patch, augment_rng)
    ids = tok.encode(expand_image_tokens(text, num_tiles, cfg.tokens_per_tile)) + [tok.endoftext_id]
    image_ids = {tok.img_context_id, tok.img_start_id, tok.img_end_id}
    labels = [IGNORE if i in image_ids else i for i in ids]  # visual tokens: context, never targets
    return _finish(tok, ids, labels, pixels, num_tiles, where, cfg)


def text_sample(tok, record, where, cfg: DataConfig, *_) -> Sample:
    """Pure text -> tokens + <|endoftext|>, every token supervised."""
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: 'text' must be a non-empty string")
    if "<image>" in text:
        raise UserError(f"{where}: <image> placeholder in a text-only line")
    ids = tok.encode(text) + [tok.endoftext_id]
    return _finish(tok, ids, list(ids), None, [], where, cfg)


def preference_sample(tok, record, where, cfg: DataConfig, root="", max_dynamic_patch=None,
                      augment_rng=None) -> tuple[Sample, Sample]:
    """MMPR line -> (chosen, rejected): two single-turn SFT samples on the same question and tiles,
    whose labels (answer + <|im_end|>) are what log π(y|x) sums over in MPO. A question without tags
    gets "<image>\\n" per image first, as upstream internvl_chat_mpo.py does."""
    for key in ("question", "chosen", "rejected"):
        if not isinstance(record.get(key), str):
            raise UserError(f"{where}: preference line needs a string '{key}'")
        if not record[key].strip():
            raise UserError(f"{where}: '{key}' is empty")
    if record["chosen"].strip() == record["rejected"].strip():
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same answer (nothing to prefer)")
    question, image = record["question"], record.get("image")
    n_images = 0 if image is None else 1 if isinstance(image, str) else len(image)
    if "<image>" not in question and n_images:
        question = "<image>\n" * n_images + question
    n_tags = question.count("<image>")
    pixels, num_tiles = _images(record, where, root, n_tags, cfg, max_dynamic_patch, augment_rng)
    pair = []
    for key in ("chosen", "rejected"):
        conv = [{"from": "human", "value": question}, {"from": "gpt", "value": record[key]}]
        ids, labels = _tokenize(tok, conv, num_tiles, cfg, where)
        pair.append(_finish(tok, ids, labels, pixels, num_tiles, f"{where} ({key})", cfg))
    if [len(s.num_tiles) for s in pair] != [len(num_tiles)] * 2:
        raise UserError(f"{where}: the question does not fit in {cfg.max_seq_len} tokens with its "
                        "images")
    return pair[0], pair[1]


def build_sample(tok, spec: DatasetSpec, lineno: int, record: dict, cfg: DataConfig,
                 augment_rng=None):
    """Dispatch on the dataset kind -> a Sample (a (chosen, rejected) pair for preference data);
    augment_rng is used only when the dataset has data_augment."""
    where = f"{spec.annotation}:{lineno}"
    build = {"sft": sft_sample, "interleaved": interleaved_sample, "text": text_sample,
             "preference": preference_sample}
    if spec.kind not in build:
        raise UserError(f"{where}: unknown dataset kind '{spec.kind}'")
    return build[spec.kind](tok, record, where, cfg, spec.root, spec.max_dynamic_patch,
                            augment_rng if spec.data_augment else None)


# -----------------------------------------------------------------------------
# a deterministic, resumable, sharded stream of samples

def _rng(seed: int, *keys) -> random.Random:
    # string seeds hash with sha512: the same numbers on every machine and run
    return random.Random("/".join(map(str, (seed,) + keys)))


class SampleStream:
    """An endless stream of Samples over datasets, the same for a given seed on every run.

    Mixing: one pool where dataset d appears round(size_d x repeat_time_d) times per epoch (as the
    official ConcatDataset); with text_ratio=r, "text" datasets and the others are two pools with
    their own epochs, a draw taking the text pool with probability r (InternVL3 §2.2's 1:3
    language:multimodal is r = 0.25). Epoch e of a pool is a shuffle seeded by (seed, pool, e).
    Draw n goes to rank n % world_size: all ranks walk the same sequence and build only their own
    draws, so the shards are disjoint. State: the draw counter and per-pool cursors, per rank (ranks
    that skip bad lines drift apart; rank 0's state on every rank still gives disjoint data).
    skip_bad: a bad line is remembered (never built again) and reported by `skip_report`; only a
    pool whose every line is bad raises."""

    def __init__(self, specs: list[DatasetSpec], tok, cfg: DataConfig, seed: int = 0, rank: int = 0,
                 world_size: int = 1, text_ratio: float | None = None, skip_bad: bool = False):
        self.specs, self.tok, self.cfg, self.seed = specs, tok, cfg, seed
        self.rank, self.world_size, self.skip_bad = rank, world_size, skip_bad
        unreadable = [] if skip_bad else None  # malformed lines, counted with the other bad samples
        self.rows = [read_jsonl(s.annotation, unreadable) for s in specs]
        self.pools, self.mix = [list(range(len(specs)))], [1.0]
        if text_ratio is not None:
            if not 0 <= text_ratio <= 1:
                raise UserError(f"text ratio must be in [0, 1], got {text_ratio}")
            self.pools = [[i for i, s in enumerate(specs) if (s.kind == "text") == t]
                          for t in (0, 1)]
            self.mix = [1 - text_ratio, text_ratio]
        self._orders = {}  # pool -> (epoch, order): the current epoch of each pool
        for pool, w in enumerate(self.mix):
            if w > 0 and not self._order(pool, 0):
                what = ["non-text", "text"][pool] if text_ratio is not None else "the"
                files = ", ".join(self.specs[d].annotation for d in self.pools[pool]) or "(none)"
                raise UserError(f"no lines to draw from in {what} datasets: {files}")
        self.draws, self.cursors = 0, [[0, 0] for _ in self.pools]
        self.unreadable, self.last_error = len(unreadable or []), (unreadable or [None])[-1]
        self.bad = set()  # (dataset, row) of the lines that failed to build: lines, not draws

    def _order(self, pool: int, epoch: int) -> list[tuple[int, int]]:
        """Epoch `epoch` of a pool: [(dataset index, row index)], repeats applied, shuffled."""
        if self._orders.get(pool, (None,))[0] != epoch:
            rng, order = _rng(self.seed, "order", pool, epoch), []
            for d in self.pools[pool]:
                n = len(self.rows[d])
                whole, frac = divmod(self.specs[d].repeat_time, 1.0)
                order += [(d, r) for _ in range(int(whole)) for r in range(n)]
                order += [(d, r) for r in rng.sample(range(n), round(frac * n))]  # the fraction
            rng.shuffle(order)
            self._orders[pool] = (epoch, order)
        return self._orders[pool][1]

    def _next_entry(self) -> tuple[int, int, tuple[int, int]]:
        """Advance one global draw -> (draw number, pool, (dataset, row))."""
        n, pool = self.draws, 0
        if len(self.pools) > 1:
            pool = int(_rng(self.seed, "mix", n).random() < self.mix[1])
        epoch, pos = self.cursors[pool]
        order = self._order(pool, epoch)
        self.cursors[pool] = [epoch, pos + 1] if pos + 1 < len(order) else [epoch + 1, 0]
        self.draws += 1
        return n, pool, order[pos]

    def __iter__(self):
        return self

    def __next__(self) -> Sample:
        while True:
            n, pool, (d, r) = self._next_entry()
            if n % self.world_size != self.rank or (d, r) in self.bad:
                continue  # another rank's draw, or a line already known to be bad
            lineno, record = self.rows[d][r]
            try:
                return build_sample(self.tok, self.specs[d], lineno, record, self.cfg,
                                    _rng(self.seed, "jpeg", n))
            except UserError as e:
                if not self.skip_bad:
                    raise
                self.bad.add((d, r))
                self.last_error = str(e)
                lines = sum(len(self.rows[i]) for i in self.pools[pool])
                if sum(i in self.pools[pool] for i, _ in self.bad) == lines:
                    files = ", ".join(self.specs[i].annotation for i in self.pools[pool])
                    raise UserError(f"{files}: every one of the {lines} readable lines is bad; "
                                    f"last: {e}")

    @property
    def skipped(self) -> int:
        """Bad lines met so far: unreadable ones, then those that failed to build."""
        return self.unreadable + len(self.bad)

    def skip_report(self) -> str:
        lines = self.unreadable + sum(map(len, self.rows))
        return (f"skipped {self.skipped} bad lines of {lines} (each once; last: "
                f"{self.last_error})")

    @property
    def epoch(self) -> int:
        """Completed epochs of the slowest pool that is drawn from."""
        return min(c[0] for c, w in zip(self.cursors, self.mix) if w > 0)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "sizes": [len(r) for r in self.rows], "draws": self.draws,
                "cursors": [list(c) for c in self.cursors], "bad": sorted(self.bad)}

    def load_state_dict(self, state: dict):
        sizes = [len(r) for r in self.rows]
        if state["seed"] != self.seed or state["sizes"] != sizes:
            raise UserError(f"data cursor from the checkpoint (seed {state['seed']}, sizes "
                            f"{state['sizes']}) does not match this data (seed {self.seed}, "
                            f"sizes {sizes})")
        self.draws, self.bad = state["draws"], {tuple(e) for e in state.get("bad", [])}
        self.cursors = [list(c) for c in state["cursors"]]


# -----------------------------------------------------------------------------
# loss weights (dataset.py `len2weight`), packing (dataset_packed.py `PackedDataset`), collation

def loss_weights(labels: torch.Tensor, mode: str = "square") -> torch.Tensor:
    """labels [T] of ONE Sample -> weights [T] aligned with labels: each of its n supervised tokens
    gets 1 ("token"), 1/n ("sample") or 1/sqrt(n) ("square": InternVL2.5 "Training Enhancements",
    InternVL3), the others 0. A Sample's labels[0] is IGNORE, so token 0 never counts."""
    if mode not in ("token", "sample", "square"):
        raise ValueError(f"loss_weights: mode must be token, sample or square, got {mode!r}")
    sup = labels != IGNORE  # [T] bool
    n = int(sup.sum())
    w = {"token": 1.0, "sample": 1.0 / max(n, 1), "square": 1.0 / math.sqrt(max(n, 1))}[mode]
    return sup.float() * w  # [T]; all zeros when n = 0


def pack_samples(samples: list[Sample], max_packed_tokens: int,
                 max_tiles: int) -> list[list[Sample]]:
    """Greedy first-fit packing into packs of <= max_packed_tokens tokens and <= max_tiles tiles: a
    sample goes into the first pack with room, else opens one; packs stay sorted by tile count, most
    first (upstream's buffer list). Unlike PackedDataset: one given window, every pack returned (no
    max_buffer_size emission, no strict_mode tile padding); an over-long sample is truncated (its
    tail dropped, not re-chunked), and one left without supervised tokens dropped."""
    packs, used = [], []  # per pack: its samples, [tokens, tiles]
    for s in samples:
        s = truncate(s, max_packed_tokens, max_tiles)
        if not (s.labels != IGNORE).any():
            continue
        T, N = len(s.input_ids), sum(s.num_tiles)
        room = [t + T <= max_packed_tokens and n + N <= max_tiles for t, n in used]
        k = room.index(True) if any(room) else None
        if k is None:  # no room anywhere: open a new pack
            k, packs, used = len(packs), packs + [[]], used + [[0, 0]]
        packs[k].append(s)
        used[k] = [used[k][0] + T, used[k][1] + N]
        order = sorted(range(len(packs)), key=lambda i: -used[i][1])  # stable: ties keep order
        packs, used = [packs[i] for i in order], [used[i] for i in order]
    return packs


@functools.cache
def dummy_tile(image_size: int) -> torch.Tensor:
    """One white tile [1,3,S,S] (upstream's blank 224x224 image)."""
    return preprocess_image(Image.new("RGB", (224, 224), (255, 255, 255)), 1, image_size, False)


def _pixels(samples: list[Sample], image_size: int):
    """-> pixel_values [N,3,S,S], image_flags [N]. Without any real tile: one dummy tile flagged 0,
    so the ViT always takes part in the forward (its features dropped) and DDP sees a gradient for
    every parameter without find_unused_parameters (as upstream does for pure-text samples)."""
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None and len(s.pixel_values)]
    if not tiles:
        return dummy_tile(image_size), torch.zeros(1, dtype=torch.long)
    pixels = torch.cat(tiles)  # [N,3,S,S]
    return pixels, torch.ones(pixels.size(0), dtype=torch.long)


def _row(samples: list[Sample], T: int, pad_id: int, loss_reduction: str) -> dict:
    """Samples one after another in a row of T tokens -> dict of [T] tensors, padded at the end."""
    row = {"input_ids": torch.full((T,), pad_id), "labels": torch.full((T,), IGNORE),
           "position_ids": torch.zeros(T, dtype=torch.long), "doc_ids": torch.full((T,), -1),
           "loss_weight": torch.zeros(T)}
    t = 0
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        row["input_ids"][t:t + n], row["labels"][t:t + n] = s.input_ids, s.labels
        row["position_ids"][t:t + n], row["doc_ids"][t:t + n] = torch.arange(n), i  # restart at 0
        row["loss_weight"][t:t + n] = loss_weights(s.labels, loss_reduction)  # each its own n_s
        t += n
    return row


def collate_packed(samples: list[Sample], pad_id: int, image_size: int = 448,
                   max_len: int | None = None, pad_multiple: int = 8,
                   loss_reduction: str = "square") -> dict:
    """One pack -> a batch of ONE row: input_ids, labels, position_ids (from 0 per sample), doc_ids
    (0, 1, 2, ... per sample; -1 = padding), loss_weight (loss_weights per sample), all [1,T] with
    T = max_len if given (static shapes), else the total rounded up to pad_multiple; pixel_values
    [N,3,S,S] and image_flags [N] hold all tiles in order."""
    total = sum(len(s.input_ids) for s in samples)
    T = max_len if max_len is not None else -(-total // pad_multiple) * pad_multiple
    if total > T:
        raise ValueError(f"collate_packed: {total} tokens do not fit in max_len={T}")
    batch = {k: v[None] for k, v in _row(samples, T, pad_id, loss_reduction).items()}  # [1,T] each
    batch["pixel_values"], batch["image_flags"] = _pixels(samples, image_size)
    return batch


def collate_padded(samples: list[Sample], pad_id: int, image_size: int = 448,
                   loss_reduction: str = "token") -> dict:
    """B samples -> B rows right-padded to the longest (the unpacked baseline), keys as
    collate_packed; token averaging by default, as upstream's unpacked SFT recipe."""
    T = max(len(s.input_ids) for s in samples)
    rows = [_row([s], T, pad_id, loss_reduction) for s in samples]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # [B,T] each
    batch["pixel_values"], batch["image_flags"] = _pixels(samples, image_size)
    return batch


class PackedStream:
    """Packs from a SampleStream, window by window: draw `window` samples, pack them, hand out the
    packs in order. Resumable exactly: the state is the stream's state at the start of the window
    plus the number of packs handed out; loading it redraws the window and skips those packs."""

    def __init__(self, stream: SampleStream, max_packed_tokens: int, max_tiles: int,
                 window: int = 64):
        self.stream, self.window = stream, window
        self.max_tokens, self.max_tiles = max_packed_tokens, max_tiles
        self.start, self.packs, self.given = stream.state_dict(), [], 0

    def __iter__(self):
        return self

    def __next__(self) -> list[Sample]:
        while self.given >= len(self.packs):
            self.start = self.stream.state_dict()
            samples = [next(self.stream) for _ in range(self.window)]
            self.packs, self.given = pack_samples(samples, self.max_tokens, self.max_tiles), 0
        self.given += 1
        return self.packs[self.given - 1]

    def state_dict(self) -> dict:
        return {"stream": self.start, "given": self.given}

    def load_state_dict(self, state: dict):
        self.stream.load_state_dict(state["stream"])
        self.packs, given = [], state["given"]
        if given:
            next(self)  # redraw and repack the window, then skip what was handed out
            self.given = given
