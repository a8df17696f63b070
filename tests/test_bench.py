"""
bench.py --short runs end to end and writes every figure as finite positive numbers (no timing
assertions: the machines that run the tests are shared and noisy).

    python -m pytest -q tests/test_bench.py
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
