#!/usr/bin/env bash
# A demo-size captioner trained the demo's way, for the captioning race with the caption lengths
# of a trained model (a random-weight captioner has not learnt when to stop: every row runs to
# max_length, and capfilt's finished rows leaving the batch never show):
#
#   bash benchmarks/race_captioner.sh [OUT]       # ~6 min on 2 CPU cores (CAPFILT=.venv/bin/capfilt
#                                                 # when capfilt is not on PATH; `just` passes it)
#   python benchmarks/caption_filter_vs_transformers.py --captioner OUT/cap/model --only caption
#
# The demo recipe with the two changes that let transformers' BLIP classes run the same weights:
# the ViT's linear patch embedding instead of the conv stem, and [CLS] pooling for ITC (the
# captioner does not use ITC). Pretrain on the built-in benchmark's human + web shards, then
# fine-tune the captioner on the human ones; re-running resumes.
set -euo pipefail
OUT=${1:-/tmp/capfilt-bench/race-captioner}
CAPFILT=${CAPFILT:-capfilt}
SET=(--set "model.vision_stem=[]" --set model.image_pool=cls --set model.text_pool=cls)
"$CAPFILT" data synth demo --out "$OUT/data"
"$CAPFILT" pretrain demo --shards "$OUT/data/human" --shards "$OUT/data/web" --out "$OUT/pre" \
  --resume auto "${SET[@]}"
"$CAPFILT" finetune captioner demo --init "$OUT/pre/model" --shards "$OUT/data/human" \
  --out "$OUT/cap" --resume auto "${SET[@]}"
echo "captioner: $OUT/cap/model"
