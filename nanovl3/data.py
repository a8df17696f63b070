"""
Training data: the official InternVL formats (meta.json + JSONL) -> tokenised samples -> packed or padded batches.

    specs = read_meta("data/toy/sft/meta.json")                 # one DatasetSpec per dataset
    stream = SampleStream(specs, tok, DataConfig(tokens_per_tile=16, image_size=112), seed=0, rank=0, world_size=1)
    packs = pack_samples([next(stream) for _ in range(64)], max_packed_tokens=4096, max_tiles=48)
    batch = collate_packed(packs[0], pad_id=tok.pad_id, image_size=112, max_len=4096)   # one row, SPEC §6.4

Three kinds of JSONL line (meta.json "kind", our extension; the official files are all "sft"):
  sft          {"image": str | [str] | absent, "conversations": [{"from": "human"|"gpt"|"system", "value"}]}
  interleaved  {"image": [str], "text": "... <image> ... <image> ..."}   (native multimodal pre-training)
  text         {"text": "..."}                                            (pure-text pre-training)
  preference   {"image": ..., "question": "...", "chosen": "...", "rejected": "..."}   (MMPR, read by mpo.py)
Every bad line raises UserError("file:line: why").

Label convention: labels[t] is the target of *token t*, predicted from position t-1 (lm_loss shifts by one).
labels[0] is always -100 (token 0 has no context), and loss_weight[t] goes with labels[t].

Shapes: T tokens, N tiles, S tile side in pixels. A tile is an image crop; never a ViT patch.
References: InternVL3 (arXiv 2504.10479) §2.2 native pre-training, §2.3 SFT; InternVL2.5 (arXiv 2412.05271) §4
(JPEG augmentation, square loss averaging, packing); upstream OpenGVLab/InternVL internvl_chat/internvl/train/
dataset.py (len2weight, preprocess_internvl2_5), dataset_packed.py (PackedDataset), internvl_chat_finetune.py.
Tests: python -m pytest -q tests/test_data.py
"""

import json
import math
import os
import random
from dataclasses import dataclass, field

import torch
from PIL import Image

from nanovl3.chat import expand_image_tokens, tokenize_conversation
from nanovl3.common import UserError
from nanovl3.image import load_image, preprocess_image, tiles_per_image

IGNORE = -100  # label of a token that gets no loss
KINDS = ("sft", "interleaved", "text", "preference")

# -----------------------------------------------------------------------------
# reading meta.json and JSONL files


@dataclass
class DatasetSpec:
    name: str
    root: str  # image root, absolute
    annotation: str  # JSONL path, absolute
    repeat_time: float = 1.0  # <1 subsamples, >1 repeats (weight in the mix is size x repeat_time)
    data_augment: bool = False  # random JPEG quality per tile (SPEC §3.3)
    max_dynamic_patch: int | None = None  # tile budget per sample; None = DataConfig's
    kind: str = "sft"


def read_meta(meta_path) -> list[DatasetSpec]:
    """The official meta.json: {name: {root, annotation, repeat_time, data_augment?, max_dynamic_patch?, kind?}}.

    Relative root/annotation paths are resolved from the meta file's directory.
    """
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{meta_path}: no such meta file")
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}:{e.lineno}: malformed JSON: {e.msg}")
    if not isinstance(meta, dict) or not meta:
        raise UserError(f"{meta_path}: expected a JSON object {{name: {{root, annotation, repeat_time}}}}")
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
        specs.append(DatasetSpec(name, os.path.join(here, d.get("root", "")), os.path.join(here, d["annotation"]),
                                 float(repeat), bool(d.get("data_augment", False)), mdp, kind))
    return specs


