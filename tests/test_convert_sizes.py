"""Own faces through pipelines/convert.py: a size mismatch stops the conversion naming the file and the fixes;
--resize and --align (5-point landmarks) give shards of one size that training reads with data.image_size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magface.data.codec import decode_jpeg, encode_jpeg

from tests.test_convert import convert_cli  # noqa: F401 - the pipelines/convert.py main() fixture


def _smooth(size: int, seed: int) -> np.ndarray:
    """A smooth image (JPEG barely changes it), different per seed."""
    y, x = np.mgrid[0:size, 0:size] / size
    a, b = np.random.default_rng(seed).uniform(0.5, 2.0, 2)
    img = np.stack([128 + 100 * np.sin(a * 3 * x), 128 + 100 * np.cos(b * 3 * y), 128 + 60 * np.sin(3 * (x + y))], -1)
    return img.astype(np.uint8)


def _folder(root: Path, sizes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    out = {}
    for person, per_image in sizes.items():
        (root / person).mkdir(parents=True)
        for j, s in enumerate(per_image):
            img = _smooth(s, len(out))
            (root / person / f"{j}.jpg").write_bytes(encode_jpeg(img, quality=95))
            out[f"{person}/{j}.jpg"] = img
    return out


def _images(out: Path) -> list[tuple[int, np.ndarray]]:
    from magface.recordio import MXIndexedRecordIO, unpack

    rows = []
    for rec in sorted(out.glob("*.rec")):
        with MXIndexedRecordIO(str(rec)[:-4] + ".idx", str(rec), "r") as r:
            first_id = int(unpack(r.read_idx(0))[0].label[0])
            for k in range(1, first_id):
                h, img = unpack(r.read_idx(k))
                rows.append((int(h.label), decode_jpeg(img)))
    return rows


def test_a_different_size_stops_the_conversion_naming_file_and_fixes(ray_session, tmp_path, convert_cli):
    from magface.data.convert import ImageSizeError

    _folder(tmp_path / "src", {"alice": [112, 112], "bob": [112, 128]})
    with pytest.raises(ImageSizeError) as e:
        convert_cli(["folder", str(tmp_path / "src"), str(tmp_path / "out"), "--shards", "1"])
    msg = str(e.value)
    assert "bob/1.jpg: image is 128x128 but the data set's images are 112x112" in msg
    assert "--resize 112 112" in msg and "--align" in msg and "docs/own_faces.md" in msg
    assert not list((tmp_path / "out").glob("*.done"))  # nothing looks finished


def test_resize_gives_one_size(ray_session, tmp_path, convert_cli, capsys):
    src = _folder(tmp_path / "src", {"alice": [128, 100], "bob": [112]})
    out = tmp_path / "out"
    assert convert_cli(["folder", str(tmp_path / "src"), str(out), "--shards", "1", "--image-size", "112", "112",
                        "--resize"]) == 0
    assert (out / "property").read_text() == "2,112,112"
    assert "train with data.image_size=112" in capsys.readouterr().out
    rows = _images(out)
    assert [r[0] for r in rows] == [0, 0, 1]
    for (label, got), name in zip(rows, ["alice/0.jpg", "alice/1.jpg", "bob/0.jpg"]):
        original = decode_jpeg(encode_jpeg(src[name], quality=95))
        want = np.asarray(Image.fromarray(original).resize((112, 112), Image.BILINEAR))
        assert got.shape == (112, 112, 3) and np.abs(got.astype(int) - want).mean() < 3


def test_align_crops_onto_the_face_template(ray_session, tmp_path, convert_cli):
    from magface.evaluation.alignment import ARCFACE_TEMPLATE_112, align_face

    src = _folder(tmp_path / "src", {"alice": [160], "bob": [200, 140]})
    rng = np.random.default_rng(0)
    marks = {}
    lines = ["# image x1 y1 ... x5 y5 score"]
    for name, img in src.items():  # the template, scaled and shifted into each photo (a detector's output)
        lm = ARCFACE_TEMPLATE_112 * rng.uniform(1.0, 1.2) + rng.uniform(5, 20, 2)
        marks[name] = lm
        lines.append(" ".join([name, *(f"{v:.3f}" for v in lm.ravel()), "0.99"]))
    (tmp_path / "lm.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert convert_cli(["folder", str(tmp_path / "src"), str(out), "--shards", "2", "--align",
                        str(tmp_path / "lm.txt")]) == 0
    assert (out / "property").read_text() == "2,112,112"
    rows = _images(out)
    for (label, got), name in zip(rows, sorted(src)):
        want = align_face(decode_jpeg(encode_jpeg(src[name], quality=95)), marks[name], 112)
        assert got.shape == (112, 112, 3) and np.abs(got.astype(int) - want).mean() < 3

    (tmp_path / "lm.txt").write_text("\n".join(lines[:2]) + "\n")  # bob's landmarks missing
    with pytest.raises(ValueError, match=r"no landmarks for 2 of 3 image\(s\), e\.g\. 'bob/0.jpg'"):
        convert_cli(["folder", str(tmp_path / "src"), str(tmp_path / "out2"), "--shards", "1", "--align",
                     str(tmp_path / "lm.txt")])
    (tmp_path / "lm.txt").write_text("alice/0.jpg 1 2 3\n")
    with pytest.raises(ValueError, match=r"lm.txt:1: expected '<image> x1 y1 ... x5 y5 \[score\]'"):
        convert_cli(["folder", str(tmp_path / "src"), str(tmp_path / "out3"), "--shards", "1", "--align",
                     str(tmp_path / "lm.txt")])


def test_data_resize_config_key_resizes_in_the_training_pipeline(ray_session, tmp_path, convert_cli):
    from magface.config import Config
    from magface.train.trainer import build_dataset

    _folder(tmp_path / "src", {"alice": [64, 64], "bob": [64, 64]})
    assert convert_cli(["folder", str(tmp_path / "src"), str(tmp_path / "out"), "--shards", "1"]) == 0
    base = {"data": {"train": [str(tmp_path / "out")], "num_classes": 2, "image_size": 32, "shuffle": "none",
                     "flip": False}}
    rows = build_dataset(Config.from_dict({**base, "data": {**base["data"], "resize": True}})).take_all()
    assert len(rows) == 4 and all(r["image"].shape == (32, 32, 3) for r in rows)
    with pytest.raises(Exception, match="data.resize=true"):
        build_dataset(Config.from_dict(base)).take_all()
