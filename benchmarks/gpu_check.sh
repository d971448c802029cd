#!/usr/bin/env bash
# One command on one CUDA GPU (H100/H200), under 8 minutes: `just bench-gpu` or
#   bash benchmarks/gpu_check.sh [OUT]          (default OUT: gpu-check-out)
#
# Steps, each under its own time limit; a failing step is reported and the next one runs:
#   1. the test suite with CUDA visible (not the slow-marked tests);
#   2. the demo (`capfilt demo`);
#   3. BLIP-base pretraining MFU: benchmarks/pretrain_throughput.py, random weights, a 30,522-token
#      vocabulary, batch 64, bf16; the peak is an 8192² bf16 matmul timed between the step blocks;
#   4. `capfilt pretrain` at BLIP-base with its loader (samples/s from metrics.jsonl, to compare
#      with step 3's model-only rate);
#   5. caption and filter stage throughput (images/s) at BLIP-base on ../shared/data/coco-mini's
#      photos, each copied 10 times;
#   6. the comparison with transformers' BLIP classes (benchmarks/caption_filter_vs_transformers.py).
# Everything lands in OUT/ (logs per step, summary.txt at the end).
#
# The GPU image lacks braceexpand, webdataset and datasets (it cannot reach a package index).
# On a machine that can, for the GPU image's Python (here 3.11, Linux x86-64):
#   pip download --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#       -d wheels braceexpand webdataset datasets
# copy wheels/ next to the checkout, then this script installs them (into OUT/deps, on PYTHONPATH,
# so the image's own packages stay untouched):
#   WHEELS=wheels bash benchmarks/gpu_check.sh
set -uo pipefail

OUT=${1:-gpu-check-out}
PY=${PY:-python}
COCO=${COCO:-../shared/data/coco-mini}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, record the outcome
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    note "$(printf '%-16s rc=%-3s %4ss  (log: %s)' "$name" "$rc" $((SECONDS - start)) "$OUT/$name.log")"
    return $rc
}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PY" >&2
    exit 2
fi
if [ -n "${WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --find-links "$WHEELS" --target "$OUT/deps" \
        braceexpand webdataset datasets || exit 2
    export PYTHONPATH="$PYTHONPATH:$OUT/deps"
fi
if ! $PY -c "import braceexpand, webdataset, datasets" 2>/dev/null; then
    echo "braceexpand, webdataset or datasets missing: see the header of $0 (WHEELS=...)" >&2
    exit 2
fi
note "$($PY -c "import torch; print(torch.cuda.get_device_name(), 'torch', torch.__version__)")"

# 1. the suite with CUDA visible
step suite 210 $PY -m pytest -q -x -m "not slow" -p no:cacheprovider
tail -n 3 "$OUT/suite.log" | tee -a "$SUMMARY"

# 2. the demo
step demo 150 $PY -m capfilt demo --out "$OUT/demo"
tail -n 20 "$OUT/demo.log" >>"$SUMMARY"

# 3. BLIP-base pretrain MFU (model only)
BASE_SETS=(--set model.vision_checkpoint=null --set model.text_checkpoint=null --set model.tokenizer=null)
step pretrain_mfu 90 $PY benchmarks/pretrain_throughput.py --recipe blip-base --batch 64 \
    --vocab 30522 --matmul-size 8192 --steps 10 --rounds 3 "${BASE_SETS[@]}" \
    --json "$OUT/pretrain_mfu.json"
grep -E "samples_per_s|mfu" "$OUT/pretrain_mfu.log" | tee -a "$SUMMARY"

# 5 (data first). coco-mini photos, each copied 10 times, as an image folder with one caption each
$PY - "$COCO" "$OUT/photos" <<'EOF'
import json, shutil, sys
from pathlib import Path
coco, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
for split in ("train2017", "val2017"):
    anns = json.loads((coco / "annotations" / f"captions_{split}.json").read_text())
    caption = {}
    for a in anns["annotations"]:
        caption.setdefault(a["image_id"], a["caption"])
    for img in anns["images"]:
        src = coco / split / img["file_name"]
        if not src.is_file() or img["id"] not in caption:
            continue
        for copy in range(10):
            stem = f"{split}_{img['id']}_{copy}"
            shutil.copyfile(src, out / f"{stem}.jpg")
            (out / f"{stem}.txt").write_text(caption[img["id"]])
print(len(list(out.glob("*.jpg"))), "images")
EOF
$PY -m capfilt data import folder "$OUT/photos" --out "$OUT/coco10x" --shard-size 100 >"$OUT/import.log" 2>&1

# 4. capfilt pretrain at BLIP-base with its loader (tokenizer trained on the captions)
step pretrain_cli 120 $PY -m capfilt pretrain blip-base --shards "$OUT/coco10x" --out "$OUT/pre" \
    "${BASE_SETS[@]}" --set data.batch_size=64 --set data.num_workers=8 --set train.epochs=1 \
    --set train.samples_per_epoch=1920 --set train.log_every=5 --set train.ckpt_every=100000 \
    --set model.vocab_size=30522
tail -n 3 "$OUT/pre/metrics.jsonl" 2>/dev/null | tee -a "$SUMMARY"

# 5. caption and filter throughput on the photos (BLIP-base sizes, random weights)
$PY - "$OUT" <<'EOF'
import sys
from pathlib import Path
import torch
from capfilt.config import load_recipe
from capfilt.data.transforms import preprocess_spec
from capfilt.model import build_model, save_model_folder, train_wordpiece_tokenizer
out = Path(sys.argv[1])
cfg = load_recipe("blip-base", ["model.vision_checkpoint=null", "model.text_checkpoint=null",
                                "model.tokenizer=null"]).model
tok = train_wordpiece_tokenizer(["a picture of a cat on a mat"] * 10, 200)
tok.add_tokens([f"[unused{i}]" for i in range(30522 - len(tok))])
torch.manual_seed(0)
model = build_model(cfg, tok)
for stage in ("captioner", "filter"):
    save_model_folder(out / f"model_{stage}", model, tok, cfg, stage,
                      preprocess=preprocess_spec(cfg.image_size))
EOF
N=$(find "$OUT/photos" -name '*.jpg' | wc -l)
for stage in caption filter; do
    model=captioner
    [ $stage = filter ] && model=filter
    shards="$OUT/coco10x"
    [ $stage = filter ] && shards="$OUT/captioned"
    out_dir="$OUT/captioned"
    [ $stage = filter ] && out_dir="$OUT/filtered"
    start=$($PY -c "import time; print(time.time())")
    step "$stage" 90 $PY -m capfilt $stage blip-base --model "$OUT/model_$model" \
        --shards "$shards" --out "$out_dir" --set caption.batch_size=128 --set filter.batch_size=128
    note "$stage: $($PY -c "import time; s = time.time() - $start; print(f'$N images in {s:.1f} s, {$N / s:.0f} images/s (process start and model load included)')")"
done

# 6. against transformers' BLIP classes (same weights, same inputs)
step vs_transformers 120 $PY benchmarks/caption_filter_vs_transformers.py
tail -n 25 "$OUT/vs_transformers.log" >>"$SUMMARY"

echo
cat "$SUMMARY"
