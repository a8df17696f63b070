"""
Training: packed forward = samples alone, exact resume, DDP = one process with the same global
batch, bad data, crash-safe checkpoints, and a trained checkpoint that sample.py loads.

    python -m pytest -q tests/test_train.py
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from nanovl3.chat import Tokenizer
from nanovl3.config import preset
from nanovl3.data import DataConfig, SampleStream, collate_packed, read_meta
from nanovl3.losses import lm_loss, loss_weight_sum
from nanovl3.model import InternVL
from nanovl3.training import ctrl_c_after

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
    dist.barrier()   # as Session.close: no rank tears the group down while another still uses it
    dist.destroy_process_group()


def global_batch_loss(world, tok, model):
    """One process's loss on what two ranks see: each rank's pack of 2 samples as a row."""
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
    return lm_loss(model(batch["input_ids"], pix, flags, batch["position_ids"], batch["doc_ids"]),
                   batch["labels"], batch["loss_weight"])


@pytest.mark.slow
def test_ddp_equals_single_process(world, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(world), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt")

    tok = Tokenizer.from_dir(world)
    model = tiny_model(tok)
    # SGD, not AdamW: Adam's first step is ~lr*sign(g), so a ~1e-9 gradient differing only in
    # rounding between the two reductions could move a weight by 2*lr; SGD passes the error on as is
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = global_batch_loss(world, tok, model)
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_out_dir_of_another_run_needs_resume_or_overwrite(world, tmp_path):
    out = tmp_path / "run"
    r = train(*small_args(world, out, "--stage", "sft"))
    assert r.returncode == 0, r.stderr[-3000:]
    before = (out / "metrics.jsonl").read_bytes()
    r = train(*small_args(world, out, "--stage", "sft"))  # refused before any work
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: --out-dir "), r.stderr[-2000:]
    assert "--resume" in last and "--overwrite" in last, last
    assert (out / "metrics.jsonl").read_bytes() == before
    r = train(*small_args(world, out, "--stage", "sft", "--overwrite"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [n for _, n, _ in losses(out)] == [1, 2, 3, 4]  # the old run's lines are gone


def test_ctrl_c_during_a_checkpoint_takes_effect_once_it_is_written():
    """Session.save runs in ctrl_c_after: a Ctrl-C that lands between the checkpoint's rename and
    the note of it would otherwise say "no checkpoint was written yet" beside one on disk."""
    written = []
    # a foreground process's Ctrl-C, whatever this one inherited (a job started with & in a
    # script, as CI may be, ignores SIGINT)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_after():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)   # the signal is handled here, between bytecodes
                written.append("ckpt")
        assert written == ["ckpt"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with ctrl_c_after():   # no Ctrl-C: nothing raised
            written.append("again")
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a background job's: left alone
        with ctrl_c_after():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert written == ["ckpt", "again"]


@pytest.mark.slow
def test_ctrl_c_says_where_and_resume_continues_exactly(world, tmp_path):
    """SIGINT after the first checkpoint: one line (stage, step, checkpoint, the resume command),
    exit 130; the resumed run equals an uninterrupted one, each step once in metrics.jsonl. The
    run is long (200 steps) so that it cannot end before the signal on a busy machine; both runs
    stop at --max-steps 40."""
    args = small_args(world, tmp_path / "part", "--stage", "sft", "--sft-steps", 200,
                      "--max-steps", 40)
    # SIGINT as a terminal's Ctrl-C delivers it: a job started in the background by a
    # non-interactive shell (as CI may run us) inherits SIGINT ignored, and Python keeps that
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not (tmp_path / "part" / "ckpt" / "train_state.pt").exists() and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert p.returncode == 130, err[-2000:]
    assert re.fullmatch(r"interrupted at sft step \d+; last checkpoint \S+/part/ckpt \(sft step "
                        r"\d+\): resume with python train.py .* --resume", last), last
    r = train(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    full = train(*small_args(world, tmp_path / "full", "--stage", "sft", "--sft-steps", 200,
                             "--max-steps", 40))
    assert full.returncode == 0, full.stderr[-3000:]
    steps = [n for _, n, _ in losses(tmp_path / "part")]
    assert steps == list(range(1, 41)), steps  # no step twice after the resume
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


@pytest.mark.slow
def test_own_data_needs_no_toy_world_and_eval_file_is_optional(world, untrained_ckpt, tmp_path):
    """Fine-tuning on your own meta.json from a directory without data/toy: no toy world made,
    no evaluation unless --eval-file names a held-out jsonl (a missing one is an error)."""
    ft = ["--stage", "sft", "--init-from", untrained_ckpt, "--sft-meta",
          world / "sft" / "meta.json", "--sft-steps", 2, "--max-packed-tokens", 512,
          "--max-packed-tiles", 12]
    r = train(*ft, "--out-dir", tmp_path / "a", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "data").exists() and not (tmp_path / "a" / "eval.json").exists()
    assert "no evaluation" in r.stdout
    r = train(*ft, "--out-dir", tmp_path / "b", "--eval-file", world / "eval" / "eval.jsonl",
              "--eval-per-type", 1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["types"]
    r = train(*ft, "--out-dir", tmp_path / "c", "--eval-file", tmp_path / "gone.jsonl",
              cwd=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error:") and "gone.jsonl" in last, last


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
# fine-tuning memory: activation checkpointing, freezing


def test_grad_checkpoint_gives_the_same_loss_and_grads(world):
    """checkpoint_layers: the same numbers (drop path included: its RNG is replayed), the same
    state_dict names, and far fewer activations kept for backward."""
    from nanovl3.training import checkpoint_layers
    tok = Tokenizer.from_dir(world)
    batch = collate_packed(samples(world, tok, tiny_model(tok), n=4), tok.pad_id, 112)
    runs = []
    for ckpt in (False, True):
        model = tiny_model(tok).train()
        for block in model.vision_model.encoder.layers:
            block.drop_path_rate = 0.2
        if ckpt:
            checkpoint_layers(model)
        saved = []  # elements kept for backward outside the checkpointed layers
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                      lambda t: t):
            logits = model(batch["input_ids"], batch["pixel_values"], batch["image_flags"],
                           batch["position_ids"], batch["doc_ids"])
            loss = lm_loss(logits, batch["labels"], batch["loss_weight"])
        loss.backward()
        runs.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)))
    (loss0, grads0, saved0), (loss1, grads1, saved1) = runs
    assert abs(loss0 - loss1) <= 1e-6 and list(grads0) == list(grads1)
    assert max((grads0[n] - grads1[n]).abs().max().item() for n in grads0) <= 1e-6
    assert saved1 < saved0 / 2, (saved0, saved1)


@pytest.mark.slow
def test_finetune_with_freeze_bf16_and_grad_checkpoint(world, untrained_ckpt, tmp_path):
    """The one-GPU fine-tuning command on CPU: --init-from, bf16 autocast over fp32 weights,
    --grad-checkpoint, --freeze vit,mlp: frozen parts come out bit-identical, the LLM moves."""
    out = tmp_path / "ft"
    r = train("--stage", "sft", "--init-from", untrained_ckpt, "--sft-meta",
              world / "sft" / "meta.json", "--data-dir", world, "--out-dir", out, "--sft-steps", 2,
              "--max-packed-tokens", 512, "--max-packed-tiles", 12, "--eval-per-type", 0,
              "--freeze", "vit,mlp", "--dtype", "bfloat16", "--grad-checkpoint")
    assert r.returncode == 0, r.stderr[-3000:]
    before = InternVL.from_pretrained(untrained_ckpt).state_dict()
    after = InternVL.from_pretrained(out / "ckpt").state_dict()
    assert after["language_model.model.norm.weight"].dtype == torch.float32  # fp32 master weights
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same == k.startswith(("vision_model.", "mlp1.")), k


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


@pytest.mark.slow
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
    assert "sft: skipped 1 bad lines of " in r.stdout and "(each once; last: " in r.stdout
