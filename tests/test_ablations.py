"""experiments/ablations.py at a tiny size: every ablation runs its real arms (train.py,
experiments/reasoning.py) for a few steps and writes the table and the plots, so the code cannot
rot. The numbers themselves mean nothing at this size."""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from experiments import ablations as A
from nanovl3.common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = [sys.executable, "-m", "experiments.ablations"]   # run from ROOT


@pytest.mark.slow
def test_every_ablation_runs_at_smoke_size(small_world, tmp_path):
    """With --jobs 2: the ablations and seeds run side by side, sharing pt_native and sft_native."""
    out = tmp_path / "abl"
    cmd = ABLATIONS + ["--size", "smoke", "--data-dir", str(small_world), "--out", str(out),
                       "--publish", str(tmp_path / "pub")]
    r = subprocess.run(cmd + ["--jobs", "2"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "pub" / "results.json").read_text())
    assert list(res["ablations"]) == ["native", "v2pe", "loss", "jpeg", "mpo"]
    assert res["seeds"] == [0, 1] and "CPU cores" in res["machine"]
    # every arm counted once: at least the arms of any one ablation, at most those of all of them
    # (shared arms)
    train = [ab["train_seconds"] for ab in res["ablations"].values()]
    assert max(train) <= res["arms_seconds"] <= sum(train)
    for name, ab in res["ablations"].items():
        img = Image.open(tmp_path / "pub" / ab["plot"])
        assert img.size == (720, 420)
        assert ab["train_seconds"] > 0
        for arm, metrics in ab["arms"].items():
            for k, m in metrics.items():
                assert len(m["seeds"]) == 2, (name, arm, k)
                assert min(m["seeds"]) <= m["mean"] <= max(m["seeds"])
    assert set(res["ablations"]["native"]["arms"]) == {"native", "post-hoc"}
    assert set(res["ablations"]["loss"]["arms"]) == {"token", "sample", "square"}
    assert {"train 1, eval 1", "train random, eval 1/256"} <= set(res["ablations"]["v2pe"]["arms"])
    jpeg = res["ablations"]["jpeg"]["arms"]
    assert set(jpeg) == {"JPEG augmentation", "no augmentation", "pixel check (no model)"}
    assert jpeg["pixel check (no model)"]["clean"]["seeds"] == [1.0, 1.0]   # no model: no seed
    table = (tmp_path / "pub" / "results.md").read_text()
    for name in res["ablations"]:   # every ablation has a row with a computed verdict
        rows = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
        assert rows and all(line.rstrip(" |").endswith(("yes", "no", "within noise",
                                                         "no (within noise)",
                                                         " (an arm did not learn the task)"))
                            for line in rows)
    # smoke arms learn nothing: every V2PE and JPEG row says so, and the arms are listed
    assert all(line.rstrip(" |").endswith("did not learn the task)") for line in table.splitlines()
               if line.startswith(("| v2pe |", "| jpeg |")))
    assert "jpeg: arms below 95% on clean: JPEG augmentation s0" in table
    assert {"PRM mean − majority, N=8", "PRM-weighted vote − majority, N=8"} <= \
        {line.split(" | ")[2] for line in table.splitlines() if line.startswith("| mpo |")}
    # every arm was trained once, shared ones included (each prints its command when it starts)
    started = [line.split("]")[0] for line in r.stdout.splitlines()
               if "] " in line and " --" in line]
    twice = sorted({a for a in started if started.count(a) > 1})
    # 14 train.py arms (the JPEG ablation's two on its own task) + reasoning, per seed
    assert len(started) == len(set(started)) == 2 * 15, (twice, r.stdout)
    # the arms are cached: a second run, one at a time, trains nothing and gives the same table
    r2 = subprocess.run(cmd[:-2] + ["--only", "loss"], capture_output=True, text=True, cwd=ROOT)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "] train.py" not in r2.stdout
    again = json.loads((out / "results.json").read_text())["ablations"]["loss"]["arms"]
    assert again == res["ablations"]["loss"]["arms"]


