"""torchrun on CPU (gloo): 2 ranks with batch b give the step-1 loss and gradients of 1 process with batch 2b."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_step.py"


def _run(args: list[str], tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_ranks_match_one_process_with_double_batch(tmp_path):
    single, double = tmp_path / "single.pt", tmp_path / "ddp.pt"
    _run([sys.executable, str(SCRIPT), str(single)], tmp_path)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(SCRIPT),
            str(double),
        ],
        tmp_path,
    )
    a = torch.load(single, weights_only=True)
    b = torch.load(double, weights_only=True)
    assert torch.allclose(a["losses"], b["losses"], atol=1e-5), (a["losses"], b["losses"])
    assert all(float(x) > 0 for x in a["losses"])  # every loss took part
    assert a["grads"].keys() == b["grads"].keys()
    worst = max(float((a["grads"][k] - b["grads"][k]).abs().max()) for k in a["grads"])
    scale = max(float(g.abs().max()) for g in a["grads"].values())
    assert worst <= 1e-5 * max(1.0, scale), worst
    assert sum(float(g.abs().sum()) for g in a["grads"].values()) > 0
