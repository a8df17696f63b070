"""
bench.py --short runs end to end and writes every figure as finite positive numbers (no timing
assertions: the machines that run the tests are shared and noisy); the GPU check's CPU dry run.

    python -m pytest -q tests/test_bench.py
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_short_bench_writes_every_figure(tmp_path):
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, "bench.py", "--short", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = results["shapes"]["tiny"]
    hf = importlib.util.find_spec("transformers") is not None
    want = ["peak_float32", "prefill_1tile", "prefill_4tile", "decode_b1", "decode_b8", "load_peak",
            "train", "train_mfu", "train_text", "sft_packed_vs_padded", "decode_b1_floor",
            "decode_b1_compiled",
            "compile_decode", "compile_decode_s", "compile_train", "compile_train_s"]
    assert sorted(rows) == sorted(want)
    for key, row in rows.items():
        values = [row["nanovl3"]] + ([row["baseline"]] if row["baseline"] is not None else [])
        for s in values:
            for v in [s["median"], s["min"], s["max"], *s["samples"]]:
                assert math.isfinite(v) and v > 0, (key, s)
            assert s["min"] <= s["median"] <= s["max"], (key, s)
        if row["baseline"] is not None:
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0, key
    for key in ["prefill_1tile", "decode_b1", "decode_b1_floor", "decode_b1_compiled", "decode_b8",
                "train", "train_text", "load_peak"]:  # compared with transformers
        assert (rows[key]["against"] == "transformers") == hf, key
    assert "| tiny | decode batch 1" in r.stdout  # the table, printed and written next to the JSON
    md = (tmp_path / "results.md").read_text()
    assert "Command: `python bench.py --short --out" in md and "Median of 2 alternated runs" in md
    assert sum(line.startswith("| tiny | ") for line in md.splitlines()) == len(rows)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """experiments/gpu_check.sh --dry-run: every step of the GPU check, tiny and on CPU."""
    r = subprocess.run(["bash", "experiments/gpu_check.sh", "--dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert sorted(res["seconds"]) == ["bench", "finetune", "finetune_fsdp", "pytest", "sample_chat",
                                      "sample_eager", "sample_video", "toy"]
    log = (tmp_path / "log.txt").read_text()
    assert "frames [0, 1, 2, 4]" in log  # 6 pictures, 4 frames: get_index's choice
    assert "skipped" in res["pytest"] or "passed" in res["pytest"]
    for run in ("toy", "finetune", "finetune_fsdp"):
        assert math.isfinite(res[run]["last_loss"]) and res[run]["tok_per_s"] > 0, run
    assert res["finetune"]["last_loss"] == res["finetune_fsdp"]["last_loss"]  # 1 rank: no shards
    bench = json.loads((tmp_path / "bench.json").read_text())["shapes"]["tiny"]
    assert {"prefill_1tile", "train_memory", "train_memory_step"} <= set(bench)
    md = (tmp_path / "results.md").read_text()
    assert "| finetune_fsdp |" in md and "peak RSS of one training step" in md
    r = subprocess.run(["bash", "experiments/gpu_check.sh", "--bogus"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unknown flag '--bogus'")


def test_scratch_output_unless_published():
    """A plain run writes under runs/bench; only --publish replaces the committed bench/results."""
    r = subprocess.run([sys.executable, "bench.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    help_text = " ".join(r.stdout.split())
    assert "runs/bench/results.json" in help_text and "--publish" in help_text