def read_jsonl(path, bad: list | None = None) -> list[tuple[int, dict]]:
    """-> [(line number (1-based), object)]; blank lines are skipped.

    A line that is not a JSON object raises a UserError naming file and line, or, when a `bad` list is given
    (--skip-bad-samples), is skipped and its message appended to `bad`.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such annotation file")
    rows = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    obj = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{lineno}: not UTF-8 text")
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})")
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            except UserError as e:
                if bad is None:
                    raise
                bad.append(str(e))
                continue
            rows.append((lineno, obj))
    return rows


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
    labels: torch.Tensor  # LongTensor [T], IGNORE = no loss; labels[0] is always IGNORE
    pixel_values: torch.Tensor | None  # [N,3,S,S], tiles of all images in order; None for text
    num_tiles: list[int]  # tiles per image, sum = N
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each <img>...</img>
    source: str = ""  # "file:line", for messages


def truncate(s: Sample, max_tokens: int, max_tiles: int | None = None) -> Sample:
    """Cut a sample to <= max_tokens tokens and <= max_tiles tiles without splitting an image span:
    the cut moves back to the <img> of the first image that does not fit whole, whose tiles are dropped."""
    if len(s.image_spans) != len(s.num_tiles):
        raise ValueError(f"{s.source}: Sample.image_spans must give the token span of each of its images")
    cut, keep, tiles = min(len(s.input_ids), max_tokens), 0, 0
    for (start, end), n in zip(s.image_spans, s.num_tiles):
        if end > cut or (max_tiles is not None and tiles + n > max_tiles):
            cut = min(cut, start)
            break
        keep, tiles = keep + 1, tiles + n
    if cut == len(s.input_ids) and keep == len(s.num_tiles):
        return s
    pixels = s.pixel_values[:tiles] if keep else None  # [N',3,S,S]
    return Sample(s.input_ids[:cut], s.labels[:cut], pixels, s.num_tiles[:keep], s.image_spans[:keep], s.source)


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
    # multi-image lines share the tile budget (SPEC §3.6)
    max_num = tiles_per_image(max_dynamic_patch or cfg.max_dynamic_patch, len(paths))
    tiles = []
    for p in paths:
        try:
            tiles.append(load_image(os.path.join(root, p), max_num, cfg.image_size, cfg.use_thumbnail, augment_rng))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return torch.cat(tiles), [t.size(0) for t in tiles]  # [N,3,S,S]


def _finish(tok, ids, labels, pixels, num_tiles, where, cfg) -> Sample:
    """Common tail: locate image spans, truncate to max_seq_len, insist on a supervised token."""
    ids, labels = torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
    labels[0] = IGNORE  # token 0 is never predicted (also keeps packed documents from predicting across samples)
    starts = (ids == tok.img_start_id).nonzero().flatten().tolist()
    if len(starts) != len(num_tiles):
        raise UserError(f"{where}: {len(starts)} <img> tokens for {len(num_tiles)} images (is <img> in the text?)")
    spans = [(a, a + 2 + n * cfg.tokens_per_tile) for a, n in zip(starts, num_tiles)]  # <img> ctx*n*tpt </img>
    s = truncate(Sample(ids, labels, pixels, num_tiles, spans, where), cfg.max_seq_len)
    if not (s.labels != IGNORE).any():
        raise UserError(f"{where}: no supervised token (after truncation to {cfg.max_seq_len} tokens)")
    return s


def sft_sample(tok, record, where, cfg: DataConfig, root="", max_dynamic_patch=None, augment_rng=None) -> Sample:
    """Official SFT line -> Sample with loss on the assistant answers + <|im_end|> only (SPEC §4.5)."""
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise UserError(f"{where}: empty conversation ('conversations' must be a non-empty list of turns)")
    # malformed turns are reported by tokenize_conversation; here only well-formed human turns are looked at
    human = [i for i, t in enumerate(convs) if isinstance(t, dict) and t.get("from") == "human"
             and isinstance(t.get("value"), str)]
    n_tags = sum(convs[i]["value"].count("<image>") for i in human)
    if n_tags == 0 and isinstance(record.get("image"), str) and human:
        # one image and no placeholder: the official loader prepends it to the first question
        convs = list(convs)
        convs[human[0]] = {**convs[human[0]], "value": "<image>\n" + convs[human[0]]["value"]}
        n_tags = 1
    pixels, num_tiles = _images(record, where, root, n_tags, cfg, max_dynamic_patch, augment_rng)
    try:
        ids, labels = tokenize_conversation(tok, convs, num_tiles, cfg.tokens_per_tile, cfg.system_message)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return _finish(tok, ids, labels, pixels, num_tiles, where, cfg)


def interleaved_sample(tok, record, where, cfg: DataConfig, root="", max_dynamic_patch=None,
                       augment_rng=None) -> Sample:
    """Image-text document -> Sample with next-token loss on text tokens only (InternVL3 §2.2)."""
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: 'text' must be a non-empty string")
    pixels, num_tiles = _images(record, where, root, text.count("<image>"), cfg, max_dynamic_patch, augment_rng)
    ids = tok.encode(expand_image_tokens(text, num_tiles, cfg.tokens_per_tile)) + [tok.endoftext_id]
    image_ids = {tok.img_context_id, tok.img_start_id, tok.img_end_id}
    labels = [IGNORE if i in image_ids else i for i in ids]  # visual tokens are context, never targets
    return _finish(tok, ids, labels, pixels, num_tiles, where, cfg)


def text_sample(tok, record, where, cfg: DataConfig) -> Sample:
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
    """MMPR line -> (chosen, rejected): two single-turn SFT samples on the same question and the same tiles.

    Their labels cover each answer + <|im_end|>, the prompt masked as in SFT, which is exactly what log π(y|x)
    sums over in MPO (SPEC §7.1). "<image>\n" is prepended to the question when it has no tag (SPEC §7.4).
    """
    for key in ("question", "chosen", "rejected"):
        if not isinstance(record.get(key), str):
            raise UserError(f"{where}: preference line needs a string '{key}'")
        if not record[key].strip():
            raise UserError(f"{where}: '{key}' is empty")
    if record["chosen"].strip() == record["rejected"].strip():
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same answer (nothing to prefer)")
    question = record["question"]
    n_images = 0 if record.get("image") is None else 1 if isinstance(record["image"], str) else len(record["image"])
    if "<image>" not in question and n_images:
        question = "<image>\n" * n_images + question
    pixels, num_tiles = _images(record, where, root, question.count("<image>"), cfg, max_dynamic_patch, augment_rng)
    pair = []
    for key in ("chosen", "rejected"):
        conv = [{"from": "human", "value": question}, {"from": "gpt", "value": record[key]}]
        try:
            ids, labels = tokenize_conversation(tok, conv, num_tiles, cfg.tokens_per_tile, cfg.system_message)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        pair.append(_finish(tok, ids, labels, pixels, num_tiles, f"{where} ({key})", cfg))
    if [len(s.num_tiles) for s in pair] != [len(num_tiles)] * 2:
        raise UserError(f"{where}: the question does not fit in {cfg.max_seq_len} tokens with its images")
    return pair[0], pair[1]


def build_sample(tok, spec: DatasetSpec, lineno: int, record: dict, cfg: DataConfig, augment_rng=None):
    """Dispatch on the dataset kind -> a Sample (a (chosen, rejected) pair for preference data); augment_rng is
    used only when the dataset has data_augment."""
    where = f"{spec.annotation}:{lineno}"
    rng = augment_rng if spec.data_augment else None
    if spec.kind == "sft":
        return sft_sample(tok, record, where, cfg, spec.root, spec.max_dynamic_patch, rng)
    if spec.kind == "interleaved":
        return interleaved_sample(tok, record, where, cfg, spec.root, spec.max_dynamic_patch, rng)
    if spec.kind == "text":
        return text_sample(tok, record, where, cfg)
    if spec.kind == "preference":
        return preference_sample(tok, record, where, cfg, spec.root, spec.max_dynamic_patch, rng)
    raise UserError(f"{where}: unknown dataset kind '{spec.kind}'")


# -----------------------------------------------------------------------------
# a deterministic, resumable, sharded stream of samples


def _rng(seed: int, *keys) -> random.Random:
    # string seeds hash with sha512: the same numbers on every machine and run
    return random.Random("/".join(map(str, (seed,) + keys)))


class SampleStream:
    """An endless stream of Samples over datasets, the same for a given seed on every run.

    Mixing: by default all datasets form one pool where dataset d appears round(size_d x repeat_time_d) times
    per epoch (weight ∝ size x repeat_time, as the official ConcatDataset). With text_ratio=r, datasets of kind
    "text" and all others are two pools, each draw picks the text pool with probability r (pre-training: 1:3
    language:multimodal -> r = 0.25, InternVL3 §2.2), and each pool walks its own epochs.
    Epoch e of a pool is a shuffle seeded by (seed, pool, e). Global draw n goes to rank n % world_size: every
    rank walks the same global sequence and builds only its own draws, so the shards are disjoint.
    State = (global draw counter, per-pool cursor): a few ints, JSON-able; load it to continue exactly.
    The state is per rank (ranks that skip bad lines drift apart); loading rank 0's state on every rank still
    gives disjoint data. skip_bad: a bad line is counted in `skipped` (message in `last_error`) instead of raised.
    """

    def __init__(self, specs: list[DatasetSpec], tok, cfg: DataConfig, seed: int = 0, rank: int = 0,
                 world_size: int = 1, text_ratio: float | None = None, skip_bad: bool = False):
        self.specs, self.tok, self.cfg, self.seed = specs, tok, cfg, seed
        self.rank, self.world_size, self.skip_bad = rank, world_size, skip_bad
        unreadable = [] if skip_bad else None  # malformed lines, counted with the other bad samples
        self.rows = [read_jsonl(s.annotation, unreadable) for s in specs]
        if text_ratio is None:
            self.pools, self.mix = [list(range(len(specs)))], [1.0]
        elif 0 <= text_ratio <= 1:
            self.pools = [[i for i, s in enumerate(specs) if (s.kind == "text") == is_text] for is_text in (0, 1)]
            self.mix = [1 - text_ratio, text_ratio]
        else:
            raise UserError(f"text ratio must be in [0, 1], got {text_ratio}")
        self._orders = {}  # pool -> (epoch, order): the current epoch of each pool
        for pool, w in enumerate(self.mix):
            if w > 0 and not self._order(pool, 0):
                what = ["non-text", "text"][pool] if text_ratio is not None else "the"
                raise UserError(f"no lines to draw from in {what} datasets: "
                                f"{', '.join(self.specs[d].annotation for d in self.pools[pool]) or '(none)'}")
        self.draws, self.cursors = 0, [[0, 0] for _ in self.pools]
        self.skipped, self.last_error = len(unreadable or []), (unreadable or [None])[-1]

    def _order(self, pool: int, epoch: int) -> list[tuple[int, int]]:
        """Epoch `epoch` of a pool: [(dataset index, row index)], repeats applied, shuffled."""
        if self._orders.get(pool, (None,))[0] != epoch:
            rng, order = _rng(self.seed, "order", pool, epoch), []
            for d in self.pools[pool]:
                n = len(self.rows[d])
                whole, frac = divmod(self.specs[d].repeat_time, 1.0)
                order += [(d, r) for _ in range(int(whole)) for r in range(n)]
                order += [(d, r) for r in rng.sample(range(n), round(frac * n))]  # fractional part: a subset
            rng.shuffle(order)
            self._orders[pool] = (epoch, order)
        return self._orders[pool][1]

    def _next_entry(self) -> tuple[int, tuple[int, int]]:
        """Advance one global draw -> (draw number, (dataset, row))."""
        n, pool = self.draws, 0
        if len(self.pools) > 1:
            pool = int(_rng(self.seed, "mix", n).random() < self.mix[1])
        epoch, pos = self.cursors[pool]
        order = self._order(pool, epoch)
        entry = order[pos]
        self.cursors[pool] = [epoch, pos + 1] if pos + 1 < len(order) else [epoch + 1, 0]
        self.draws += 1
        return n, entry

    def __iter__(self):
        return self

    def __next__(self) -> Sample:
        bad_in_a_row = 0
        while True:
            n, (d, r) = self._next_entry()
            if n % self.world_size != self.rank:
                continue  # another rank's draw
            lineno, record = self.rows[d][r]
            try:
                return build_sample(self.tok, self.specs[d], lineno, record, self.cfg, _rng(self.seed, "jpeg", n))
            except UserError as e:
                if not self.skip_bad:
                    raise
                self.skipped, self.last_error, bad_in_a_row = self.skipped + 1, str(e), bad_in_a_row + 1
                if bad_in_a_row > sum(map(len, self.rows)):
                    raise UserError(f"every line is bad; last: {e}")

    @property
    def epoch(self) -> int:
        """Completed epochs of the slowest pool that is drawn from."""
        return min(c[0] for c, w in zip(self.cursors, self.mix) if w > 0)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "sizes": [len(r) for r in self.rows], "draws": self.draws,
                "cursors": [list(c) for c in self.cursors], "skipped": self.skipped}

    def load_state_dict(self, state: dict):
        if state["seed"] != self.seed or state["sizes"] != [len(r) for r in self.rows]:
            raise UserError(f"data cursor from the checkpoint (seed {state['seed']}, sizes {state['sizes']}) does "
                            f"not match this data (seed {self.seed}, sizes {[len(r) for r in self.rows]})")
        self.draws, self.skipped = state["draws"], state["skipped"]
        self.cursors = [list(c) for c in state["cursors"]]


# -----------------------------------------------------------------------------
# loss weights (SPEC §6.3)


def loss_weights(labels: torch.Tensor, mode: str = "square") -> torch.Tensor:
    """labels [T] of ONE sample -> weights [T], aligned with labels (lm_loss shifts both by one).

    n = supervised tokens of the sample; each gets w = 1 ("token"), 1/n ("sample") or 1/sqrt(n) ("square",
    InternVL2.5/3); unsupervised tokens get 0, and so does everything when n = 0. labels[0] is never predicted,
    so it is not counted.
    """
    if mode not in ("token", "sample", "square"):
        raise ValueError(f"loss_weights: mode must be token, sample or square, got {mode!r}")
    sup = labels != IGNORE  # [T] bool
    sup[:1] = False
    n = int(sup.sum())
    w = {"token": 1.0, "sample": 1.0 / max(n, 1), "square": 1.0 / math.sqrt(max(n, 1))}[mode]
    return sup.float() * w  # [T]; all zeros when n = 0


# -----------------------------------------------------------------------------
# packing (SPEC §6.4) and collation


def pack_samples(samples: list[Sample], max_packed_tokens: int, max_tiles: int) -> list[list[Sample]]:
    """Greedy first-fit packing of samples into packs of <= max_packed_tokens tokens and <= max_tiles tiles.

    Each sample goes into the first pack with room for both its tokens and its tiles, else opens a new one; packs
    are kept sorted by tile count (descending), so image-heavy packs are tried first, as the official buffer list.
    Simplifications vs the official PackedDataset: we pack a given window of samples and return every pack (no
    max_buffer_size emission, no strict_mode padding of tiles); an over-long sample is truncated (see `truncate`)
    and its tail dropped instead of becoming new chunks; a sample left without supervised tokens is dropped.
    """
    packs: list[list[Sample]] = []
    used: list[list[int]] = []  # per pack: [tokens, tiles]
    for s in samples:
        s = truncate(s, max_packed_tokens, max_tiles)
        if not (s.labels != IGNORE).any():
            continue
        T, N = len(s.input_ids), sum(s.num_tiles)
        k = next((k for k, (t, n) in enumerate(used) if t + T <= max_packed_tokens and n + N <= max_tiles), None)
        if k is None:  # no room anywhere: open a new pack
            k = len(packs)
            packs.append([])
            used.append([0, 0])
        packs[k].append(s)
        used[k][0] += T
        used[k][1] += N
        order = sorted(range(len(packs)), key=lambda i: -used[i][1])  # stable: ties keep their order
        packs, used = [packs[i] for i in order], [used[i] for i in order]
    return packs


_DUMMY = {}


def dummy_tile(image_size: int) -> torch.Tensor:
    """One white tile [1,3,S,S] (the official loader's blank 224x224 image)."""
    if image_size not in _DUMMY:
        _DUMMY[image_size] = preprocess_image(Image.new("RGB", (224, 224), (255, 255, 255)), 1, image_size, False)
    return _DUMMY[image_size]


def _pixels(samples: list[Sample], image_size: int):
    """-> pixel_values [N,3,S,S], image_flags [N]. Without any real tile: one dummy tile flagged 0, so the ViT
    always takes part in the forward (its features are dropped) and DDP sees a gradient for every parameter
    without find_unused_parameters (SPEC §6.2)."""
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None and len(s.pixel_values)]
    if not tiles:
        return dummy_tile(image_size), torch.zeros(1, dtype=torch.long)
    pixels = torch.cat(tiles)  # [N,3,S,S]
    return pixels, torch.ones(pixels.size(0), dtype=torch.long)


