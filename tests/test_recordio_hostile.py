"""Damaged RecordIO shards (issue 12, item 7): every damage ends in a named error or an exact skip count.

The reproducers of the attack report, each generated here, plus a fuzz test that runs a few thousand mutated
chunk headers through the reader API (`MXIndexedRecordIO.read_idx`) and the Ray Data path (`read_recordio`).
"""

import struct
import tracemalloc
import warnings

import numpy as np
import pytest

from magface import recordio as R
from magface.recordio import IRHeader, MXIndexedRecordIO, pack
from tests.test_datasource import _write_shard


def _payload(key: int) -> bytes:
    return bytes((key * 7 + i) % 251 for i in range(40 + key % 13))


def _flip_len(rec: str, key: int, delta: int = 0, flag: int | None = None) -> int:
    """Change record `key`'s chunk length by `delta` and/or its flag; returns its offset."""
    off = R.read_index(rec[:-4] + ".idx")[key]
    data = bytearray(open(rec, "rb").read())
    lrec = struct.unpack_from("<I", data, off + 4)[0]
    length, old_flag = lrec & ((1 << 29) - 1), lrec >> 29
    struct.pack_into("<I", data, off + 4, ((old_flag if flag is None else flag) << 29) | (length + delta))
    open(rec, "wb").write(bytes(data))
    return off


@pytest.mark.parametrize("delta, flag", [(64, None), (None, 1)], ids=["length+64", "whole->start"])
def test_damaged_record_neither_kept_nor_hides_its_neighbour(ray_session, tmp_path, delta, flag):
    from magface.data import BadRecords, read_recordio

    rec = _write_shard(tmp_path / "s", [k % 5 for k in range(12)], _payload)
    off = _flip_len(rec, 7, delta or 0, flag)
    with pytest.raises(Exception, match=rf"s\.rec: record key 7 \(byte offset {off}\)"):
        read_recordio(rec).take_all()
    bad = BadRecords()
    rows = read_recordio(rec, on_bad_record="skip", bad_records=bad, override_num_blocks=2).take_all()
    assert sorted(r["key"] for r in rows) == [k for k in range(1, 13) if k != 7]  # healthy record 8 kept
    assert all(r["image"] == _payload(r["key"]) for r in rows)
    assert bad.count() == 1 and "record key 7 " in bad.examples()[0]
    reader = MXIndexedRecordIO(rec[:-4] + ".idx", rec, "r")
    assert R.unpack(reader.read_idx(8))[1] == _payload(8)
    with pytest.raises(R.RecordIOError, match=f"byte offset {off}: key 7: the record"):
        reader.read_idx(7)
    nxt = R.read_index(rec[:-4] + ".idx")[8]
    with pytest.raises(R.RecordIOError, match=rf"s\.rec: byte offset ({off}|{nxt}): "), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        R.build_index(rec)  # no .idx: the scan names where it broke (was a BufferError from the mmap)


def _set_header_label(rec: str, label0: float) -> None:
    """Rewrite header record 0's first label (insightface: the first identity-record key)."""
    off = R.read_index(rec[:-4] + ".idx")[0]
    data = bytearray(open(rec, "rb").read())
    struct.pack_into("<f", data, off + 8 + 24, label0)  # chunk head, IRHeader, then the float32 labels
    open(rec, "wb").write(bytes(data))


@pytest.mark.parametrize("label0, match", [
    (37.0, r"header record 0 says images are keys 1\.\.36, but the identity records disagree"),
    (1.0, r"header record 0: image keys 1\.\.0 .* not a valid range"),
    (float("nan"), r"header record 0: label \[nan, .*\] is not the \(first identity key, end key\) pair"),
])
def test_damaged_header_record_is_named(tmp_path, label0, match):
    from magface.data.datasource import scan_shard

    rec = _write_shard(tmp_path / "h", [k % 4 for k in range(40)], _payload)  # header label (41, 42)
    assert list(scan_shard(rec).keys) == list(range(1, 41))
    _set_header_label(rec, label0)
    with pytest.raises(R.RecordIOError, match=match):
        scan_shard(rec)


