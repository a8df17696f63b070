#!/usr/bin/env bash
# The GPU check: one command on one H100/H200 (about 8 minutes), figures into
# experiments/results/gpu_check/results.{md,json}:
#   1. the tests marked cuda (pytest -m cuda)
#   2. sample.py on CUDA, bf16, eager and compiled (CUDA-graph decode), random 1B-shape weights
#   3. bench.py --device cuda, nanovl3 and transformers side by side on the same GPU (1B shape), and
#      the peak memory of a training step with and without activation checkpointing
#   4. the GPU toy run (train.py --preset toy-gpu, shortened) and fine-tuning the 1B checkpoint
#      (--grad-checkpoint --freeze vit), alone and under torchrun --fsdp with one process
#
#     bash experiments/gpu_check.sh                  # on the GPU machine
#     bash experiments/gpu_check.sh --dry-run   # the same steps at tiny sizes on CPU, fewer of
#                                               # them (tests/test_bench.py runs it: it can't rot)
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        *) echo "error: unknown flag '$1' (use --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$DRY" = 1 ]; then  # tiny sizes on CPU; never over the committed results
    OUT=${OUT:-$(mktemp -d -t gpu_check.XXXX)}
    DEV=cpu SHAPE=toy DTYPE=float32 DATA=$OUT/world TESTS=tests/test_fsdp.py MODES=eager
    BENCH=(--short --no-hf --figures prefill,memory)
    TOY=(--preset toy --pretrain-steps 1 --sft-steps 1 --max-packed-tokens 512 --eval-per-type 1)
    FT=(--sft-steps 1 --max-packed-tokens 512 --max-tiles 1)
    NEW=8
    python -c "from data import toyworld; import sys; toyworld.generate(sys.argv[1], seed=0, \
**{**toyworld.SIZES['small'], 'n_eval': 3})" "$DATA" > /dev/null
else
    OUT=${OUT:-experiments/results/gpu_check}
    DEV=cuda SHAPE=internvl3-1b DTYPE=bfloat16 DATA=data/toy TESTS=tests MODES="eager compiled"
    BENCH=(--shape internvl3-1b --figures prefill,decode,train,memory --repeats 3 --new-tokens 64)
    TOY=(--preset toy-gpu --pretrain-steps 100 --sft-steps 400 --eval-per-type 50)
    FT=(--sft-steps 20 --max-packed-tokens 4096 --max-tiles 4)
    NEW=64
    python -c "from data import toyworld; toyworld.ensure('data/toy')"
fi
mkdir -p "$OUT"
LOG=$OUT/log.txt
: > "$LOG"
step() { echo "== $*" | tee -a "$LOG"; }
timed() {  # timed NAME CMD...: run, log, record the wall seconds in $OUT/times.txt
    local name=$1 t0; shift
    t0=$(date +%s%N)
    if ! "$@" >> "$LOG" 2>&1; then
        tail -20 "$LOG" >&2
        echo "error: step '$name' failed (whole log: $LOG)" >&2
        exit 1
    fi
    echo "$name $(( $(date +%s%N) - t0 ))" >> "$OUT/times.txt"  # nanoseconds
}
: > "$OUT/times.txt"

step "1. tests marked cuda"
timed pytest python -m pytest -q -m cuda $TESTS -p no:cacheprovider

step "2. sample.py on $DEV, $DTYPE, eager and compiled, random $SHAPE-shape checkpoint"
python - "$OUT/ckpt" "$SHAPE" "$DATA" "$DEV" <<'EOF'
import sys

import torch

from nanovl3.chat import Tokenizer
from nanovl3.config import preset
from nanovl3.model import InternVL

out, shape, data, dev = sys.argv[1:]
tok = Tokenizer.from_dir(data)  # the toy tokenizer: its ids all lie inside the 1B vocabulary
cfg = preset(shape)
cfg.image_token_id = tok.img_context_id
cfg.text.vocab_size = max(cfg.text.vocab_size, tok.vocab_size)
cfg.text.bos_token_id, cfg.text.eos_token_id = tok.endoftext_id, tok.im_end_id
torch.manual_seed(0)
with torch.device("meta"):
    model = InternVL(cfg)
