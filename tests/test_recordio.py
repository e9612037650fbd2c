"""magface.recordio against files written by MXNet 1.9.1 itself (manifest.json lists every record) and
against a literal transcription of dmlc-core's RecordIOWriter::WriteRecord loop."""

import hashlib
import io
import json
import pickle
import random
import shutil
import struct
import warnings

import numpy as np
import pytest

from magface import recordio as R
from magface.data.codec import ImageDecodeError, decode_jpeg, encode_jpeg

MAGIC = struct.pack("<I", 0xCED7230A)
SETS = {  # name: (rec, idx or None)
    "magic_in_payload": ("data.rec", "data.idx"),
    "multilabel": ("data.rec", "data.idx"),
    "ms1m_layout": ("train.rec", "train.idx"),
    "plain": ("data.rec", None),
}


@pytest.fixture(scope="module")
def manifest(golden_dir):
    return json.loads((golden_dir / "manifest.json").read_text())


def _read_all(golden_dir, name):
    """{key: record bytes} through the public reader API (sequential keys for a set without .idx)."""
    rec, idx = SETS[name]
    if idx:
        with R.MXIndexedRecordIO(golden_dir / name / idx, golden_dir / name / rec, "r") as r:
            return {k: r.read_idx(k) for k in r.keys}
    out = {}
    with R.MXRecordIO(golden_dir / name / rec, "r") as r:
        while (buf := r.read()) is not None:
            out[len(out)] = buf
    return out


def _mxnet_write_record(payload: bytes) -> bytes:
    """dmlc-core RecordIOWriter::WriteRecord, transcribed loop for loop (independent of encode_record)."""
    out = bytearray()
    n = len(payload)
    lower, upper = (n >> 2) << 2, ((n + 3) >> 2) << 2
    dptr = 0
    for i in range(0, lower, 4):
        if payload[i:i + 4] == MAGIC:
            out += MAGIC + struct.pack("<I", ((1 if dptr == 0 else 2) << 29) | (i - dptr)) + payload[dptr:i]
            dptr = i + 4
    out += MAGIC + struct.pack("<I", ((3 if dptr else 0) << 29) | (n - dptr)) + payload[dptr:]
    return bytes(out + b"\0" * (upper - n))


# ------------------------------------------------------------------ golden files


@pytest.mark.parametrize("name", list(SETS))
def test_golden_records_match_manifest(golden_dir, manifest, name):
    records = _read_all(golden_dir, name)
    listed = manifest[name]["records"]
    assert listed, name
    for pos, entry in enumerate(listed):
        header, payload = R.unpack(records[entry.get("key", pos)])
        label = [float(x) for x in header.label] if header.flag > 0 else [float(header.label)]
        assert (header.flag, header.id, header.id2) == (entry["flag"], entry["id"], entry["id2"]), (name, entry)
        assert label == entry["label"], (name, entry)
        # length and sha256 cover the image bytes after the IRHeader and any float32 labels
        assert len(payload) == entry["length"]
        assert hashlib.sha256(payload).hexdigest() == entry["sha256"]
    if name == "plain":
        assert len(records) == len(listed)
    if "file_bytes" in manifest[name]:
        assert (golden_dir / name / SETS[name][0]).stat().st_size == manifest[name]["file_bytes"]


def test_golden_magic_file_really_has_continuation_chunks(golden_dir):
    data = (golden_dir / "magic_in_payload" / "data.rec").read_bytes()
    flags = []
    pos = 0
    while pos < len(data):
        lrec = struct.unpack_from("<I", data, pos + 4)[0]
        flags.append(lrec >> 29)
        pos += 8 + (lrec & (2**29 - 1)) + (-(lrec & (2**29 - 1)) & 3)
    assert flags.count(1) == 6 and flags.count(3) == 6 and flags.count(2) > 50


def test_ms1m_layout_header_and_identity_records(golden_dir, manifest):
    m = manifest["ms1m_layout"]
    records = _read_all(golden_dir, "ms1m_layout")
    header0, _ = R.unpack(records[0])
    assert header0.flag == 2 and [int(x) for x in header0.label] == m["header0_label"] == [79, 94]
    first_id, end = m["header0_label"]
    assert sorted(records) == list(range(end))
    for key, rng in zip(range(first_id, end), m["identity_ranges"]):
        header, payload = R.unpack(records[key])
        assert header.flag == 2 and [int(x) for x in header.label] == rng and payload == b""
    # images of identity i are exactly the keys in its range, labelled i
    for ident, (lo, hi) in enumerate(m["identity_ranges"]):
        assert {int(R.unpack(records[k])[0].label) for k in range(lo, hi)} == {ident}