def test_damaged_index_is_named(tmp_path):
    from magface.data.datasource import scan_shard

    rec = _write_shard(tmp_path / "i", [k % 4 for k in range(12)], _payload)
    idx = rec[:-4] + ".idx"
    lines = open(idx).read().splitlines(keepends=True)
    open(idx, "w").write("".join(lines[:9] + lines[10:]))  # key 9's line missing
    with pytest.raises(R.RecordIOError, match=r"i\.idx: header record 0 says images are keys 1\.\.12, but 1 of "
                                              r"them are not in the index \(first: key 9\)"):
        scan_shard(rec)
    k3, off3 = lines[3].split("\t")
    open(idx, "w").write("".join(lines[:4] + [f"{lines[4].split(chr(9))[0]}\t{off3}"] + lines[5:]))
    with pytest.raises(R.RecordIOError, match=rf"i\.idx: line 5: keys {k3} and 4 both at offset {int(off3)}"):
        scan_shard(rec)
    open(idx, "wb").write(b"".join(line.encode() for line in lines[:6]) + b"7\t\xff\xfe\n")
    with pytest.raises(R.RecordIOError, match=r"i\.idx: line 7: not UTF-8 text"):
        scan_shard(rec)


def test_build_dataset_names_the_shard_of_an_undecodable_image(ray_session, tmp_path):
    """Keys restart in every shard: a decode error must say which shard (trainer passes include_paths)."""
    from magface.config import Config
    from magface.data.codec import encode_jpeg
    from magface.train.trainer import build_dataset

    good = encode_jpeg(np.zeros((16, 16, 3), np.uint8))
    a = _write_shard(tmp_path / "a", [0, 1], lambda k: good)
    b = _write_shard(tmp_path / "b", [0, 1], lambda k: good if k == 1 else b"\xff\xd8broken")
    cfg = Config.from_dict({"data": {"train": [a, b], "num_classes": 2, "image_size": 16, "shuffle": "none"},
                            "model": {"backbone": "small", "embedding_size": 16, "backbone_kwargs": {"width": 4}}})
    with pytest.raises(Exception, match=r"b\.rec: record key 2: undecodable image"):
        build_dataset(cfg).take_all()


# ------------------------------------------------------------------------------------------------ fuzzing

_PER_COPY = 10  # records per copy; copy c holds keys 1 + c * _PER_COPY ...


def _base_payloads() -> list[bytes]:
    """Records of varied lengths; two of them hold the magic at aligned offsets, so they are split into
    start/middle/end chunks and the continuation flags are fuzzed too."""
    out = []
    for i in range(_PER_COPY):
        body = bytearray((i * 31 + j) % 256 for j in range(17 + 9 * i))
        if i in (3, 6):  # payload index 32 (and 48) lies at a file-aligned position inside the record
            body[8:12] = struct.pack("<I", R.MAGIC)
            if i == 6:
                body[24:28] = struct.pack("<I", R.MAGIC)
        out.append(pack(IRHeader(0, float(i), i, 0), bytes(body)))
    return out


def _chunk_heads(data: bytes, off: int) -> list[int]:
    """Offsets of the chunk headers of the record at `off`."""
    heads = []
    while True:
        heads.append(off)
        lrec = struct.unpack_from("<I", data, off + 4)[0]
        length = lrec & ((1 << 29) - 1)
        if lrec >> 29 in (0, 3):
            return heads
        off += 8 + length + (-length & 3)


def _mutations(data: bytes, offsets: list[int], rng) -> list[tuple[int, int, int]]:
    """(record index, byte offset inside the copy, new byte value): every single-bit flip of every chunk-header
    byte of one copy, then random byte values."""
    out = []
    for i, off in enumerate(offsets):
        for head in _chunk_heads(data, off):
            for b in range(8):
                for bit in range(8):
                    out.append((i, head + b, data[head + b] ^ (1 << bit)))
    flips = len(out)
    for _ in range(1800):
        i, _, _ = out[rng.integers(flips)]
        heads = _chunk_heads(data, offsets[i])
        pos = heads[rng.integers(len(heads))] + int(rng.integers(8))
        value = int(rng.integers(256))
        if value != data[pos]:
            out.append((i, pos, value))
    return out


