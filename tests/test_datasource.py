"""read_recordio (byte-range read tasks) and decode_images, against the MXNet golden shard and written shards."""

import hashlib
import json
import shutil
import struct

import numpy as np
import pytest

from magface.data.codec import decode_jpeg, encode_jpeg
from magface.recordio import MAGIC, IRHeader, MXIndexedRecordIO, pack


@pytest.fixture(scope="module")
def golden_rec(golden_dir):
    return str(golden_dir / "ms1m_layout" / "train.rec")


@pytest.fixture(scope="module")
def manifest(golden_dir):
    return json.loads((golden_dir / "manifest.json").read_text())["ms1m_layout"]


def _rows(ds):
    return sorted(((r["key"], r["label"], r["image"]) for r in ds.take_all()), key=lambda r: r[:2])


def _write_shard(path, labels, payload_of, identity_records=True):
    """A shard in insightface's layout with the given labels; payload_of(key) gives each image's bytes."""
    n = len(labels)
    with MXIndexedRecordIO(str(path) + ".idx", str(path) + ".rec", "w") as w:
        w.write_idx(0, pack(IRHeader(2, [n + 1, n + 2], 0, 0), b""))
        for key, label in enumerate(labels, start=1):
            w.write_idx(key, pack(IRHeader(0, float(label), key, 0), payload_of(key)))
        if identity_records:
            w.write_idx(n + 1, pack(IRHeader(2, [1, n + 1], n + 1, 0), b""))
    return str(path) + ".rec"


def _run_read_tasks(recs, n, **kwargs):
    """Plan n read tasks and run each in this process: every split checked without Ray's scheduling."""
    from magface.data.datasource import RecordIODatasource, scan_shard

    tasks = RecordIODatasource([scan_shard(r) for r in recs], **kwargs).get_read_tasks(n)
    rows = []
    for t in tasks:
        for block in t():
            assert block.num_rows > 0
            rows += block.to_pylist()
    return tasks, rows


def test_golden_shard_every_task_count(ray_session, golden_rec, manifest):
    from magface.data import read_recordio

    want = {r["key"]: (int(r["label"][0]), r["sha256"]) for r in manifest["records"]}
    assert len(want) == manifest["images"] == 78
    for n in (1, 2, 3, 5, 8, 13, 21, 39, 77, 78, 79, 200):
        tasks, rows = _run_read_tasks([golden_rec], n, block_bytes=[10**9, 9000][n % 2])
        assert len(tasks) == min(n, 78)  # never an empty task, even with more tasks than records
        assert sum(t.metadata.num_rows for t in tasks) == 78
        got = {r["key"]: (r["label"], hashlib.sha256(r["image"]).hexdigest()) for r in rows}
        assert len(rows) == 78 and got == want, f"{n} tasks: lost or duplicated records"
    ds = read_recordio(golden_rec, override_num_blocks=6)  # and once through Ray Data itself
    got = {r["key"]: (r["label"], hashlib.sha256(r["image"]).hexdigest()) for r in ds.take_all()}
    assert got == want
    assert ds.schema().names == ["key", "label", "image"]


def test_many_shards_no_loss_with_continuation_chunks(ray_session, tmp_path):
    """Payloads holding the magic at aligned offsets (split records) across many byte ranges and shards."""
    from magface.data import read_recordio

    magic = struct.pack("<I", MAGIC)

    def payload(key):  # the magic lands at an aligned file offset for some keys: continuation chunks
        return bytes([key % 251]) * (4 * (key % 7)) + magic * (key % 3) + b"img%d" % key

    (tmp_path / "property").write_text("40,112,112")
    shards = [_write_shard(tmp_path / f"s{i}", [(k * 7 + i) % 40 for k in range(n)], payload)
              for i, n in enumerate((17, 1, 30))]
    want = sorted((s, k + 1) for s, n in zip(shards, (17, 1, 30)) for k in range(n))
    for n in range(1, 55):
        _, rows = _run_read_tasks(shards, n, include_paths=True, block_bytes=[10**9, 1][n % 2])
        got = sorted((r["path"], r["key"]) for r in rows)
        assert got == want, f"{n} tasks"
        assert all(r["image"].endswith(b"img%d" % r["key"]) for r in rows)
    # A folder of shards through Ray Data
    rows = read_recordio(str(tmp_path), override_num_blocks=4).take_all()
    assert sorted(r["key"] for r in rows) == sorted(k for _, k in want)


