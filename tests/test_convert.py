"""pipelines/convert.py: image folder -> shards, split of a big .rec, resumability; read back through read_recordio."""

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from magface.data.codec import decode_jpeg, encode_jpeg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def convert_cli():
    sys.path.insert(0, str(REPO / "pipelines"))
    import convert

    yield convert.main
    sys.path.remove(str(REPO / "pipelines"))


def _image_folder(root: Path, counts) -> dict:
    """Identity subfolders with random 112x112 images (JPEG, plus one PNG); returns {(label, sha): pixels}."""
    from PIL import Image

    rng = np.random.default_rng(3)
    want = {}
    for label, n in enumerate(counts):
        d = root / f"person_{label:03d}"
        d.mkdir(parents=True)
        for j in range(n):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            if label == 1 and j == 0:  # smooth, so JPEG's chroma subsampling barely changes it
                ramp = np.linspace(0, 255, 112, dtype=np.uint8)
                img = np.stack([np.tile(ramp, (112, 1)), np.tile(ramp[:, None], (1, 112)),
                                np.full((112, 112), 90, np.uint8)], axis=-1)
                Image.fromarray(img).save(d / "x.png")
                want[(label, "png")] = img
            else:
                data = encode_jpeg(img, quality=90)
                (d / f"{j}.jpg").write_bytes(data)
                want[(label, hashlib.sha256(data).hexdigest())] = data
    return want


def test_folder_to_shards_reads_back(ray_session, tmp_path, convert_cli):
    from magface.data import read_recordio
    from magface.recordio import MXIndexedRecordIO, unpack

    want = _image_folder(tmp_path / "src", [3, 2, 4, 1, 5, 2])
    out = tmp_path / "out"
    assert convert_cli(["folder", str(tmp_path / "src"), str(out), "--shards", "3", "--image-size", "112", "112"]) == 0
    assert (out / "property").read_text() == "6,112,112"
    recs = sorted(out.glob("*.rec"))
    assert len(recs) == 3
    got = {}
    for r in read_recordio(str(out), override_num_blocks=4).take_all():
        if r["image"][:2] == b"\xff\xd8" and (r["label"], hashlib.sha256(r["image"]).hexdigest()) in want:
            got[(r["label"], hashlib.sha256(r["image"]).hexdigest())] = r["image"]  # JPEGs stored byte for byte
        else:
            got[(r["label"], "png")] = decode_jpeg(r["image"])
    assert got.keys() == want.keys()
    assert np.abs(got[(1, "png")].astype(int) - want[(1, "png")]).mean() < 3  # PNG re-encoded at q95
    # Each shard keeps insightface's layout: header record 0, identity records after the images.
    with MXIndexedRecordIO(str(recs[0])[:-4] + ".idx", str(recs[0]), "r") as rec:
        header, _ = unpack(rec.read_idx(0))
        first_id, end = (int(v) for v in header.label)
        images = [unpack(rec.read_idx(k))[0].label for k in range(1, first_id)]
        for k in range(first_id, end):
            h, _ = unpack(rec.read_idx(k))
            a, b = (int(v) for v in h.label)
            assert {images[i - 1] for i in range(a, b)} == {images[a - 1]}  # one identity per identity record
        assert sorted(rec.keys) == list(range(end))


def test_rerun_skips_finished_and_redoes_partial(ray_session, tmp_path, convert_cli):
    _image_folder(tmp_path / "src", [2, 2, 2, 2])
    out = tmp_path / "out"
    args = ["folder", str(tmp_path / "src"), str(out), "--shards", "2", "--prefix", "faces"]
    convert_cli(args)
    done = sorted(out.glob("*.done"))
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("faces-*")}
    # Simulate a crash of shard 1 before its marker: the .rec is there, truncated, and no .done.
    rec1 = out / "faces-00001-of-00002.rec"
    rec1.write_bytes(rec1.read_bytes()[:100])
    done[1].unlink()
    from magface.data.convert import convert_folder

    result = convert_folder(tmp_path / "src", out, 2, prefix="faces", progress=False)
    assert result["written"] == ["faces-00001-of-00002"] and result["skipped"] == ["faces-00000-of-00002"]
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if "00000" in p.name)
    from magface.data import read_recordio

    assert len(read_recordio(str(out)).take_all()) == 8
    # A marker whose sizes disagree with the files (e.g. a shard overwritten by hand) is not trusted either.
    rec1.write_bytes(rec1.read_bytes() + b"\0\0\0\0")
    assert convert_folder(tmp_path / "src", out, 2, prefix="faces", progress=False)["written"] == ["faces-00001-of-00002"]
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_split_big_rec_reads_back(ray_session, golden_dir, tmp_path, convert_cli):
    from magface.data import read_recordio

    golden = str(golden_dir / "ms1m_layout" / "train.rec")
    out = tmp_path / "split"
    assert convert_cli(["split", golden, str(out), "--shards", "4"]) == 0
    assert (out / "property").read_text() == "15,112,112"
    assert len(list(out.glob("*.rec"))) == 4
    ref = sorted((r["label"], r["image"]) for r in read_recordio(golden).take_all())
    got = sorted((r["label"], r["image"]) for r in read_recordio(str(out)).take_all())
    assert got == ref
