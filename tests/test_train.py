"""
Training: packed forward = samples alone, exact resume, DDP = one process with the same global
batch, bad data, crash-safe checkpoints, and a trained checkpoint that sample.py loads.

    python -m pytest -q tests/test_train.py
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from nanovl3.chat import Tokenizer
from nanovl3.config import preset
from nanovl3.data import DataConfig, SampleStream, collate_packed, read_meta
from nanovl3.losses import lm_loss, loss_weight_sum
from nanovl3.model import InternVL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def world(small_world):  # conftest.py: the small toy world, made once per session
    return small_world


def tiny_model(tok, seed=0):
    cfg = preset("toy")
    cfg.text.vocab_size, cfg.image_token_id = tok.vocab_size, tok.img_context_id
    torch.manual_seed(seed)
    m = InternVL(cfg)
    m.init_weights()
    return m


def samples(world, tok, model, n=6, meta="sft"):
    dcfg = DataConfig(tokens_per_tile=model.cfg.num_image_token,
                      image_size=model.cfg.vision.image_size, max_dynamic_patch=4)
    stream = SampleStream(read_meta(os.path.join(world, meta, "meta.json")), tok, dcfg, seed=1)
    return [next(stream) for _ in range(n)]


def train(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def small_args(world, out, *extra):
    return ["--data-dir", world, "--out-dir", out, "--pretrain-steps", 4, "--sft-steps", 4,
            "--max-packed-tokens", 512, "--max-packed-tiles", 12, "--log-interval", 1,
            "--eval-per-type", 0, "--ckpt-interval", 2, *extra]


# -----------------------------------------------------------------------------
# packing


def test_packed_forward_equals_samples_alone(world):
    tok = Tokenizer.from_dir(world)
    model = tiny_model(tok).eval()
    pack = samples(world, tok, model, n=4)
    batch = collate_packed(pack, tok.pad_id, model.cfg.vision.image_size)
    with torch.no_grad():
        packed = model(batch["input_ids"], batch["pixel_values"], batch["image_flags"],
                       batch["position_ids"], batch["doc_ids"])[0]
        t = 0
        for s in pack:
            alone = model(s.input_ids[None], s.pixel_values)[0]
            assert (packed[t:t + len(s.input_ids)] - alone).abs().max().item() <= 1e-5
            t += len(s.input_ids)
    assert len(pack) > 1 and any(s.pixel_values is not None for s in pack)


# -----------------------------------------------------------------------------
# DDP: two gloo processes == one process with the same global batch


def _ddp_worker(rank, port, world, result_dir):
    import torch.distributed as dist
    from nanovl3.training import all_reduce_mean
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tok = Tokenizer.from_dir(world)
    model = tiny_model(tok)
    pack = samples(world, tok, model, n=4)[rank * 2: rank * 2 + 2]  # rank r: its half of the batch
    batch = collate_packed(pack, tok.pad_id, model.cfg.vision.image_size)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # not AdamW: test_ddp_equals_single_process
    logits = ddp(batch["input_ids"], batch["pixel_values"], batch["image_flags"],
                 batch["position_ids"], batch["doc_ids"])
    denom = all_reduce_mean(loss_weight_sum(batch["labels"], batch["loss_weight"]))  # as train.py
    loss = lm_loss(logits, batch["labels"], batch["loss_weight"], denom)
    loss.backward()
    opt.step()
    global_loss = all_reduce_mean(loss.detach())  # the global weighted mean, as one process sees it
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.save({"loss": global_loss, "params": model.state_dict(), "grads": grads},
                   os.path.join(result_dir, "ddp.pt"))
    del ddp   # before the group goes, as train.py does: a reducer freed after it can deadlock gloo
    dist.destroy_process_group()


def test_ddp_equals_single_process(world, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(world), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt")

    tok = Tokenizer.from_dir(world)
    model = tiny_model(tok)
    pack = samples(world, tok, model, n=4)
    halves = [collate_packed(pack[:2], tok.pad_id, 112), collate_packed(pack[2:], tok.pad_id, 112)]
    T = max(h["input_ids"].size(1) for h in halves)
    pad = {"input_ids": tok.pad_id, "labels": -100, "position_ids": 0, "doc_ids": -1,
           "loss_weight": 0.0}
    batch = {k: torch.cat([torch.nn.functional.pad(h[k], (0, T - h[k].size(1)), value=v)
                           for h in halves])
             for k, v in pad.items()}  # the global batch: both halves as two rows
    pix = torch.cat([h["pixel_values"] for h in halves])
    flags = torch.cat([h["image_flags"] for h in halves])
    # SGD, not AdamW: Adam's first step is ~lr*sign(g), so a ~1e-9 gradient differing only in
    # rounding between the two reductions could move a weight by 2*lr; SGD passes the error on as is
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = lm_loss(model(batch["input_ids"], pix, flags, batch["position_ids"], batch["doc_ids"]),
                   batch["labels"], batch["loss_weight"])
    loss.backward()
    opt.step()
    assert abs(loss.item() - got["loss"].item()) <= 1e-5
    for n, p in model.named_parameters():
        assert (p.grad - got["grads"][n]).abs().max().item() <= 1e-6, n
    for k, v in model.state_dict().items():
        assert (v - got["params"][k]).abs().max().item() <= 1e-5, k


def torchrun(*argv):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", os.path.join(ROOT, "train.py"),
                           *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_torchrun_two_processes_train_and_resume(world, tmp_path):
    """train.py under torchrun (gloo) runs, and --resume continues the 2-process run exactly."""
    full = torchrun(*small_args(world, tmp_path / "full", "--stage", "sft"))
    assert full.returncode == 0, full.stderr[-3000:]
    assert "2 process(es)" in full.stdout
    part = torchrun(*small_args(world, tmp_path / "part", "--stage", "sft", "--max-steps", 2))
    assert part.returncode == 0, part.stderr[-3000:]
    resumed = torchrun(*small_args(world, tmp_path / "part", "--stage", "sft", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (losses(tmp_path / "part") == losses(tmp_path / "full")
            and len(losses(tmp_path / "full")) == 4)


# -----------------------------------------------------------------------------
# resume, checkpoints, sample.py


def losses(out):
    return [(d["stage"], d["step"], d["loss"])
            for d in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in d]


def test_resume_reproduces_uninterrupted_run(world, tmp_path):
    full = tmp_path / "full"
    r = train(*small_args(world, full, "--v2pe"))
    assert r.returncode == 0, r.stderr[-3000:]
    part = tmp_path / "part"
    # stops in SFT after its step 2 checkpoint
    r = train(*small_args(world, part, "--v2pe", "--max-steps", 6))
    assert r.returncode == 0, r.stderr[-3000:]
    r = train(*small_args(world, part, "--v2pe", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed sft at step 2" in r.stdout
    assert losses(part) == losses(full)  # bitwise: same data, RNG, optimizer state
    assert len(losses(full)) == 8

    # the trained checkpoint is a directory sample.py loads as it is
    s = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt",
                        str(full / "ckpt"), "--prompt", "How many shapes?", "--max-new-tokens",
                        "4"], capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr


def test_interrupted_checkpoint_write_keeps_previous(world, tmp_path, monkeypatch):
    from nanovl3 import checkpoint
    from nanovl3.checkpoint import save_checkpoint
    tok = Tokenizer.from_dir(world)
    m = tiny_model(tok)
    path = tmp_path / "ckpt"
    save_checkpoint(str(path), m, tok, {"step": 1})
    before = InternVL.from_pretrained(path).state_dict()

    def crash(*a, **k):
        open(os.path.join(os.path.dirname(a[1]), "model.safetensors"), "wb").write(b"half a file")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(path), m, tok, {"step": 2})
    after = InternVL.from_pretrained(path).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.load(path / "train_state.pt")["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind


# -----------------------------------------------------------------------------
# bad data


def bad_world(world, tmp_path, mutate):
    d = tmp_path / "bad"
    (d / "sft").mkdir(parents=True)
    meta = json.loads((world / "sft" / "meta.json").read_text())
    meta = {"toy_vqa": {**meta["toy_vqa"], "root": str(world),
                        "annotation": str(d / "sft" / "vqa.jsonl")}}
    (d / "sft" / "meta.json").write_text(json.dumps(meta))
    lines = (world / "sft" / "vqa.jsonl").read_text().splitlines()
    lines[2] = mutate(json.loads(lines[2]))
    (d / "sft" / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.mark.parametrize("case,mutate,msg", [
    ("malformed", lambda d: json.dumps(d)[:-5], "malformed JSON"),
    ("missing image", lambda d: json.dumps({**d, "image": "images/nope.png"}), "nope.png"),
    ("image count", lambda d: json.dumps({**d, "image": [d["image"], d["image"]]}
                                         if isinstance(d["image"], str)
                                         else {**d, "image": d["image"][:1]}), "<image>"),
    ("empty conversation", lambda d: json.dumps({**d, "conversations": []}), "empty"),
])
def test_bad_data_names_file_and_line(world, tmp_path, case, mutate, msg):
    d = bad_world(world, tmp_path, mutate)
    argv = small_args(world, tmp_path / "out", "--stage", "sft", "--sft-meta",
                      d / "sft" / "meta.json", "--sft-steps", 3, "--max-packed-tokens", 4096)
    r = train(*argv)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "vqa.jsonl:3:" in last and msg in last, last
    r = train(*argv, "--skip-bad-samples")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 1 bad samples" in r.stdout or "skipped 2 bad samples" in r.stdout