@pytest.mark.parametrize("name", list(SETS))
def test_writer_round_trip_is_byte_identical(golden_dir, tmp_path, name):
    rec, idx = SETS[name]
    records = _read_all(golden_dir, name)
    out_rec, out_idx = tmp_path / rec, tmp_path / (idx or "unused.idx")
    if idx:
        with R.MXIndexedRecordIO(out_idx, out_rec, "w") as w:
            for key, buf in records.items():
                w.write_idx(key, R.pack(*R.unpack(buf)))  # re-pack: pack() itself must reproduce the bytes
        assert out_idx.read_bytes() == (golden_dir / name / idx).read_bytes()
    else:
        with R.MXRecordIO(out_rec, "w") as w:
            for buf in records.values():
                w.write(R.pack(*R.unpack(buf)))
    assert out_rec.read_bytes() == (golden_dir / name / rec).read_bytes()


@pytest.mark.parametrize("name", ["magic_in_payload", "multilabel", "ms1m_layout"])
def test_iter_records_and_build_index_agree_with_golden_idx(golden_dir, name):
    rec, idx = SETS[name]
    data = (golden_dir / name / rec).read_bytes()
    index = R.read_index(golden_dir / name / idx)
    records = _read_all(golden_dir, name)
    assert [(off, buf) for off, buf in R.iter_records(data)] == [(index[k], records[k]) for k in index]
    if name == "ms1m_layout":  # sequential keys 0..N-1, as MXNet's writer loop produced them
        assert R.build_index(golden_dir / name / rec) == list(index.items())
    # a byte range cut at record boundaries reports absolute offsets
    offsets = sorted(index.values())
    lo, hi = offsets[1], offsets[-1]
    assert [o for o, _ in R.iter_records(memoryview(data)[lo:hi], base_offset=lo)] == offsets[1:-1]


def test_build_index_by_header_id(golden_dir, manifest):
    pairs = R.build_index(golden_dir / "plain" / "data.rec", key_from="header_id")
    assert [k for k, _ in pairs] == [r["id"] for r in manifest["plain"]["records"]]


def test_missing_idx_is_rebuilt_with_a_warning(golden_dir, tmp_path):
    rec = tmp_path / "data.rec"
    shutil.copy(golden_dir / "plain" / "data.rec", rec)
    expected = _read_all(golden_dir, "plain")
    with pytest.warns(UserWarning, match="rebuilding the index"):
        r = R.MXIndexedRecordIO(tmp_path / "data.idx", rec, "r")
    assert r.keys == list(range(10)) and not (tmp_path / "data.idx").exists()
    assert [r.read_idx(k) for k in reversed(r.keys)] == [expected[k] for k in reversed(range(10))]
    r.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pickled copy keeps the rebuilt index: no second scan, no warning
        clone = pickle.loads(pickle.dumps(r))
    assert clone.keys == r.keys and clone.read_idx(3) == expected[3]
    clone.close()
    with pytest.warns(UserWarning):
        R.MXIndexedRecordIO(tmp_path / "data.idx", rec, "r", save_rebuilt_index=True).close()
    assert R.read_index(tmp_path / "data.idx") == {k: off for k, off in R.build_index(rec)}


# ------------------------------------------------------------------ continuation chunks and padding


def _payloads():
    rng = random.Random(0)
    cases = [bytes(range(n)) for n in range(10)]  # every padding remainder, incl. empty
    cases += [MAGIC, MAGIC + b"x", b"abcd" + MAGIC, b"abcd" + MAGIC + b"ef", MAGIC * 3, b"ab" + MAGIC + b"cd",
              b"abc" + MAGIC, MAGIC + b"1234" + MAGIC + b"5678" + MAGIC, b"12345678" + MAGIC[:3]]
    for _ in range(200):
        parts = [rng.choice([MAGIC, bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 4, 8])))])
                 for _ in range(rng.randrange(1, 7))]
        cases.append(b"".join(parts))
    return cases