def test_runner_trains_a_shared_arm_once_and_stops_at_the_first_failure(tmp_path):
    """Arms asked for by several threads at once run once; a failed arm stops the one running beside
    it, and no arm starts after it. (The arms here are tiny python commands instead of train.py.)"""
    R = A.Runner(argparse.Namespace(out=str(tmp_path), jobs=2, redo=False), A.SIZES["smoke"],
                 tmp_path)
    count = tmp_path / "count.txt"
    with ThreadPoolExecutor(3) as pool:
        touch = ["-c", f"open({str(count)!r}, 'a').write('x')"]
        dirs = list(pool.map(lambda _: R.run("shared", 0, touch), range(3)))
    assert count.read_text() == "x" and len(set(dirs)) == 1 and (dirs[0] / "DONE").is_file()
    t = time.time()
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(R.run, "slow", 0, ["-c", "import time; time.sleep(60)"])
        while not R.procs:
            time.sleep(0.05)
        bad = pool.submit(R.run, "bad", 0, ["-c", "import sys; print('boom'); sys.exit(3)"])
        # the slow arm reports the failure that stopped it, not its own exit
        for job in (bad, slow):
            with pytest.raises(UserError, match=r"(?s)arm bad seed 0 failed \(exit 3\).*boom"):
                job.result()
    assert time.time() - t < 30
    with pytest.raises(UserError, match="arm bad seed 0"):
        R.run("later", 0, ["-c", "pass"])
    assert not (tmp_path / "arms" / "later").exists()
    assert not (tmp_path / "arms" / "slow" / "s0" / "DONE").exists()


def test_a_stopped_resumable_arm_keeps_its_files_and_any_other_starts_over(tmp_path):
    """An arm whose script carries on from what it left (reasoning.py) keeps its directory when
    the same command runs again after a stop; another arm starts in an empty one. The arm here
    adds a mark to a file in its directory and fails until it finds two."""
    def arm(name):
        marks = tmp_path / "arms" / name / "s0" / "marks.txt"
        return ["-c", f"import pathlib, sys; p = pathlib.Path({str(marks)!r}); "
                      "p.write_text((p.read_text() if p.exists() else '') + 'x'); "
                      "sys.exit(len(p.read_text()) < 2)"]

    def runner():
        return A.Runner(argparse.Namespace(out=str(tmp_path), jobs=1, redo=False),
                        A.SIZES["smoke"], tmp_path)
    for name, resumable in (("resumable", True), ("other", False)):
        with pytest.raises(UserError, match=f"arm {name} seed 0 failed"):
            runner().run(name, 0, arm(name), resumable=resumable)
    R = runner()
    d = R.run("resumable", 0, arm("resumable"), resumable=True)
    assert (d / "marks.txt").read_text() == "xx" and json.loads((d / "DONE").read_text())["resumed"]
    # its seconds are its last run's only, and the table says so, from the cache too
    cached = runner()
    assert cached.run("resumable", 0, arm("resumable"), resumable=True) == d
    assert R.resumed == cached.resumed == {str(d)}
    with pytest.raises(UserError, match="arm other seed 0 failed"):   # one mark again, never two
        runner().run("other", 0, arm("other"))
    assert (tmp_path / "arms" / "other" / "s0" / "marks.txt").read_text() == "x"


