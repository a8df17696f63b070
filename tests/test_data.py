"""
Tests for nanovl3/data.py and nanovl3/losses.py: loss masks, loss weights, packing, bad data,
resumable streams.

    python -m pytest -q tests/test_data.py

Fixtures are tiny: 28-px tiles, 4 tokens per tile, a 300-token BPE trained on the fly, PNGs written
to tmp_path.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nanovl3.chat import train_tokenizer
from nanovl3.common import UserError, read_jsonl
from nanovl3.data import (DataConfig, PackedStream, Sample, SampleStream, collate_packed,
                          collate_padded, interleaved_sample, loss_weights, pack_samples,
                          read_meta, sft_sample, text_sample)
from nanovl3.losses import IGNORE, lm_loss, loss_weight_sum

TPT = 4  # tokens per tile
CFG = DataConfig(tokens_per_tile=TPT, image_size=28, max_dynamic_patch=4, max_seq_len=2048)
WORDS = ("the red circle blue square green star is on left right of image how many shapes are "
         "there answer").split()


@pytest.fixture(scope="module")
def tok():
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3
    return train_tokenizer(texts, 300)


def write_png(path, w=28, h=28, colour=(200, 30, 30)):
    Image.new("RGB", (w, h), colour).save(path)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def conv(q, a, image=None):
    row = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image is not None:
        row["image"] = image
    return row


@pytest.fixture
def world(tmp_path):
    """meta.json with an sft, an interleaved and a text dataset (images under tmp_path/img)."""
    (tmp_path / "img").mkdir()
    for i in range(4):
        write_png(tmp_path / "img" / f"{i}.png", 28 * (1 + i % 2), 28, (40 * i, 100, 200))
    sft = [conv("<image>\nhow many shapes", f"{i} shapes", f"{i % 4}.png") for i in range(20)]
    sft += [conv("the red circle is", "on the left")] * 4
    write_jsonl(tmp_path / "sft.jsonl", sft)
    inter = {"image": ["0.png", "1.png"], "text": "a <image> red <image> star"}
    write_jsonl(tmp_path / "inter.jsonl", [inter] * 6)
    write_jsonl(tmp_path / "text.jsonl", [{"text": f"the blue square {i}"} for i in range(10)])
    meta = {"sft": {"root": "img", "annotation": "sft.jsonl", "repeat_time": 1,
                    "data_augment": True},
            "inter": {"root": "img", "annotation": "inter.jsonl", "repeat_time": 2,
                      "kind": "interleaved"},
            "text": {"annotation": "text.jsonl", "repeat_time": 0.5, "kind": "text"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def image_ids(tok):
    return torch.tensor([tok.img_context_id, tok.img_start_id, tok.img_end_id])


def make_sample(n_sup, n_ctx=3, tiles=0):
    """A synthetic sample: n_ctx unsupervised tokens (starting with one image of `tiles` tiles, if
    any), then n_sup supervised ones."""
    span = tiles * TPT + 2 if tiles else 0
    n_ctx = max(n_ctx, span)
    T = n_ctx + n_sup
    labels = torch.full((T,), IGNORE)
    labels[n_ctx:] = torch.arange(n_sup) + 20
    pixels = torch.randn(tiles, 3, 28, 28) if tiles else None
    return Sample(torch.arange(T) + 20, labels, pixels, [tiles] if tiles else [],
                  [(0, span)] if tiles else [])


# -----------------------------------------------------------------------------
# labels


def test_sft_labels_cover_exactly_the_assistant_answers(tok, tmp_path):
    write_png(tmp_path / "a.png", 56, 28)
    row = {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nhow many shapes"},
        {"from": "gpt", "value": "there are 3"},
        {"from": "human", "value": "the red one"}, {"from": "gpt", "value": "on the left"}]}
    s = sft_sample(tok, row, "x.jsonl:1", CFG, root=str(tmp_path))
    assert s.num_tiles == [3] and s.pixel_values.shape == (3, 3, 28, 28)  # 2x1 grid + thumbnail
    sup = (s.labels != IGNORE).tolist()
    assert torch.equal(s.labels[s.labels != IGNORE], s.input_ids[s.labels != IGNORE])
    spans, t = [], 0  # contiguous supervised runs
    while t < len(sup):
        if sup[t]:
            u = t
            while u < len(sup) and sup[u]:
                u += 1
            spans.append(tok.decode(s.input_ids[t:u].tolist(), skip_special_tokens=False))
            t = u
        t += 1
    assert spans == ["there are 3<|im_end|>", "on the left<|im_end|>"]
    img = torch.isin(s.input_ids, image_ids(tok))
    assert int((s.input_ids == tok.img_context_id).sum()) == 3 * TPT
    assert not sup[img.nonzero()[0, 0]]
    assert s.image_spans == [(int(img.nonzero()[0]), int(img.nonzero()[-1]) + 1)]


def test_interleaved_and_text_labels(tok, tmp_path):
    write_png(tmp_path / "a.png")
    line = {"image": ["a.png", "a.png"], "text": "the <image> red <image> star"}
    s = interleaved_sample(tok, line, "x:1", CFG, root=str(tmp_path))
    img = torch.isin(s.input_ids, image_ids(tok))
    assert int(img.sum()) == 2 * (TPT + 2) and (s.labels[img] == IGNORE).all()
    assert torch.equal(s.labels[~img][1:], s.input_ids[~img][1:]) and s.labels[0] == IGNORE
    assert s.input_ids[-1] == tok.endoftext_id and s.labels[-1] == tok.endoftext_id
    t = text_sample(tok, {"text": "the blue square"}, "x:2", CFG)
    assert t.pixel_values is None and t.input_ids[-1] == tok.endoftext_id
    assert t.labels[0] == IGNORE and torch.equal(t.labels[1:], t.input_ids[1:])


def test_multi_image_splits_the_tile_budget(tok, tmp_path):
    write_png(tmp_path / "wide.png", 112, 28)  # 4:1 -> 4 tiles + thumbnail with the full budget
    one = sft_sample(tok, conv("<image> how", "3", "wide.png"), "x:1", CFG, root=str(tmp_path))
    two = sft_sample(tok, conv("<image> <image> how", "3", ["wide.png", "wide.png"]), "x:2", CFG,
                     root=str(tmp_path))
    assert one.num_tiles == [5] and two.num_tiles == [3, 3]  # max_num 4 // 2 = 2: 2x1 + thumbnail


# -----------------------------------------------------------------------------
# loss weights and the LM loss


def test_loss_weights_token_sample_square():
    short, long = make_sample(4), make_sample(16)
    modes = {"token": (1, 1), "sample": (1 / 4, 1 / 16), "square": (1 / 2, 1 / 4)}
    for mode, (ws, wl) in modes.items():
        for s, w in ((short, ws), (long, wl)):
            got, sup = loss_weights(s.labels, mode), s.labels != IGNORE
            assert torch.allclose(got[sup], torch.full((int(sup.sum()),), float(w)))
            assert (got[s.labels == IGNORE] == 0).all()
    assert (loss_weights(torch.full((5,), IGNORE), "square") == 0).all()
    b = collate_packed([short, long], pad_id=0, image_size=28, loss_reduction="square")
    assert torch.allclose(b["loss_weight"][0, :7].max(), torch.tensor(0.5))
    assert torch.allclose(b["loss_weight"][0, 7:26].max(), torch.tensor(0.25))


def test_lm_loss_weighted_mean_and_token_mean():
    torch.manual_seed(0)
    short, long = make_sample(4), make_sample(16)
    b = collate_packed([short, long], pad_id=0, image_size=28, loss_reduction="square")
    logits = torch.randn(1, b["input_ids"].size(1), 64)
    ce = F.cross_entropy(logits[0, :-1], b["labels"][0, 1:], ignore_index=IGNORE, reduction="none")
    w = b["loss_weight"][0, 1:]
    assert torch.allclose(lm_loss(logits, b["labels"], b["loss_weight"]), (ce * w).sum() / w.sum())
    mean = F.cross_entropy(logits[0, :-1], b["labels"][0, 1:], ignore_index=IGNORE)
    assert torch.allclose(lm_loss(logits, b["labels"]), mean)
    d = loss_weight_sum(b["labels"], b["loss_weight"])
    assert torch.allclose(d, torch.tensor(4 / 2 + 16 / 4))
    assert torch.allclose(lm_loss(logits, b["labels"], b["loss_weight"], denom=2 * d),
                          lm_loss(logits, b["labels"], b["loss_weight"]) / 2)


def test_no_supervised_token_gives_finite_zero_loss():
    logits = torch.randn(2, 6, 32, requires_grad=True)
    labels = torch.full((2, 6), IGNORE)
    for w in (None, torch.zeros(2, 6)):
        loss = lm_loss(logits, labels, w)
        assert torch.isfinite(loss) and loss.item() == 0 and loss.grad_fn is not None
        loss.backward()
        assert torch.isfinite(logits.grad).all()


def test_first_token_of_a_sample_is_never_a_target():
    # Sample is the one home of this rule: a caller's supervised token 0 becomes IGNORE (the
    # caller's tensor untouched), so in a packed row no document is predicted from the one before
    ids = torch.arange(5) + 20
    labels = ids.clone()
    a, b = Sample(ids, labels, None, []), Sample(ids[:3], ids[:3].clone(), None, [])
    assert labels[0] == 20 and a.labels[0] == IGNORE and torch.equal(a.labels[1:], ids[1:])
    row = collate_packed([a, b], pad_id=0, image_size=28, loss_reduction="square")
    assert row["labels"][0, [0, 5]].tolist() == [IGNORE, IGNORE]
    assert row["loss_weight"][0, [0, 5]].tolist() == [0, 0]
    assert torch.allclose(row["loss_weight"][0, 6:8], torch.full((2,), 2 ** -0.5))  # n = 2, not 3
    logits = torch.randn(1, row["input_ids"].size(1), 32)
    loss = lm_loss(logits, row["labels"], row["loss_weight"])
    logits[0, 4] += 10 * F.one_hot(torch.tensor(20), 32)  # a's last position, before b's token 0
    assert torch.equal(lm_loss(logits, row["labels"], row["loss_weight"]), loss)


# -----------------------------------------------------------------------------
# packing and collation


def skewed_samples():
    # length-skewed: a few long samples, many short ones; some with tiles
    sizes = [(200, 2), (8, 0), (12, 1), (5, 0), (150, 0), (9, 3), (7, 0), (11, 0), (6, 1), (180, 0),
             (10, 0), (4, 0)]
    return [make_sample(n, tiles=t) for n, t in sizes]


def test_pack_keeps_every_sample_and_respects_limits():
    samples = skewed_samples()
    packs = pack_samples(samples, max_packed_tokens=256, max_tiles=4)
    assert sorted(id(s) for p in packs for s in p) == sorted(id(s) for s in samples)
    for p in packs:
        assert sum(len(s.input_ids) for s in p) <= 256
        assert sum(s.num_tiles[0] if s.num_tiles else 0 for s in p) <= 4
    tiles = [sum(sum(s.num_tiles) for s in p) for p in packs]
    assert tiles == sorted(tiles, reverse=True)
    b = collate_packed(packs[0], pad_id=0, image_size=28, max_len=256)
    assert all(v.size(0) == 1 and v.size(1) == 256 for k, v in b.items()
               if k not in ("pixel_values", "image_flags"))
    t = 0
    for i, s in enumerate(packs[0]):
        n = len(s.input_ids)
        assert b["position_ids"][0, t:t + n].tolist() == list(range(n))
        assert (b["doc_ids"][0, t:t + n] == i).all()
        assert torch.equal(b["input_ids"][0, t:t + n], s.input_ids)
        t += n
    assert (b["doc_ids"][0, t:] == -1).all() and (b["labels"][0, t:] == IGNORE).all()
    assert (b["loss_weight"][0, t:] == 0).all()
    assert b["pixel_values"].size(0) == sum(sum(s.num_tiles) for s in packs[0])
    assert b["image_flags"].all()


def padding_stats(batches: list[dict]) -> dict:
    """Collated batches (packed or padded) -> {"tokens", "slots", "padding"}: share of pad slots."""
    slots = sum(b["doc_ids"].numel() for b in batches)
    tokens = sum(int((b["doc_ids"] >= 0).sum()) for b in batches)
    return {"tokens": tokens, "slots": slots, "padding": 1 - tokens / max(slots, 1)}


def test_packing_pads_less_than_padded_batches():
    samples = skewed_samples()
    packed = [collate_packed(p, pad_id=0, image_size=28, max_len=256)
              for p in pack_samples(samples, 256, 8)]
    padded = [collate_padded(samples[i:i + 4], pad_id=0, image_size=28)
              for i in range(0, len(samples), 4)]
    p, q = padding_stats(packed), padding_stats(padded)
    assert p["tokens"] == q["tokens"] == sum(len(s.input_ids) for s in samples)
    assert p["padding"] < q["padding"]
    assert padded[0]["input_ids"].shape[0] == 4 and (padded[0]["doc_ids"][1, :11] == 0).all()


def test_text_only_batch_gets_one_dummy_tile():
    b = collate_packed([make_sample(5), make_sample(3)], pad_id=0, image_size=28)
    assert b["pixel_values"].shape == (1, 3, 28, 28) and b["image_flags"].tolist() == [0]
    assert b["input_ids"].size(1) % 8 == 0
    b = collate_padded([make_sample(5), make_sample(2, tiles=2)], pad_id=0, image_size=28)
    assert b["pixel_values"].shape == (2, 3, 28, 28) and b["image_flags"].tolist() == [1, 1]


def test_overlong_sample_is_truncated_before_an_image(tok, tmp_path):
    write_png(tmp_path / "a.png")
    line = {"image": ["a.png", "a.png"], "text": "the red <image> blue <image> star"}
    s = interleaved_sample(tok, line, "x:1", CFG, root=str(tmp_path))
    start2, end2 = s.image_spans[1]
    packs = pack_samples([s], max_packed_tokens=end2 - 1, max_tiles=8)  # cut inside image 2
    (t,), = packs
    assert len(t.input_ids) == start2 and t.num_tiles == [1] and t.pixel_values.shape[0] == 1
    assert int((t.input_ids == tok.img_context_id).sum()) == TPT
    (u,), = pack_samples([s], max_packed_tokens=1000, max_tiles=1)  # the tile limit drops image 2
    assert len(u.input_ids) == start2 and u.num_tiles == [1]


# -----------------------------------------------------------------------------
# bad data: file:line messages, skip_bad


def test_bad_lines_name_file_and_line(tok, tmp_path):
    write_png(tmp_path / "a.png")
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [conv("hi", "yo"), "", '{"conversations": [', "[1, 2]"])
    with pytest.raises(UserError, match=r"bad\.jsonl:3: malformed JSON"):
        read_jsonl(bad)
    root = str(tmp_path)
    cases = [(conv("<image> how", "3", "missing.png"), "missing.png"),
             (conv("<image> <image> how", "3", "a.png"), "2 <image> placeholder"),
             (conv("<image> how", "3"), "1 <image> placeholder"),
             ({"image": "a.png", "conversations": []}, "empty conversation"),
             ({"conversations": [{"from": "human", "value": "hi"}]}, "no 'gpt' turn"),
             (conv("hi", ""), None)]  # an empty answer still trains <|im_end|>
    for i, (row, msg) in enumerate(cases):
        where = f"{bad}:{i + 7}"
        if msg is None:
            sft_sample(tok, row, where, CFG, root=root)
            continue
        with pytest.raises(UserError) as e:
            sft_sample(tok, row, where, CFG, root=root)
        assert str(e.value).startswith(where + ": ") and msg in str(e.value)
    with pytest.raises(UserError, match=r"x:1: no supervised token"):
        text_sample(tok, {"text": "a"}, "x:1", DataConfig(max_seq_len=1))


def test_bad_meta_names_file_and_key(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"ds": {"root": ".", "repeat_time": 1}}))
    with pytest.raises(UserError, match=r"meta\.json: dataset 'ds': needs an 'annotation'"):
        read_meta(meta)
    meta.write_text(json.dumps({"ds": {"annotation": "a.jsonl", "kind": "video"}}))
    with pytest.raises(UserError, match=r"'ds': unknown 'kind'"):
        read_meta(meta)


def test_skip_bad_counts_instead_of_raising(tok, tmp_path):
    write_png(tmp_path / "a.png")
    rows = [conv("<image> how", "3", "a.png"), conv("<image> how", "3", "gone.png"),
            conv("hi", "yo"), {"conversations": []}, conv("<image> <image>", "3", "a.png")]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": ".", "annotation": "d.jsonl"}}))
    specs = read_meta(tmp_path / "meta.json")
    with pytest.raises(UserError, match=r"d\.jsonl:\d: "):
        for _ in range(5):
            next(SampleStream(specs, tok, CFG, seed=1))
    stream = SampleStream(specs, tok, CFG, seed=1, skip_bad=True)
    got = [next(stream) for _ in range(4)]  # two good lines and three bad ones per epoch
    assert {s.source[-1] for s in got} == {"1", "3"}
    assert stream.skipped == 3 and stream.draws > 4 + 3  # each bad line counted once
    assert "d.jsonl:" in stream.last_error and "skipped 3 bad lines of 5" in stream.skip_report()


def test_skip_bad_never_calls_a_file_with_good_lines_all_bad(tok, tmp_path):
    # 2 good lines of 12 (one unreadable): runs of bad draws across an epoch boundary are longer
    # than the file, which once made the stream give up on some seeds
    rows = [conv("hi", "yo")] + [{"conversations": []}] * 9 + [conv("a", "b")]
    write_jsonl(tmp_path / "d.jsonl", rows + ['{"oops'])
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": ".", "annotation": "d.jsonl"}}))
    specs = read_meta(tmp_path / "meta.json")
    for seed in range(6):
        stream = SampleStream(specs, tok, CFG, seed=seed, skip_bad=True)
        assert {next(stream).source.split(":")[-1] for _ in range(30)} == {"1", "11"}
        assert stream.skipped == 10 and "skipped 10 bad lines of 12" in stream.skip_report()
        state = stream.state_dict()
        again = SampleStream(specs, tok, CFG, seed=seed, skip_bad=True)
        again.load_state_dict(state)
        assert again.skipped == 10 and next(again).source == next(stream).source
    write_jsonl(tmp_path / "d.jsonl", rows[1:-1])
    with pytest.raises(UserError, match=r"d\.jsonl: every one of the 9 readable lines is bad"):
        next(SampleStream(specs, tok, CFG, seed=0, skip_bad=True))


# -----------------------------------------------------------------------------
# the sample stream: weights, determinism, resume, sharding


def key(s: Sample):
    pixels = None if s.pixel_values is None else float(s.pixel_values.sum())
    return (s.source, tuple(s.input_ids.tolist()), pixels)


def test_meta_paths_and_epoch_sizes(world, tok):
    specs = read_meta(world / "meta.json")
    assert [s.kind for s in specs] == ["sft", "interleaved", "text"] and specs[0].data_augment
    assert specs[0].root == str(world / "img") and specs[2].annotation == str(world / "text.jsonl")
    stream = SampleStream(specs, tok, CFG)
    assert len(stream._order(0, 0)) == 24 + 2 * 6 + 5  # size x repeat_time per dataset
    sources = [next(stream).source for _ in range(41)]
    assert len(set(sources)) == 24 + 6 + 5 and stream.epoch == 1


def test_stream_is_deterministic_and_resumes_exactly(world, tok):
    specs = read_meta(world / "meta.json")
    a = SampleStream(specs, tok, CFG, seed=3)
    first = [key(next(a)) for _ in range(50)]  # crosses an epoch boundary
    b = SampleStream(specs, tok, CFG, seed=3)
    assert [key(next(b)) for _ in range(50)] == first
    c = SampleStream(specs, tok, CFG, seed=3)
    for _ in range(17):
        next(c)
    state = json.loads(json.dumps(c.state_dict()))  # survives a JSON round trip (checkpoint meta)
    d = SampleStream(specs, tok, CFG, seed=3)
    d.load_state_dict(state)
    assert [key(next(d)) for _ in range(33)] == first[17:]
    e = SampleStream(specs, tok, CFG, seed=4)
    assert [key(next(e)) for _ in range(50)] != first
    with pytest.raises(UserError, match="does not match"):
        e.load_state_dict(state)


def test_ddp_shards_are_disjoint(world, tok):
    specs = read_meta(world / "meta.json")
    shards = [SampleStream(specs, tok, CFG, seed=5, rank=r, world_size=3) for r in range(3)]
    draws = [[next(s).source for _ in range(13)] for s in shards]  # 3 x 13 of an epoch's 41 draws
    whole = SampleStream(specs, tok, CFG, seed=5)
    ref = [next(whole).source for _ in range(39)]
    for r in range(3):  # rank r gets global draws r, r+3, r+6, ...
        assert draws[r] == ref[r::3]
    lines = [src for d in draws for src in d]
    sft = [src for src in lines if "sft.jsonl" in src]
    # one epoch: no sft line twice, on any rank (inter.jsonl lines repeat x2)
    assert len(sft) == len(set(sft))


def test_text_ratio_mixes_two_pools(world, tok):
    specs = read_meta(world / "meta.json")
    stream = SampleStream(specs, tok, CFG, seed=0, text_ratio=0.25)
    text = sum("text.jsonl" in next(stream).source for _ in range(200))
    assert 30 <= text <= 70  # ~50 of 200


def test_packed_stream_resumes_exactly(world, tok):
    specs = read_meta(world / "meta.json")
    def packed():
        stream = SampleStream(specs, tok, CFG, seed=2)
        return PackedStream(stream, max_packed_tokens=256, max_tiles=8, window=8)
    a = packed()
    ref = [[key(s) for s in next(a)] for _ in range(12)]
    b = packed()
    for _ in range(5):
        next(b)
    state = json.loads(json.dumps(b.state_dict()))
    c = packed()
    c.load_state_dict(state)
    assert [[key(s) for s in next(c)] for _ in range(7)] == ref[5:]