def test_encoding_matches_dmlc_writer_and_round_trips(tmp_path):
    payloads = _payloads()
    for p in payloads:
        assert R.encode_record(p) == _mxnet_write_record(p), p
    with R.MXIndexedRecordIO(tmp_path / "x.idx", tmp_path / "x.rec", "w") as w:
        for k, p in enumerate(payloads):
            w.write_idx(k, p)
    data = (tmp_path / "x.rec").read_bytes()
    assert data == b"".join(_mxnet_write_record(p) for p in payloads)
    assert [p for _, p in R.iter_records(data)] == payloads
    with R.MXIndexedRecordIO(tmp_path / "x.idx", tmp_path / "x.rec", "r") as r:
        assert [r.read_idx(k) for k in reversed(r.keys)] == payloads[::-1]
        r.reset()
        assert r.read() == payloads[0]


def test_split_layout_by_hand():
    # magic at aligned offsets 0 and 8 of a 13-byte payload: start(0 bytes), middle(4), end(5) + 3 pad
    enc = R.encode_record(MAGIC + b"wxyz" + MAGIC + b"12345")
    head = lambda flag, n: MAGIC + struct.pack("<I", flag << 29 | n)  # noqa: E731
    assert enc == head(1, 0) + head(2, 4) + b"wxyz" + head(3, 5) + b"12345\0\0\0"
    # unaligned magic stays inside one whole record
    assert R.encode_record(b"a" + MAGIC) == head(0, 5) + b"a" + MAGIC + b"\0\0\0"


# ------------------------------------------------------------------ bad input


def _expect(exc_info, path, offset):
    err = exc_info.value
    assert err.path == str(path) and err.offset == offset
    assert str(path) in str(err) and f"byte offset {offset}" in str(err)


