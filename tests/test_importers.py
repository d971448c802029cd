"""Importers: COCO, CSV/TSV, sidecar folder, HF datasets / parquet; exact read-back and resume after a kill."""

from __future__ import annotations

import filecmp
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from PIL import Image

from capfilt.data.importers import (
    ImportSourceError,
    coco_records,
    folder_records,
    hf_records,
    import_records,
    table_records,
)
from capfilt.data.reader import SkipCounter, read_samples
from capfilt.data.shards import expand_shards
from tests.conftest import coco_captions


def _read_all(folder):
    counter = SkipCounter()
    return list(read_samples(expand_shards(str(folder)), counter)), counter


def test_coco_mini_imports_exactly(coco_mini, tmp_path):
    total_images, total_captions = 0, 0
    for split in ("train2017", "val2017"):
        ann = coco_mini / "annotations" / f"captions_{split}.json"
        result = import_records(
            coco_records(ann, coco_mini / split), tmp_path / split, source="coco", shard_size=32
        )
        assert not result.partial
        samples, counter = _read_all(tmp_path / split)
        assert counter.total == 0
        truth = coco_captions(ann)
        meta = {im["id"]: im["file_name"] for im in json.loads(ann.read_text())["images"]}
        assert len(samples) == len(truth)
        for sample in samples:
            coco_id = sample.meta["coco_id"]
            assert sample.image_bytes == (coco_mini / split / meta[coco_id]).read_bytes()
            assert [c["text"] for c in sample.captions] == truth[coco_id]
            assert all(c["origin"] == "human" for c in sample.captions)
            assert sample.text == truth[coco_id][0]
        total_images += len(samples)
        total_captions += sum(len(s.captions) for s in samples)
        sizes = json.loads((tmp_path / split / "sizes.json").read_text())
        assert sum(sizes.values()) == len(samples)
    assert (total_images, total_captions) == (159, 795)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_csv_folder_and_bad_rows(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(_png((255, 0, 0)))
    (images / "b.png").write_bytes(_png((0, 255, 0)))
    (images / "bad.png").write_bytes(b"not an image")
    (images / "a.txt").write_text("a red square\nanother caption\n")
    (images / "bad.txt").write_text("whatever")
    # b.png has no sidecar: skipped as missing_caption
    result = import_records(
        folder_records(images), tmp_path / "from_folder", source="folder", origin="web"
    )
    samples, _ = _read_all(tmp_path / "from_folder")
    assert [s.text for s in samples] == ["a red square"]
    assert [c["text"] for c in samples[0].captions] == ["a red square", "another caption"]
    assert result.stats["skipped"] == {"missing_caption": 1, "undecodable_image": 1}
    table = pd.read_parquet(tmp_path / "from_folder" / "00000000.parquet")
    assert sorted(table["status"]) == ["kept", "skipped", "skipped"]
    # Pillow's message without its in-memory file's address: the same bytes at every run
    bad = table[table["reason"] == "undecodable_image"]
    assert list(bad["detail"]) == ["UnidentifiedImageError: cannot identify image file"]

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text(
        "image\tcaption\nimgs/a.png\tfirst\nimgs/b.png\tgreen one\nimgs/a.png\tsecond\nimgs/missing.png\tgone\n"
    )
    result = import_records(table_records(tsv), tmp_path / "from_tsv", source="csv", origin="web")
    samples, _ = _read_all(tmp_path / "from_tsv")
    assert [[c["text"] for c in s.captions] for s in samples] == [
        ["first", "second"],
        ["green one"],
    ]
    assert (
        samples[1].image_bytes == (images / "b.png").read_bytes() and samples[1].image_ext == "png"
    )
    assert result.stats["skipped"] == {"missing_image": 1}
    with pytest.raises(ImportSourceError, match="no column 'url'"):
        table_records(tsv, image_column="url")


def test_hf_dataset_and_parquet(coco_mini, tmp_path):
    import datasets

    files = sorted((coco_mini / "val2017").glob("*.jpg"))[:5]
    ds = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "caption": [f"caption {i}" for i in range(5)]}
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    import_records(hf_records(tmp_path / "saved"), tmp_path / "from_hf", source="hf")
    samples, counter = _read_all(tmp_path / "from_hf")
    assert counter.total == 0
    assert [s.text for s in samples] == [f"caption {i}" for i in range(5)]
    assert [s.image_bytes for s in samples] == [f.read_bytes() for f in files]

    frame = pd.DataFrame(
        {
            "image": [{"bytes": f.read_bytes(), "path": None} for f in files],
            "text": [[f"c{i}", "x"] for i in range(5)],
        }
    )
    frame.to_parquet(tmp_path / "part.parquet")
    import_records(
        hf_records(tmp_path / "part.parquet", caption_column="text"),
        tmp_path / "from_pq",
        source="hf",
    )
    samples, _ = _read_all(tmp_path / "from_pq")
    assert [[c["text"] for c in s.captions] for s in samples] == [[f"c{i}", "x"] for i in range(5)]
    assert samples[2].image_bytes == files[2].read_bytes()


def _import_cmd(coco_mini, out):
    split = "val2017"
    return [
        sys.executable,
        "-m",
        "capfilt",
        "data",
        "import",
        "coco",
        str(coco_mini / "annotations" / f"captions_{split}.json"),
        str(coco_mini / split),
        "--out",
        str(out),
        "--shard-size",
        "4",
    ]


def test_import_killed_midway_resumes_to_identical_output(coco_mini, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_import_cmd(coco_mini, reference), check=True, capture_output=True)
    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(
        _import_cmd(coco_mini, resumed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(resumed.glob("*_stats.json"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(resumed.glob("*_stats.json")))
    assert 3 <= done_before < 20, "the kill should land mid-way"
    # Whatever is visible under a final name is whole: every tar with a done-marker reads back.
    for stats in resumed.glob("*_stats.json"):
        tar = resumed / json.loads(stats.read_text())["shard"]
        assert len(list(read_samples([str(tar)]))) == json.loads(stats.read_text())["count"]
    subprocess.run(_import_cmd(coco_mini, resumed), check=True, capture_output=True)
    left = sorted(p.name for p in reference.iterdir())
    assert left == sorted(p.name for p in resumed.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(reference, resumed, left, shallow=False)
    assert not mismatch and not errors


def test_cli_import_errors_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "capfilt",
            "data",
            "import",
            "coco",
            str(tmp_path / "none.json"),
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "not found" in proc.stderr
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_a_subset_splits_one_source_in_two(tmp_path, capsys):
    """``--subset :3`` and ``--subset 3:`` import disjoint parts of one source, in its order
    (a folder by file name), which together are the whole; a bad or empty subset exits 2."""
    from tests.faults._cli import image_folder, run_cli

    images = image_folder(tmp_path / "images", 5)
    keys = {}
    for name, subset in (("web", ":3"), ("test", "3:"), ("all", None)):
        args = ["data", "import", "folder", images, "--out", tmp_path / name]
        result = run_cli(capsys, *args, *(["--subset", subset] if subset else []))
        assert result.code == 0, result.output
        keys[name] = [s.key for s in read_samples(expand_shards([str(tmp_path / name)]))]
    assert len(keys["web"]) == 3 and len(keys["test"]) == 2
    assert keys["web"] + keys["test"] == keys["all"]
    for subset, said in (("5:", "selects none of the source's 5 images"), ("2", "START:END")):
        result = run_cli(capsys, "data", "import", "folder", images, "--out", tmp_path / "x",
                         "--subset", subset)  # fmt: skip
        assert result.code == 2 and said in result.stderr, result.output
    assert not (tmp_path / "x").exists()