def test_label_out_of_range_names_shard_and_key(ray_session, golden_rec, tmp_path):
    from magface.data import read_recordio

    with pytest.raises(Exception, match=r"train\.rec: record key \d+ .*label 1[0-4] outside \[0, 10\)"):
        read_recordio(golden_rec, num_classes=10).take_all()
    # num_classes from the property file beside the shard
    rec = _write_shard(tmp_path / "bad", [0, 1, 5], lambda k: b"x")
    (tmp_path / "property").write_text("5,112,112")
    with pytest.raises(Exception, match=r"bad\.rec: record key 3 .*label 5 outside \[0, 5\)"):
        read_recordio(rec).take_all()


def test_missing_idx_is_rebuilt(ray_session, golden_rec, tmp_path):
    from magface.data import read_recordio

    shutil.copy(golden_rec, tmp_path / "train.rec")
    shutil.copy(golden_rec.replace("train.rec", "property"), tmp_path / "property")
    with pytest.warns(UserWarning, match="train.idx not found"):
        ds = read_recordio(str(tmp_path / "train.rec"), override_num_blocks=3)
    assert _rows(ds) == _rows(read_recordio(golden_rec))


def test_corrupt_record_raises_or_is_skipped(ray_session, tmp_path):
    from magface.data import BadRecords, read_recordio

    rec = _write_shard(tmp_path / "c", [0, 1, 2, 3], lambda k: b"payload%d" % k)
    data = bytearray(open(rec, "rb").read())
    off = int(open(rec[:-4] + ".idx").read().splitlines()[2].split("\t")[1])
    data[off:off + 4] = b"JUNK"  # key 2's magic
    open(rec, "wb").write(bytes(data))
    with pytest.raises(Exception, match=rf"c\.rec: record key 2 \(byte offset {off}\): wrong magic"):
        read_recordio(rec).take_all()
    bad = BadRecords()
    rows = read_recordio(rec, on_bad_record="skip", bad_records=bad).take_all()
    assert sorted(r["key"] for r in rows) == [1, 3, 4]
    assert bad.count() == 1 and "record key 2" in bad.examples()[0]


def _unflipped(images):
    return np.stack([decode_jpeg(b) for b in images])


def test_decode_flips_per_epoch_reproducibly(ray_session, golden_rec):
    from magface.data import decode_images, flip_mask, read_recordio

    raw = {r["key"]: r["image"] for r in read_recordio(golden_rec).take_all()}
    ds = decode_images(read_recordio(golden_rec, override_num_blocks=4), seed=7)

    def epoch_flips(dataset):
        flips = {}
        for b in dataset.iter_batches(batch_size=16):
            assert b["image"].dtype == np.uint8 and b["image"].shape[1:] == (112, 112, 3)
            plain = _unflipped([raw[k] for k in b["key"]])
            for k, img, ref in zip(b["key"], b["image"], plain):
                assert np.array_equal(img, ref) or np.array_equal(img, ref[:, ::-1])
                flips[int(k)] = not np.array_equal(img, ref)
        return flips

    e0, e1 = epoch_flips(ds), epoch_flips(ds)
    keys = np.array(sorted(raw))
    assert [e0[k] for k in keys] == flip_mask(keys, 7, 0).tolist()
    assert [e1[k] for k in keys] == flip_mask(keys, 7, 1).tolist()
    assert e0 != e1 and 20 < sum(e0.values()) < 58  # a fair coin, different each epoch
    again = decode_images(read_recordio(golden_rec, override_num_blocks=2), seed=7)
    assert epoch_flips(again) == e0  # same seed, same epoch -> same flips, whatever the task split


def test_decode_bad_jpeg_skip_counts_and_raise_names_key(ray_session):
    import ray

    from magface.data import BadRecords, decode_images

    rng = np.random.default_rng(0)
    good = [encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(5)]
    items = [{"key": k, "label": k, "image": b} for k, b in enumerate(good)]
    items.append({"key": 99, "label": 0, "image": good[0][:200] + b"\x00" * 50})  # truncated JPEG
    items.append({"key": 98, "label": 0, "image": encode_jpeg(np.zeros((64, 64, 3), np.uint8))})  # wrong size
    bad = BadRecords()
    rows = decode_images(ray.data.from_items(items), on_bad_record="skip", bad_records=bad, flip=False).take_all()
    assert sorted(r["key"] for r in rows) == [0, 1, 2, 3, 4]
    assert bad.count() == 2
    assert any("record key 98" in e and "64x64" in e for e in bad.examples())
    with pytest.raises(Exception, match="record key 9[89]"):
        decode_images(ray.data.from_items(items), flip=False).take_all()
    rows = decode_images(ray.data.from_items(items[-1:]), resize=True, flip=False).take_all()
    assert rows[0]["image"].shape == (112, 112, 3) and rows[0]["image"].dtype == np.uint8