def _write(tmp_path, data: bytes, name="bad.rec"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_wrong_magic(tmp_path):
    first = R.encode_record(b"hello")
    assert len(first) == 16
    good = first + R.encode_record(b"world!")
    bad = good[:16] + b"\x00" + good[17:]  # first byte of the second record's magic
    path = _write(tmp_path, bad)
    with pytest.raises(R.RecordIOError, match="wrong magic") as ei:
        list(R.iter_records(bad, path=path))
    _expect(ei, path, 16)
    with R.MXRecordIO(path, "r") as r, pytest.raises(R.RecordIOError, match="wrong magic") as ei:
        assert r.read() == b"hello"
        r.read()
    _expect(ei, path, 16)


@pytest.mark.parametrize("cut, what", [(5, "truncated record header"), (14, "truncated record"),
                                       (15, "truncated record")])  # 15: payload whole, padding missing
def test_truncated(tmp_path, cut, what):
    data = R.encode_record(b"abc") + R.encode_record(b"0123456")[:cut]  # 12 + (16 before the cut)
    path = _write(tmp_path, data)
    with pytest.raises(R.RecordIOError, match=what) as ei:
        list(R.iter_records(data, base_offset=100, path=path))
    _expect(ei, path, 112)
    with R.MXRecordIO(path, "r") as r, pytest.raises(R.RecordIOError, match=what) as ei:
        r.read(), r.read()
    _expect(ei, path, 12)


@pytest.mark.parametrize("flags, bad_at", [((2,), 0), ((3,), 0), ((1, 0), 1), ((1, 1), 1), ((1, 2, 1), 2),
                                           ((1, 2, 5), 2)])
def test_bad_continuation(tmp_path, flags, bad_at):
    data = b"".join(MAGIC + struct.pack("<I", f << 29 | 4) + b"abcd" for f in flags)
    path = _write(tmp_path, data)
    with pytest.raises(R.RecordIOError, match="bad continuation") as ei:
        list(R.iter_records(data, path=path))
    _expect(ei, path, 12 * bad_at)
    with R.MXRecordIO(path, "r") as r, pytest.raises(R.RecordIOError, match="bad continuation"):
        r.read()


def test_split_record_cut_before_its_end_chunk(tmp_path):
    data = R.encode_record(b"abcd" + MAGIC + b"efgh")[:-12]  # start chunk only
    with pytest.raises(R.RecordIOError, match="truncated record header") as ei:
        list(R.iter_records(data, path="x.rec"))
    assert ei.value.offset == len(data)


def test_skip_bad_resumes_at_next_record(tmp_path):
    recs = [b"first", b"sec" + MAGIC + b"ond", b"third"]
    encoded = [R.encode_record(p) for p in recs]
    data = bytearray(b"".join(encoded))
    data[len(encoded[0])] ^= 0xFF  # break the second record's magic
    with pytest.raises(R.RecordIOError):
        list(R.iter_records(data))
    with pytest.warns(UserWarning, match="skipping bad data.*wrong magic"):
        got = list(R.iter_records(data, skip_bad=True))
    assert got == [(0, b"first"), (len(encoded[0]) + len(encoded[1]), b"third")]


def test_idx_errors(tmp_path):
    rec = _write(tmp_path, R.encode_record(b"abcd") * 3, "d.rec")  # 3 records of 12 bytes
    idx = tmp_path / "d.idx"
    idx.write_text("0\t0\n1\t12\n2\t36\n")
    with pytest.raises(R.RecordIOError, match="past the end") as ei:
        R.MXIndexedRecordIO(idx, rec, "r")
    assert ei.value.path == str(idx) and ei.value.line == 3 and "36" in str(ei.value) and str(idx) in str(ei.value)
    idx.write_text("0\t0\n1\t12\nnot-a-line\n")
    with pytest.raises(R.RecordIOError, match="malformed") as ei:
        R.read_index(idx)
    assert ei.value.line == 3 and f"{idx}: line 3" in str(ei.value)
    idx.write_text("0\t0\n1\t12\n2\t24\n")
    with R.MXIndexedRecordIO(idx, rec, "r") as r:
        with pytest.raises(R.RecordIOError, match="key 7 not in the index") as ei:
            r.read_idx(7)
        assert str(ei.value).startswith(f"{idx}: key 7")
        clone = pickle.loads(pickle.dumps(ei.value))  # errors cross process boundaries intact (Ray tasks)
        assert type(clone) is R.RecordIOError and str(clone) == str(ei.value) and clone.path == str(idx)
        assert r.read_idx(2) == b"abcd"
    idx.write_text("0\t0\n1\t13\n")
    with pytest.raises(R.RecordIOError, match="aligned"):
        R.read_index(idx)


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with R.MXIndexedRecordIO(tmp_path / "x.idx", tmp_path / "x.rec", "w") as w:
            w.write_idx(0, b"abc")
            assert not (tmp_path / "x.rec").exists()  # only a temporary name until close
            raise RuntimeError("job died")
    assert list(tmp_path.iterdir()) == []


def test_reader_pickles_and_resumes(golden_dir):
    with R.MXIndexedRecordIO(golden_dir / "multilabel" / "data.idx", golden_dir / "multilabel" / "data.rec", "r") as r:
        clone = pickle.loads(pickle.dumps(r))
        assert clone.keys == r.keys and clone.read_idx(14) == r.read_idx(14)
        clone.close()


# ------------------------------------------------------------------ image headers and codec


def test_pack_unpack_labels():
    h, s = R.unpack(R.pack(R.IRHeader(0, 3.5, 2**64 - 1, 2**63 + 9), b"img"))  # ids are unsigned 64-bit
    assert h == R.IRHeader(0, 3.5, 2**64 - 1, 2**63 + 9) and s == b"img"
    h, s = R.unpack(R.pack(R.IRHeader(0, [1.5, -2.0, 3.0], 1, 0), b"img"))
    assert h.flag == 3 and h.label.tolist() == [1.5, -2.0, 3.0] and s == b"img"
    with pytest.raises(ValueError, match="float32 labels"):
        R.unpack(struct.pack("<IfQQ", 4, 0, 0, 0) + b"\0" * 8)


def test_unpack_img_is_rgb_and_pack_img_round_trips(golden_dir):
    from PIL import Image

    rec = _read_all(golden_dir, "ms1m_layout")[5]
    header, img = R.unpack_img(rec)
    reference = np.asarray(Image.open(io.BytesIO(R.unpack(rec)[1])).convert("RGB"))
    assert img.dtype == np.uint8 and img.shape == (112, 112, 3) and header.id == 5
    assert np.abs(img.astype(int) - reference).max() <= 1  # libjpeg-turbo in both; IDCT rounding at most
    h2, img2 = R.unpack_img(R.pack_img(header, img, quality=100))
    assert h2 == header and np.abs(img2.astype(int) - img).mean() < 2


def test_codec_png_fallback_and_errors():
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(img).save(png, "PNG")
    assert np.array_equal(decode_jpeg(png.getvalue()), img)
    gray = decode_jpeg(encode_jpeg(img[:, :, 0], quality=100))
    assert gray.shape == (20, 30, 3) and np.abs(gray[:, :, 0].astype(int) - img[:, :, 0]).mean() < 3
    jpeg = encode_jpeg(img)
    for bad in (b"", b"\xff\xd8not a jpeg", jpeg[: len(jpeg) // 2]):
        with pytest.raises(ImageDecodeError):
            decode_jpeg(bad)
