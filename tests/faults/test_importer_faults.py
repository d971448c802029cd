"""What real photos and tables showed the importers: TSV quotes, GIF/BMP/TIFF in a folder,
16-bit PNG, and a missing-image failure that says where the paths were looked for."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from capfilt.data.importers import folder_records, import_records, table_records
from capfilt.data.reader import read_samples
from capfilt.data.shards import expand_shards
from capfilt.data.stage import StageError

from .conftest import jpeg


def _image(fmt: str, mode_array=None) -> bytes:
    buf = io.BytesIO()
    image = (
        Image.fromarray(mode_array)
        if mode_array is not None
        else Image.new("RGB", (16, 16), (0, 0, 220))
    )
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_tsv_caption_keeps_its_leading_quote(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    (tmp_path / "t.tsv").write_text('image\tcaption\na.jpg\t"Mona" on a wall, 1503\n')
    [record] = table_records(tmp_path / "t.tsv")
    assert record.captions == ['"Mona" on a wall, 1503']


def test_folder_import_takes_gif_bmp_tiff_and_16bit_png(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    grey16 = np.full((16, 16), 200 * 257, dtype=np.uint16)
    files = {
        "a.gif": _image("GIF"),
        "b.bmp": _image("BMP"),
        "c.tif": _image("TIFF"),
        "d.png": _image("PNG", grey16),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
        (src / name).with_suffix(".txt").write_text(f"picture {name}")
    result = import_records(folder_records(src), tmp_path / "out", source="folder")
    assert result.stats["count"] == 4 and result.stats["skipped"] == {}
    samples = {s.meta["file"]: s for s in read_samples(expand_shards(str(tmp_path / "out")))}
    assert {k: s.image_ext for k, s in samples.items()} == {
        "a.gif": "gif",
        "b.bmp": "bmp",
        "c.tif": "tiff",
        "d.png": "png",
    }
    assert all(samples[k].image_bytes == files[k] for k in files)  # original bytes, no re-encoding
    assert samples["d.png"].image.getpixel((5, 5)) == (200, 200, 200)  # not clipped to white


def test_missing_images_name_a_tried_path_and_image_root(tmp_path):
    (tmp_path / "t.csv").write_text("image,caption\nimgs/a.jpg,a cat\nimgs/b.jpg,a dog\n")
    with pytest.raises(StageError) as err:
        import_records(table_records(tmp_path / "t.csv"), tmp_path / "out", source="csv")
    message = str(err.value)
    assert "every input sample was rejected (missing_image: 2)" in message
    assert str(tmp_path / "imgs" / "a.jpg") in message and "--image-root" in message
