# Developer tasks. `just setup` once, then `just test`, `just demo`, `just bench`.

venv := ".venv"
py := venv / "bin/python"

# Create the virtual environment and install capfilt with the dev tools.
setup:
    python3 -m venv {{venv}}
    {{venv}}/bin/pip install -e ".[dev]"

# The end-to-end demo on the built-in benchmark (about 12½ minutes on 2 CPU cores).
demo out="demo-out":
    {{venv}}/bin/capfilt demo --out {{out}}

# The test suite (what CI runs).
test *args:
    {{py}} -m pytest -q {{args}}

# Lint and format check.
lint:
    {{venv}}/bin/ruff check capfilt tests benchmarks
    {{venv}}/bin/ruff format --check capfilt tests benchmarks

# Benchmarks (throughput and model FLOP utilisation; ratios against baselines in the same run).
bench:
    {{py}} benchmarks/pretrain_throughput.py --recipe demo

# Caption/filter vs transformers' BLIP, same weights: random, then a trained captioner (+6 min).
bench-vs-transformers out="/tmp/capfilt-bench/race-captioner":
    {{py}} benchmarks/caption_filter_vs_transformers.py
    CAPFILT={{venv}}/bin/capfilt bash benchmarks/race_captioner.sh {{out}}
    {{py}} benchmarks/caption_filter_vs_transformers.py --captioner {{out}}/cap/model --only caption

# Thread and loader-worker settings compared on this machine (pretraining steps of the demo recipe).
bench-threads:
    {{py}} benchmarks/threads.py --recipe demo

# On one CUDA GPU (H100/H200), under 8 minutes: the suite with CUDA, the demo, BLIP-base pretrain
# MFU, caption/filter throughput on real photos and the transformers comparison (see the script's
# header for bringing braceexpand/webdataset/datasets to a GPU image without a package index).
# `python` is the interpreter with torch+CUDA (a GPU image's own, not necessarily the venv's).
bench-gpu out="gpu-check-out" python="python":
    PY={{python}} bash benchmarks/gpu_check.sh {{out}}