def _row(samples: list[Sample], T: int, pad_id: int, loss_reduction: str) -> dict:
    """Samples laid out one after another in a row of T tokens -> dict of [T] tensors; the tail is padding."""
    row = {"input_ids": torch.full((T,), pad_id), "labels": torch.full((T,), IGNORE),
           "position_ids": torch.zeros(T, dtype=torch.long), "doc_ids": torch.full((T,), -1),
           "loss_weight": torch.zeros(T)}
    t = 0
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        row["input_ids"][t:t + n], row["labels"][t:t + n] = s.input_ids, s.labels
        row["labels"][t] = IGNORE  # a document's first token is never predicted from the previous document
        row["position_ids"][t:t + n], row["doc_ids"][t:t + n] = torch.arange(n), i  # positions restart per sample
        row["loss_weight"][t:t + n] = loss_weights(row["labels"][t:t + n], loss_reduction)  # each its own n_s
        t += n
    return row


def collate_packed(samples: list[Sample], pad_id: int, image_size: int = 448, max_len: int | None = None,
                   pad_multiple: int = 8, loss_reduction: str = "square") -> dict:
    """One pack -> a batch of ONE row (B = 1).

    input_ids, labels, position_ids (restart at 0 per sample), doc_ids (0, 1, 2, ... per sample; -1 = padding),
    loss_weight (loss_weights per sample) are [1,T]; T = max_len if given (static shapes), else the total
    rounded up to pad_multiple. pixel_values [N,3,S,S] and image_flags [N] hold all tiles in order.
    """
    total = sum(len(s.input_ids) for s in samples)
    T = max_len if max_len is not None else -(-total // pad_multiple) * pad_multiple
    if total > T:
        raise ValueError(f"collate_packed: {total} tokens do not fit in max_len={T}")
    batch = {k: v[None] for k, v in _row(samples, T, pad_id, loss_reduction).items()}  # [1,T] each
    batch["pixel_values"], batch["image_flags"] = _pixels(samples, image_size)
    return batch


def collate_padded(samples: list[Sample], pad_id: int, image_size: int = 448, loss_reduction: str = "token") -> dict:
    """B samples -> B rows right-padded to the longest (the non-packed baseline); same keys as collate_packed,
    doc_ids 0 for real tokens and -1 for padding. Plain SFT uses token averaging (SPEC §6.3)."""
    T = max(len(s.input_ids) for s in samples)
    rows = [_row([s], T, pad_id, loss_reduction) for s in samples]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # [B,T] each
    batch["pixel_values"], batch["image_flags"] = _pixels(samples, image_size)
    return batch


def padding_stats(batches: list[dict]) -> dict:
    """Collated batches (packed or padded) -> {"tokens", "slots", "padding"}: padding = share of pad slots."""
    slots = sum(b["doc_ids"].numel() for b in batches)
    tokens = sum(int((b["doc_ids"] >= 0).sum()) for b in batches)
    return {"tokens": tokens, "slots": slots, "padding": 1 - tokens / max(slots, 1)}


# -----------------------------------------------------------------------------
# packs as a resumable stream


class PackedStream:
    """Packs from a SampleStream, window by window: draw `window` samples, pack them, hand out the packs in order.

    Resumable exactly: the state is the sample stream's state at the start of the current window plus the
    number of packs already handed out; loading it redraws the same window and skips those packs.
    """

    def __init__(self, stream: SampleStream, max_packed_tokens: int, max_tiles: int, window: int = 64):
        self.stream, self.max_tokens, self.max_tiles, self.window = stream, max_packed_tokens, max_tiles, window
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