model = model.to_empty(device=dev)
model.init_weights()
model.to("cpu", torch.bfloat16).save_pretrained(out, tokenizer=tok)
EOF
IMG=$(ls "$DATA"/eval/images/*.png | head -1)
for mode in $MODES; do
    flag=$([ $mode = compiled ] && echo --compile || true)
    timed "sample_$mode" python sample.py --ckpt "$OUT/ckpt" --image "$IMG" --device "$DEV" \
        --dtype "$DTYPE" --prompt "What colour is the shape?" --max-new-tokens $NEW $flag
done
# the model card's other uses on the same device: two chat turns, a video of eval pictures
python -c "import sys; from PIL import Image; f = [Image.open(p) for p in sys.argv[2:]]; \
f[0].save(sys.argv[1], save_all=True, append_images=f[1:])" "$OUT/clip.gif" \
    $(ls "$DATA"/eval/images/*.png | head -6)
ON=(--ckpt "$OUT/ckpt" --device "$DEV" --dtype "$DTYPE" --max-new-tokens 8)
timed sample_chat bash -c 'printf "What colour is it?\nAnd its shape?\n" | python sample.py \
    "$@" --chat' _ "${ON[@]}" --image "$IMG"
timed sample_video python sample.py "${ON[@]}" --video "$OUT/clip.gif" --num-frames 4 \
    --prompt "What changes?" --show-prompt

step "3. bench.py --device $DEV ${BENCH[*]}"
timed bench python bench.py --device "$DEV" "${BENCH[@]}" --out "$OUT/bench.json"

step "4. toy run, then fine-tuning the $SHAPE checkpoint: alone, and FSDP with one process"
timed toy python train.py --device "$DEV" "${TOY[@]}" --data-dir "$DATA" --out-dir "$OUT/toy" \
    --overwrite
FINETUNE=(--device "$DEV" --stage sft --init-from "$OUT/ckpt" --sft-meta "$DATA/sft/meta.json"
          --data-dir "$DATA" --eval-per-type 0 --log-interval 5 --ckpt-interval 1000
          --grad-checkpoint --freeze vit "${FT[@]}")
timed finetune python train.py "${FINETUNE[@]}" --out-dir "$OUT/finetune" --overwrite
timed finetune_fsdp python -m torch.distributed.run --standalone --nproc-per-node 1 train.py \
    "${FINETUNE[@]}" --fsdp --out-dir "$OUT/finetune_fsdp" --overwrite

python - "$OUT" "$DEV" <<'EOF'
import json
import os
import sys

import torch

out, dev = sys.argv[1:]
times = dict(line.split() for line in open(os.path.join(out, "times.txt")))
log = open(os.path.join(out, "log.txt")).read()
res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)",
       "torch": torch.__version__, "seconds": {k: round(int(v) / 1e9, 1) for k, v in times.items()},
       "pytest": next((l for l in log.splitlines() if " passed" in l or " skipped" in l), "")}
for run in ("toy", "finetune", "finetune_fsdp"):
    rows = [json.loads(l) for l in open(os.path.join(out, run, "metrics.jsonl"))]
    speed = [r for r in rows if "tok_per_s" in r]
    res[run] = {"last_loss": [r["loss"] for r in rows if "loss" in r][-1],
                "tok_per_s": speed[-1]["tok_per_s"], "mfu": speed[-1]["mfu"],
                "max_memory_gib": speed[-1].get("max_memory_gib")}
evals = os.path.join(out, "toy", "eval.json")
if os.path.isfile(evals):
    res["toy"]["accuracy"] = {k: v["accuracy"] for k, v in json.load(open(evals))["types"].items()}
bench = open(os.path.join(out, "bench.md")).read().split("\n\n")
json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=1)
md = [f"# GPU check: {res['device']}, torch {res['torch']}", "",
      f"`bash experiments/gpu_check.sh` (log.txt has every step's output). Tests marked cuda: "
      f"{res['pytest']}", "", "| step | wall s |", "|---|---|"]
md += [f"| {k} | {v} |" for k, v in res["seconds"].items()]
md += ["", "| run | last loss | tok/s | MFU | peak GPU memory (GiB) |", "|---|---|---|---|---|"]
for run in ("toy", "finetune", "finetune_fsdp"):
    r = res[run]
    mem = "—" if r["max_memory_gib"] is None else f"{r['max_memory_gib']:.2f}"
    md.append(f"| {run} | {r['last_loss']:.4f} | {r['tok_per_s']:,.0f} | "
              f"{100 * r['mfu']:.1f}% | {mem} |")
md += ["", "## bench.py", "", *bench[1:]]
open(os.path.join(out, "results.md"), "w").write("\n".join(md).rstrip() + "\n")
print(f"wrote {out}/results.md and results.json")
EOF
