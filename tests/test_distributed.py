"""torchrun on CPU (gloo): 2 ranks with batch b give the step-1 loss and gradients of 1 process with batch 2b."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import subprocess_env

SCRIPT = Path(__file__).parent / "scripts" / "ddp_step.py"
STAGE_SCRIPT = Path(__file__).parent / "scripts" / "stage_ranks.py"


def _run(args: list[str], tmp_path: Path) -> None:
    # the gloo path on the CPU even where a GPU is visible (two ranks on one GPU is no NCCL setup)
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")
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
    one = torch.load(single, weights_only=True)
    two = torch.load(double, weights_only=True)
    assert one.keys() == two.keys() == {"pretrain/1", "pretrain/2", "captioner/2", "filter/1"}
    for case in one:
        a, b = one[case], two[case]
        assert torch.allclose(a["losses"], b["losses"], atol=1e-5), (case, a["losses"], b["losses"])
        assert a["grads"].keys() == b["grads"].keys()
        # a parameter outside the stage's losses has no gradient on either side
        unused = {k for k, g in a["grads"].items() if g is None}
        assert unused == {k for k, g in b["grads"].items() if g is None}, case
        scale = max(float(g.abs().max()) for g in a["grads"].values() if g is not None)
        worst = max(
            float((a["grads"][k] - b["grads"][k]).abs().max())
            for k in a["grads"]
            if k not in unused
        )
        assert worst <= 1e-5 * max(1.0, scale), (case, worst)
        # AdamW moves exactly the parameters with a gradient (no weight decay on the others)
        assert a["moved"] == b["moved"] == {k: k not in unused for k in a["grads"]}, case
    stages = {"pretrain/1": 3, "captioner/2": 1, "filter/1": 2}
    for case, n_losses in stages.items():
        assert int((one[case]["losses"] > 0).sum()) == n_losses, (
            case
        )  # the stage's losses took part
    assert not any(g is None for g in one["pretrain/1"]["grads"].values())
    captioner_unused = {k for k, g in one["captioner/2"]["grads"].items() if g is None}
    assert {"itm_head.weight", "vision_proj.weight", "temp"} <= captioner_unused
    filter_unused = {k for k, g in one["filter/1"]["grads"].items() if g is None}
    assert "text_decoder.cls.predictions.transform.dense.weight" in filter_unused
    # accumulation over two micro-batches is a different step from one batch of 8, not a no-op
    assert not torch.allclose(one["pretrain/1"]["losses"], one["pretrain/2"]["losses"])


def test_each_rank_takes_a_visible_gpu(monkeypatch):
    from capfilt.utils.dist import local_gpu

    # torchrun: every GPU of the node visible, a rank's LOCAL_RANK is its device
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert [local_gpu(r) for r in (0, 3, 7)] == [0, 3, 7]
    # one GPU per process (SLURM --gpus-per-task=1): each sees its own as device 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [local_gpu(r) for r in (0, 3, 7)] == [0, 0, 0]


def test_the_backend_follows_the_collectives_device(monkeypatch):
    from capfilt.utils.dist import backend_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend_for() == "nccl" and backend_for("cuda:1") == "nccl"
    # `eval retrieval --device cpu` under torchrun on a GPU node
    assert backend_for("cpu") == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend_for() == "gloo"


def test_a_stage_waits_for_every_rank_before_its_sizes_json(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [*cmd, str(STAGE_SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # shards 1 and 3 are the slow rank's: counted in the stage's totals and its sizes.json
    assert "samples 10" in proc.stdout
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {f"{i:08d}.tar": i + 1 for i in range(4)}


def test_a_folder_in_use_stops_every_rank_of_an_import_at_once(tmp_path):
    """An import joins no process group for a model: the folder lock must, or rank 0 alone
    learns that another job holds the folder and the others wait in the group's set-up (under
    torchrun until it kills them; across nodes, until the rendezvous times out)."""
    import socket

    from PIL import Image

    from capfilt.utils.lock import folder_lock

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(images / f"{i}.jpg")
        (images / f"{i}.txt").write_text(f"caption {i}\n")
    out = tmp_path / "out"
    with socket.socket() as sock:  # a free port for the ranks' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [
        sys.executable,
        "-m",
        "capfilt",
        "data",
        "import",
        "folder",
        str(images),
        "--out",
        str(out),
    ]
    world = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    with folder_lock(out):  # another job's
        # the ranks started as torchrun starts them, so that each one's own exit is seen
        ranks = [
            subprocess.Popen(
                cmd,
                env=subprocess_env(CUDA_VISIBLE_DEVICES="", RANK=r, LOCAL_RANK=r, **world),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in ("0", "1")
        ]
        try:
            outputs = [rank.communicate(timeout=60) for rank in ranks]
        finally:
            for rank in ranks:
                rank.kill()
    assert [rank.returncode for rank in ranks] == [2, 2]
    said = "".join(err for _, err in outputs)
    assert said.count("is in use by another capfilt process") == 1, said[-3000:]