def test_fuzzed_chunk_headers_never_lose_or_corrupt_silently(ray_session, tmp_path):
    """Thousands of mutated chunk headers, one per copy of a 10-record sequence, all in one shard. Through the
    reader API and through Ray Data (skip mode): every healthy record comes back byte for byte; a damaged one
    comes back intact, is a named RecordIOError (reader) or is counted once in BadRecords (Ray Data), and both
    paths agree on which. The one undetectable damage: a length moved within the record's own zero padding
    (trailing zero bytes added, or dropped when the payload ended with zeros), asserted as exactly that."""
    from magface.data import BadRecords, read_recordio

    base = _base_payloads()
    one = b"".join(R.encode_record(p) for p in base)
    offsets = np.cumsum([0] + [len(R.encode_record(p)) for p in base[:-1]]).tolist()
    mutations = _mutations(one, offsets, np.random.default_rng(0))
    n_copies = len(mutations)
    assert n_copies > 2500
    data = bytearray(one * n_copies)
    for c, (_, pos, value) in enumerate(mutations):
        data[c * len(one) + pos] = value
    rec, idx = str(tmp_path / "fuzz.rec"), str(tmp_path / "fuzz.idx")
    open(rec, "wb").write(bytes(data))
    R.write_index(idx, [(1 + c * _PER_COPY + i, c * len(one) + off)
                        for c in range(n_copies) for i, off in enumerate(offsets)])

    def check(key: int, got: bytes | None) -> str:
        """'same' | 'padded' | 'error'; anything else fails."""
        c, i = divmod(key - 1, _PER_COPY)
        if got is None:
            assert mutations[c][0] == i, f"key {key}: a healthy record was lost (mutation {mutations[c]})"
            return "error"
        if got == base[i]:
            return "same"
        # a length moved within the zero padding: only trailing zero bytes added or dropped
        assert mutations[c][0] == i and got.rstrip(b"\0") == base[i].rstrip(b"\0") and \
            abs(len(got) - len(base[i])) <= 3, f"key {key}: wrong bytes returned silently (mutation {mutations[c]})"
        return "padded"

    # the reader API, with bounded memory (a corrupt length never becomes a large read)
    tracemalloc.start()
    reader = MXIndexedRecordIO(idx, rec, "r")
    outcome = {}
    for key in reader.keys:
        try:
            got = reader.read_idx(key)
        except R.RecordIOError as exc:
            assert f"key {key}" in str(exc) or str(exc).startswith(rec), exc
            got = None
        outcome[key] = check(key, got)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20, f"reader peak {peak / 2**20:.1f} MiB"
    counts = {k: sum(v == k for v in outcome.values()) for k in ("same", "padded", "error")}
    assert counts["error"] > 0.5 * n_copies and counts["padded"] < 0.1 * n_copies, counts

    # the Ray Data path, skip mode: the same verdicts, and an exact count of what was skipped
    bad = BadRecords(max_examples=10**6)
    rows = read_recordio(rec, num_classes=_PER_COPY, on_bad_record="skip", bad_records=bad,
                         override_num_blocks=4).take_all()
    returned = {r["key"]: r["image"] for r in rows}
    skipped = [int(m.split("record key ")[1].split(" ")[0]) for m in bad.examples()]
    assert bad.count() == len(skipped) == len(set(skipped)) == counts["error"]
    assert set(skipped).isdisjoint(returned) and len(returned) + len(skipped) == len(outcome)
    for key in skipped:
        assert outcome[key] == "error", key
    for key, image in returned.items():
        c, i = divmod(key - 1, _PER_COPY)
        got = pack(IRHeader(0, float(i), i, 0), image)
        assert check(key, got) == outcome[key] != "error", key