@pytest.mark.slow
def test_a_failed_arm_is_a_clear_error(small_world, tmp_path):
    r = subprocess.run(ABLATIONS + ["--size", "smoke", "--data-dir", str(small_world), "--out",
                                    str(tmp_path), "--only", "loss", "--jobs", "2", "--preset",
                                    "no-such-preset"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert all(s in r.stderr for s in ("arm pt_native seed", "log.txt", "no-such-preset"))
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_bad_arguments_are_one_line_errors(tmp_path):
    for flags, needle in ((["--only", "nope"], "--only"), (["--seeds", "a,b"], "--seeds"),
                          (["--jobs", "0"], "--jobs"), (["--set", "v2pe_sft=many"], "--set"),
                          (["--set", "seeds=3"], "--set")):
        r = subprocess.run(ABLATIONS + ["--out", str(tmp_path), *flags], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr


def test_verdict_pairs_the_seeds():
    """A difference is judged seed by seed: one that every seed shows counts even when the seeds'
    levels differ (unpaired, the arms' spreads would hide it); one below the 2-point floor never
    counts."""

    def cell(*seeds):
        return A.summarise({"m": list(seeds)})["m"]
    # +10 points on both seeds; each arm's spread is 10
    easy_hard = cell(0.80, 0.60), cell(0.70, 0.50)
    assert A.paired(*easy_hard) == pytest.approx((0.1, 0.0))
    assert A.verdict(*easy_hard, "higher") == "yes"
    assert A.verdict(easy_hard[1], easy_hard[0], "higher") == "no"
    assert A.verdict(cell(0.80, 0.50), cell(0.70, 0.60), "higher") == "within noise"   # +10 and -10
    # +1 on both: below the floor
    assert A.verdict(cell(0.51, 0.61), cell(0.50, 0.60), "higher") == "within noise"
    assert A.verdict(cell(0.49, 0.59), cell(0.50, 0.60), "comparable") == "yes"
    assert A.verdict(cell(0.40, 0.50), cell(0.50, 0.60), "comparable") == "no"


def test_within_noise_is_a_no_only_where_the_compared_arms_learnt_the_task():
    """A claimed effect within noise fails the claim when both arms compared learnt the task
    (LEARNT); when one did not, any verdict says so; the arms below the bar are named."""
    def cell(*seeds):
        return A.summarise({"m": list(seeds)})["m"]
    same = cell(0.51, 0.61), cell(0.50, 0.60)
    assert A.verdict(*same, "higher", learnt=True) == "no (within noise)"
    assert A.verdict(*same, "higher", learnt=False) == \
        "within noise (an arm did not learn the task)"
    assert A.verdict(cell(0.80, 0.60), cell(0.70, 0.50), "higher", learnt=False) == \
        "yes (an arm did not learn the task)"
    assert A.verdict(cell(0.80, 0.60), cell(0.70, 0.50), "higher", learnt=True) == "yes"
    # a critic that ranks like a coin can only lower a COIN row: its yes stands, nothing else
    assert A.verdict(cell(0.80, 0.60), cell(0.70, 0.50), A.COIN, learnt=False) == "yes"
    assert A.verdict(cell(0.70, 0.50), cell(0.80, 0.60), A.COIN, learnt=False) == \
        "no (an arm did not learn the task)"
    assert A.verdict(*same, A.COIN, learnt=False) == "within noise (an arm did not learn the task)"
    # ... and of the Best-of-N rows, all but the weighted vote's N = 8 − N = 1 (majority rises)
    bon = {k: cell(0.5, 0.6) for k in ("greedy_mpo", "greedy_sft", "majority_N8")
           } | {f"{c}_N{n}": cell(0.5, 0.6) for c in A.MPO_CRITICS for n in (1, 8)}
    wants = {r[0]: r[3] for r in A.CLAIMS["mpo"][1]({"reasoning": bon})}
    assert [w == A.COIN for w in wants.values()] == [False, True, False, True, True]
    assert wants["PRM-weighted vote N=8 − N=1"] == "higher"
    arms = {"JPEG augmentation": {"clean": cell(0.66, 1.0)},
            "no augmentation": {"clean": cell(1.0, 0.96)},
            "pixel check (no model)": {"jpeg_q10": cell(0.7, 0.7)}}
    assert A.unlearnt("jpeg", arms) == ["JPEG augmentation s0 66%"]
    arms["JPEG augmentation"]["clean"] = cell(0.95, 1.0)
    assert A.unlearnt("jpeg", arms) == [] and A.unlearnt("loss", arms) == []
    # a comparison checks only its own arms: a third arm below the bar does not count
    v2pe = {f"train {d}, eval {d}": {"images_4": cell(1.0, 1.0), "images_64": cell(0.5, 0.6)}
            for d in ("1", "1/4", "1/16")}
    v2pe["train 1/4, eval 1/4"]["images_4"] = cell(0.9, 1.0)
    assert A.unlearnt("v2pe", v2pe) == ["train 1/4, eval 1/4 s0 90%"]
    assert A.learnt("v2pe", v2pe, ("train 1/16, eval 1/16", "train 1, eval 1")) is True
    assert A.learnt("v2pe", v2pe, ("train 1/4, eval 1/4", "train 1, eval 1")) is False
    # the rows name their arms: the fixed-δ row reads δ 1/16 and δ 1
    v2pe.update({f"train random, eval {d}": {"images_4": cell(1.0, 1.0),
                                             "images_64": cell(0.5, 0.6)} for d in ("1/4", "1/16")})
    rows = {r[0]: r[4] for r in A.CLAIMS["v2pe"][1](v2pe)}
    assert rows["δ 1/16 − 1 (fixed), 64 pictures"] == ("train 1/16, eval 1/16", A.V2PE_NONE)
    # nothing to say: a row that checks no arm, or arms without the metric (older results)
    assert A.learnt("v2pe", v2pe, ()) is None and A.learnt("loss", v2pe, tuple(v2pe)) is None
    mpo = {"reasoning": {"greedy_mpo": cell(0.6, 0.6)}}
    assert A.learnt("mpo", mpo, ("reasoning",)) is None
    mpo["reasoning"]["prm_ranking"] = cell(0.55, 0.9)
    assert A.learnt("mpo", mpo, ("reasoning",)) is False


def test_report_redraws_the_table_and_names_a_key_older_results_lack(tmp_path):
    """--report: results.json -> results.md; results an older version wrote (V2PE at 16 pictures)
    end in one error naming the file and the key, before any file is written."""
    def cell(*seeds):
        return A.summarise({"m": list(seeds)})["m"]
    arms = {"token": {}, "sample": {}, "square": {}}
    for arm, short, long in (("token", 0.90, 0.6), ("sample", 0.91, 0.5), ("square", 0.71, 0.55)):
        arms[arm] = {"short_answers": cell(short, short), "long_answers": cell(long, long + 0.1)}
    results = {"command": "python -m experiments.ablations --only loss", "machine": "a CPU",
               "seeds": [0, 1], "size": "full", "ablations": {"loss": {"arms": arms}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    A.report(tmp_path, None)
    table = (tmp_path / "results.md").read_text()
    assert "| token − sample, long answers | +10.0 ± 0.0 (65.0 vs 55.0) | yes |" in table
    # the loss rows check their two arms' short answers (LEARNT): both learnt, so within noise is a
    # no; the square arm below the bar is named but not checked
    assert "| sample − token, short answers | +1.0 ± 0.0 (91.0 vs 90.0) | no (within noise) |" \
        in table and "square s0 71%" in table
    arms["token"]["short_answers"] = cell(0.90, 0.70)
    results |= {"arms_seconds": 600, "resumed_arms": 2}
    (tmp_path / "results.json").write_text(json.dumps(results))
    A.report(tmp_path, None)
    table = (tmp_path / "results.md").read_text()
    assert "| yes (an arm did not learn the task) |" in table and "token s1 70%" in table
    assert "the arms trained for 10 min (2 resumed arm(s): their last run only)" in table
    old = {f"train {t}, eval {d}": {"images_4": cell(1.0, 1.0), "images_16": cell(0.5, 0.6)}
           for d in A.FIXED_DELTAS for t in (d, "random")}
    results["ablations"] = {"v2pe": {"arms": old}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "results.md").unlink()
    with pytest.raises(UserError, match=r"results.json: no 'images_64'"):
        A.report(tmp_path, None)
    assert not (tmp_path / "results.md").exists()


def test_needle_data_has_one_shape_per_question(tmp_path):
    """The V2PE task: every question holds exactly one close-up among empty tiles, its answer is
    that close-up's colour, training lengths stay in NEEDLE_TRAIN, evaluation has n_eval questions
    per NEEDLE_IMAGES count, and the two draw on disjoint pictures."""
    A.make_needle_data(tmp_path, n_train=60, n_eval=3)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    lo, hi = A.NEEDLE_TRAIN
    assert len(train) == 60 and {len(r["image"]) for r in train} == set(range(lo, hi + 1))
    assert [len(r["image"]) for r in evals] == [n for n in A.NEEDLE_IMAGES for _ in range(3)]
    assert all(r["type"] == f"needle_{len(r['image'])}" for r in evals)
    pairs = [(r["image"], r["conversations"][1]["value"].rstrip(".").lower()) for r in train] \
        + [(r["image"], r["answer"]) for r in evals]
    for paths, answer in pairs:
        shapes = [p for p in paths if not p.startswith("images/empty_")]
        assert len(shapes) == 1 and shapes[0].startswith(f"images/{answer}_"), (paths, answer)
        assert (tmp_path / shapes[0]).is_file()
    assert not {p for r in train for p in r["image"]} & {p for r in evals for p in r["image"]}
    assert len({r["image"].index(s) for r in evals for s in r["image"]
                if not s.startswith("images/empty_")}) > 3   # the needle moves


def test_jpeg_detail_data_trains_with_and_without_augmentation(tmp_path):
    """The JPEG task: both metas train on the same questions, augmentation on and off; the held-out
    questions exist clean and at each JPEG quality, with the same answers, and the pixel check
    reads every clean picture."""
    A.make_detail_data(tmp_path, n_train=9, n_eval=6)
    meta = {w: json.loads((tmp_path / f"meta_{w}.json").read_text())["toy_stripes"]
            for w in ("aug", "noaug")}
    assert meta["aug"]["data_augment"] and not meta["noaug"]["data_augment"]
    assert meta["aug"]["annotation"] == meta["noaug"]["annotation"] == "train.jsonl"
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(train) == 9 and {r["conversations"][1]["value"] for r in train} == {
        "Horizontal.", "Vertical.", "Diagonal."}
    clean = (tmp_path / "eval.jsonl").read_text()
    assert sorted(json.loads(line)["answer"] for line in clean.splitlines()) == \
        ["diagonal", "diagonal", "horizontal", "horizontal", "vertical", "vertical"]
    for q in A.JPEG_QUALITIES:
        d = tmp_path / f"jpeg_q{q}"
        assert (d / "eval.jsonl").read_text() == clean
        rows = [json.loads(line) for line in clean.splitlines()]
        assert all((d / r["image"]).is_file() and (d / r["image"]).read_bytes() !=
                   (tmp_path / r["image"]).read_bytes() for r in rows)
    check = json.loads((tmp_path / "pixel_check.json").read_text())
    assert list(check) == ["clean"] + [f"jpeg_q{q}" for q in A.JPEG_QUALITIES]
    assert check["clean"] == {"pixel_check": 1.0, "pixel_change": 0.0}
    assert 0 < check["jpeg_q40"]["pixel_change"] < check["jpeg_q10"]["pixel_change"]


def test_jpeg_rows_judge_accuracy_and_its_change_from_clean():
    """The JPEG claim's rows: accuracy at each quality, with − without, and the change from clean
    to the harshest quality, which does not reward an arm for having learnt the task better."""
    def cell(*seeds):
        return A.summarise({"x": list(seeds)})["x"]
    arms = {"JPEG augmentation": {"clean": cell(0.9, 0.8), "jpeg_q40": cell(0.9, 0.8),
                                  "jpeg_q10": cell(0.8, 0.7)},
            "no augmentation": {"clean": cell(1.0, 1.0), "jpeg_q40": cell(0.9, 0.8),
                                "jpeg_q10": cell(0.7, 0.6)}}
    rows = A.CLAIMS["jpeg"][1](arms)
    assert [r[0] for r in rows] == ["with − without, fine stripes at JPEG q=40",
                                    "with − without, fine stripes at JPEG q=10",
                                    "with − without, change from clean to q=10"]
    assert [A.verdict(*r[1:4]) for r in rows] == ["within noise", "yes", "yes"]
    assert A.paired(rows[2][1], rows[2][2])[0] == pytest.approx(0.25)   # −0.1 vs −0.3, −0.4
