# Developer tasks. `just setup` once, then `just test`, `just demo`, `just bench`.

venv := ".venv"
py := venv / "bin/python"

# Create the virtual environment and install capfilt with the dev tools.
setup:
    python3 -m venv {{venv}}
    {{venv}}/bin/pip install -e ".[dev]"

# The end-to-end demo on the built-in benchmark (about 10 minutes on 2 CPU cores).
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
