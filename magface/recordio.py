"""MXNet RecordIO, native and byte-compatible with MXNet 1.9.1 (dmlc-core's recordio).

The API mirrors `mxnet.recordio`, so `from magface import recordio` replaces `from mxnet import recordio`.
Two deliberate differences: `unpack_img` returns RGB (MXNet returns OpenCV's BGR) and `pack_img` takes RGB.

File format, per chunk: uint32 magic 0xced7230a, uint32 lrec (top 3 bits continuation flag, low 29 bits
length), the payload, zero padding to 4 bytes. The writer splits a record wherever the magic appears at a
4-byte-aligned offset inside it: the magic itself is dropped and the pieces are written as chunks flagged
1 (start), 2 (middle), 3 (end); the reader re-inserts one magic between joined chunks. A whole record is
flag 0. The `.idx` file holds `key<TAB>byte offset` lines.
"""

from __future__ import annotations

import bisect
import mmap
import numbers
import os
import struct
import warnings
from collections import namedtuple
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np

__all__ = [
    "MAGIC",
    "IRHeader",
    "MXIndexedRecordIO",
    "MXRecordIO",
    "RecordIOError",
    "atomic_path",
    "build_index",
    "encode_record",
    "iter_records",
    "pack",
    "pack_img",
    "parse_index",
    "read_index",
    "unpack",
    "unpack_img",
    "write_index",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_CHUNK_HEAD = struct.Struct("<II")
_LEN_MASK = (1 << 29) - 1
_WHOLE, _START, _MIDDLE, _END = 0, 1, 2, 3
_FLAG_NAMES = {0: "whole", 1: "start", 2: "middle", 3: "end"}

_IR = struct.Struct("<IfQQ")  # MXNet packs 'IfQQ' natively; on little-endian that is this, 24 bytes
_IR_SIZE = _IR.size

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = "Image record header: flag (number of float32 labels when > 0), label, id, id2."


class RecordIOError(ValueError):
    """Malformed RecordIO data. The message names the file and the byte offset (or `.idx` line)."""

    def __init__(self, path, offset: int | None, reason: str, line: int | None = None):
        self.path = str(path)
        self.offset = offset
        self.reason = reason
        self.line = line
        where = f"line {line}: " if line is not None else "" if offset is None else f"byte offset {offset}: "
        super().__init__(f"{self.path}: {where}{reason}")

    def __reduce__(self):  # picklable, so it survives the trip from a Ray task to the driver
        return type(self), (self.path, self.offset, self.reason, self.line)


# --------------------------------------------------------------------------- chunk encoding / decoding


def _pad(n: int) -> int:
    return -n & 3


def encode_record(payload) -> bytes:
    """The on-disk bytes of one record, split exactly where MXNet's writer splits it."""
    data = bytes(payload)
    n = len(data)
    if n > _LEN_MASK:
        raise ValueError(f"RecordIO records must be < 2^29 bytes, got {n}")
    out = []
    start = 0  # first byte of the current chunk
    hit = data.find(_MAGIC_BYTES)
    while hit != -1:
        if hit & 3:  # unaligned occurrences are ordinary payload bytes
            hit = data.find(_MAGIC_BYTES, hit + 1)
            continue
        out.append(_CHUNK_HEAD.pack(MAGIC, ((_START if start == 0 else _MIDDLE) << 29) | (hit - start)))
        out.append(data[start:hit])  # aligned, so no padding needed
        start = hit + 4
        hit = data.find(_MAGIC_BYTES, start)
    out.append(_CHUNK_HEAD.pack(MAGIC, ((_END if start else _WHOLE) << 29) | (n - start)))
    out.append(data[start:])
    out.append(b"\0" * _pad(n))
    return b"".join(out)


def _decode_chunk_head(magic: int, lrec: int, offset: int, path, in_record: bool) -> tuple[int, int]:
    """Validate one chunk header; return (flag, length). `in_record`: a start chunk was seen."""
    if magic != MAGIC:
        raise RecordIOError(path, offset, f"wrong magic 0x{magic:08x} (expected 0x{MAGIC:08x}): "
                                          "not a RecordIO file, or the offset is not a record start")
    flag = lrec >> 29
    if in_record and flag not in (_MIDDLE, _END):
        raise RecordIOError(path, offset, f"bad continuation: a '{_FLAG_NAMES.get(flag, flag)}' chunk "
                                          "inside a split record (expected middle or end)")
    if not in_record and flag not in (_WHOLE, _START):
        raise RecordIOError(path, offset, f"bad continuation: a '{_FLAG_NAMES.get(flag, flag)}' chunk "
                                          "without a start chunk before it")
    return flag, lrec & _LEN_MASK


def iter_records(buf, *, base_offset: int = 0, path="<buffer>", skip_bad: bool = False) -> Iterator[tuple[int, bytes]]:
    """Parse whole records lying back to back in `buf` (bytes, memoryview, mmap, ...).

    Yields (absolute byte offset of the record start, joined payload); `base_offset` is the file offset of
    `buf[0]`. Errors raise RecordIOError, unless `skip_bad`: then each bad spot is reported with a warning
    and parsing resumes at the next aligned magic that starts a record.
    """
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    pos, n = 0, len(mv)
    while pos < n:
        try:
            payload, end = _parse_record(mv, pos, base_offset, path)
            _check_record_end(mv, pos, end, base_offset, path)
        except RecordIOError as err:
            if not skip_bad:
                raise
            warnings.warn(f"skipping bad data: {err}", stacklevel=2)
            pos = _resync(mv, err.offset - base_offset + 4, base_offset)
            continue
        yield base_offset + pos, payload
        pos = end


def _parse_record(mv: memoryview, pos: int, base_offset: int, path) -> tuple[bytes, int]:
    """The record starting at mv[pos]: (joined payload, position after its last chunk)."""
    n = len(mv)
    parts = None
    while True:
        if n - pos < 8:
            raise RecordIOError(path, base_offset + pos, f"truncated record header: {n - pos} of 8 bytes")
        flag, length = _decode_chunk_head(*_CHUNK_HEAD.unpack_from(mv, pos), base_offset + pos, path,
                                          parts is not None)
        begin, end = pos + 8, pos + 8 + length
        pos = end + _pad(length)
        if pos > n:
            raise RecordIOError(path, base_offset + begin - 8, f"truncated record: chunk needs "
                                f"{length + _pad(length)} payload bytes, {n - begin} left")
        if any(mv[end:pos]):
            raise _bad_padding(path, base_offset + begin - 8, length)
        if flag == _WHOLE:
            return bytes(mv[begin:end]), pos
        if parts is None:
            parts = [mv[begin:end]]
            continue
        parts += (_MAGIC_BYTES, mv[begin:end])
        if flag == _END:
            return b"".join(parts), pos


def _bad_padding(path, offset: int, length: int) -> RecordIOError:
    # Writers pad with zeros; data there means the length field lost bytes of the payload.
    return RecordIOError(path, offset, f"non-zero padding after a {length}-byte chunk: the length field is "
                                       "corrupt (it cuts off payload bytes)")


def _check_record_end(mv: memoryview, pos: int, end: int, base_offset: int, path) -> None:
    """Without an index, a corrupt length field is caught by what follows the record: the next record must
    start where it ends. When it does not, blame this record unless the bytes there look like the next
    record's header with a damaged magic/flag (its length lands exactly on the following record start)."""
    n = len(mv)
    if end == n or _starts_record(mv, end) or bytes(mv[end:end + 4]) == _MAGIC_BYTES[:n - end]:
        return  # a record (perhaps a broken one, reported when parsed) starts here
    hit = _resync(mv, pos + 4, base_offset)  # the next whole/start chunk after this record's own start
    if hit < end:
        raise RecordIOError(path, base_offset + pos, f"the record's chunks run to byte offset {base_offset + end}, "
                            f"past a record starting at {base_offset + hit} (a corrupt length field)")
    if n - end >= 8:
        length = _CHUNK_HEAD.unpack_from(mv, end)[1] & _LEN_MASK
        if end + 8 + length + _pad(length) == hit:
            return  # this record is sound; the next one's header is damaged (reported when it is parsed)
    raise RecordIOError(path, base_offset + pos, f"the record's chunks end at byte offset {base_offset + end}, "
                        "where no record starts (a corrupt length field)")


def _starts_record(mv, pos: int) -> bool:
    """Whether a whole/start chunk header lies at mv[pos]."""
    if len(mv) - pos < 8:
        return False
    magic, lrec = _CHUNK_HEAD.unpack_from(mv, pos)
    return magic == MAGIC and lrec >> 29 in (_WHOLE, _START)


def read_extent(buf, start: int, end: int, *, base_offset: int = 0, path="<buffer>") -> bytes:
    """The payload of the record at buf[start], checked against its extent [start, end) from the index: it must
    end exactly at `end` (the next indexed record, or the end of the file), or where another (unindexed)
    record starts. Offsets in messages are file offsets (`base_offset` is the file offset of buf[0])."""
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    mv = mv[:end]
    try:
        payload, stop = _parse_record(mv, start, base_offset, path)
    except RecordIOError as err:
        if err.reason.startswith("truncated"):
            raise RecordIOError(path, err.offset, f"{err.reason}: the chunk runs past the next indexed record at "
                                f"byte offset {base_offset + end} (a corrupt length field or .idx offset)") from None
        raise
    if stop != end and not _starts_record(mv, stop):
        raise RecordIOError(path, base_offset + start, f"the record ends at byte offset {base_offset + stop} but the "
                            f"next indexed record starts at {base_offset + end} and no record starts in between "
                            "(a corrupt length field or .idx offset)")
    return payload


def _resync(mv: memoryview, pos: int, base_offset: int) -> int:
    """Position of the next file-aligned magic at or after `pos` that begins a whole/start chunk, else len."""
    obj = mv.obj
    data = obj if hasattr(obj, "find") and len(obj) == len(mv) else mv.tobytes()  # bytes and mmap have find
    while True:
        hit = data.find(_MAGIC_BYTES, pos)
        if hit == -1:
            return len(mv)
        if (base_offset + hit) & 3 == 0 and hit + 8 <= len(mv) and _CHUNK_HEAD.unpack_from(mv, hit)[1] >> 29 <= 1:
            return hit
        pos = hit + 1


def _read_record(f, path, end: int | None = None) -> bytes | None:
    """Read the record at the file position of `f`; None at a clean end of file. No chunk may run past
    byte `end` (default: the end of the file), so a corrupt length never makes a large read."""
    if end is None:
        end = os.fstat(f.fileno()).st_size
    parts = None
    while True:
        offset = f.tell()
        if parts is not None and offset + 8 > end:
            raise RecordIOError(path, offset, f"truncated record header: a split record continues past byte "
                                f"offset {end}")
        raw = f.read(8)
        if not raw and parts is None:
            return None
        if len(raw) < 8:
            raise RecordIOError(path, offset, f"truncated record header: {len(raw)} of 8 bytes")
        flag, length = _decode_chunk_head(*_CHUNK_HEAD.unpack(raw), offset, path, parts is not None)
        want = length + _pad(length)
        if offset + 8 + want > end:
            raise RecordIOError(path, offset, f"truncated record: chunk needs {want} payload bytes, "
                                f"{max(0, end - offset - 8)} left before byte offset {end}")
        chunk = f.read(want)
        if len(chunk) < want:
            raise RecordIOError(path, offset, f"truncated record: chunk needs {want} payload bytes, {len(chunk)} left")
        if any(chunk[length:]):
            raise _bad_padding(path, offset, length)
        if flag == _WHOLE:
            return chunk[:length]
        if parts is None:
            parts = [chunk[:length]]
        else:
            parts += (_MAGIC_BYTES, chunk[:length])
            if flag == _END:
                return b"".join(parts)


# --------------------------------------------------------------------------- atomic writes and .idx files


def _tmp_name(path: str) -> str:
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = os.fspath(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def parse_index(text, *, path="<index>", rec_size: int | None = None, key_type=int) -> dict:
    """Parse `.idx` text (`key<TAB>offset` lines) into an ordered {key: offset} dict, validated.

    With `rec_size`, offsets that leave no room for a record header before the end of the `.rec` fail.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise RecordIOError(path, None, f"not UTF-8 text (byte {exc.start} of the .idx); an .idx holds "
                                            "'key<TAB>offset' lines: rebuild it (magface.recordio.build_index)",
                                line=line) from None
    index: dict = {}
    owner: dict = {}  # offset -> key
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        if len(fields) != 2:
            raise RecordIOError(path, None, f"malformed .idx line {line!r}: expected 'key<TAB>offset'", line=lineno)
        try:
            key = key_type(fields[0])
            offset = int(fields[1])
        except ValueError:
            raise RecordIOError(path, None, f"malformed .idx line {line!r}: bad key or offset", line=lineno) from None
        if offset < 0 or offset & 3:
            raise RecordIOError(path, None, f"offset {offset} is not a 4-byte-aligned file position", line=lineno)
        if rec_size is not None and offset + 8 > rec_size:
            raise RecordIOError(path, None, f"offset {offset} is past the end of the .rec ({rec_size} bytes)",
                                line=lineno)
        if key in index:
            raise RecordIOError(path, None, f"duplicate key {key!r} (first at offset {index[key]})", line=lineno)
        if offset in owner:
            raise RecordIOError(path, None, f"keys {owner[offset]!r} and {key!r} both at offset {offset}: one "
                                            "record cannot have two keys", line=lineno)
        index[key] = offset
        owner[offset] = key
    return index


def read_index(idx_path, *, rec_size: int | None = None, key_type=int) -> dict:
    """Read and validate a `.idx` file: {key: byte offset} in file order."""
    with open(idx_path, "rb") as f:
        return parse_index(f.read(), path=idx_path, rec_size=rec_size, key_type=key_type)


def write_index(idx_path, pairs: Iterable[tuple]) -> None:
    """Write (key, offset) pairs as a `.idx` file, atomically, in MXNet's `%s\\t%d\\n` format."""
    text = "".join(f"{key}\t{int(offset)}\n" for key, offset in pairs)
    with atomic_path(idx_path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)


def build_index(rec_path, key_from: str = "position", *, skip_bad: bool = False) -> list[tuple[int, int]]:
    """Scan a `.rec` and return (key, offset) for every record.

    key_from="position": keys 0..N-1 in file order (what MXNet's sequential `write_idx` loops produce);
    "header_id": each record's IRHeader.id. `skip_bad` needs "header_id": positions after a skipped spot
    would silently shift to other records' keys.
    """
    if key_from not in ("position", "header_id"):
        raise ValueError(f"key_from must be 'position' or 'header_id', got {key_from!r}")
    if skip_bad and key_from == "position":
        raise ValueError("build_index(skip_bad=True) needs key_from='header_id': after a skipped bad spot, "
                         "record positions no longer match the keys the writer gave")
    pairs, error = [], None
    with open(rec_path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return pairs
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            records = iter_records(mm, path=rec_path, skip_bad=skip_bad)
            try:
                for pos, (offset, payload) in enumerate(records):
                    if key_from == "position":
                        pairs.append((pos, offset))
                    elif len(payload) < _IR_SIZE:
                        raise RecordIOError(rec_path, offset, f"record has {len(payload)} bytes, too short "
                                                              f"for a {_IR_SIZE}-byte IRHeader")
                    else:
                        pairs.append((_IR.unpack_from(payload)[2], offset))
            except RecordIOError as exc:
                error = exc.with_traceback(None)  # its frames hold views into the mmap, which must close
            finally:
                records.close()  # releases the memoryview before the mmap closes
    if error is not None:
        raise error
    return pairs


# --------------------------------------------------------------------------- readers and writers


class MXRecordIO:
    """Sequential RecordIO reader (flag 'r') or writer (flag 'w'), like `mxnet.recordio.MXRecordIO`.

    Writers write to a temporary file that `close()` renames into place, so a crashed job never leaves a
    truncated `.rec` that looks complete; leaving a `with` block on an exception discards it.
    """

    def __init__(self, uri, flag: str):
        self.uri = os.fspath(uri)
        self.flag = flag
        self.is_open = False
        self._f = None
        self.open()

    @property
    def writable(self) -> bool:
        return self.flag == "w"

    def open(self):
        if self.flag == "w":
            self._tmp = _tmp_name(self.uri)
            self._f = open(self._tmp, "wb")
            self._pid = os.getpid()
            self.is_open = True
        elif self.flag == "r":
            self._open_reader(0)
        else:
            raise ValueError(f"invalid flag {self.flag!r}: use 'r' or 'w'")

    def _open_reader(self, pos: int):
        self._f = open(self.uri, "rb")
        self._f.seek(pos)
        self._pid = os.getpid()
        self.is_open = True

    def close(self):
        self._finish(commit=True)

    def _finish(self, commit: bool):
        if not self.is_open:
            return
        self.is_open = False
        self._f.close()
        if self.writable:
            if commit:
                os.replace(self._tmp, self.uri)
            else:
                os.remove(self._tmp)

    def reset(self):
        """Back to the start: readers rewind; writers, as in MXNet, start the file over."""
        self.close()
        self.open()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._finish(commit=exc_type is None)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing sensible left to do
            pass

    def __getstate__(self):
        if self.writable:
            raise TypeError(f"cannot pickle a RecordIO writer ({self.uri})")
        state = self.__dict__.copy()
        state["_f"] = None
        state["is_open"] = False
        return state

    def __setstate__(self, state):
        # Reopen only the .rec: an index that came along (perhaps rebuilt by a scan) is kept as is.
        self.__dict__.update(state)
        self._open_reader(0)

    def _check_pid(self):
        # A forked child (e.g. a DataLoader worker) shares the parent's file descriptor and thus its
        # position: give it its own.
        if self._pid != os.getpid():
            self._open_reader(self._f.tell())

    def write(self, buf) -> None:
        if not self.writable:
            raise ValueError(f"{self.uri} is open for reading")
        self._f.write(encode_record(buf))

    def read(self) -> bytes | None:
        """The next record's payload, or None at the end of the file."""
        if self.writable:
            raise ValueError(f"{self.uri} is open for writing")
        self._check_pid()
        return _read_record(self._f, self.uri)

    def tell(self) -> int:
        """Byte offset of the next record to be read or written."""
        return self._f.tell()


class MXIndexedRecordIO(MXRecordIO):
    """RecordIO with a `.idx` file for random access, like `mxnet.recordio.MXIndexedRecordIO`.

    `keys` is a list attribute (as in MXNet), `idx` maps key -> byte offset. Reading a `.rec` whose
    `.idx` is missing rebuilds the index by scanning the `.rec` (with a warning); `save_rebuilt_index`
    also writes it to `idx_path`.
    """

    def __init__(self, idx_path, uri, flag: str, key_type=int, *, save_rebuilt_index: bool = False):
        self.idx_path = os.fspath(idx_path)
        self.key_type = key_type
        self.save_rebuilt_index = save_rebuilt_index
        self.idx: dict = {}
        self.keys: list = []
        self._fidx = None
        self._bounds = None
        super().__init__(uri, flag)

    def open(self):
        super().open()
        self.idx = {}
        self.keys = []
        self._bounds = None
        if self.writable:
            self._idx_tmp = _tmp_name(self.idx_path)
            self._fidx = open(self._idx_tmp, "w", encoding="utf-8", newline="\n")
            return
        rec_size = os.fstat(self._f.fileno()).st_size
        if os.path.exists(self.idx_path):
            self.idx = read_index(self.idx_path, rec_size=rec_size, key_type=self.key_type)
        else:
            warnings.warn(f"{self.idx_path} not found: rebuilding the index by scanning {self.uri} "
                          "(keys are record positions 0..N-1)", stacklevel=3)
            pairs = build_index(self.uri)
            if self.save_rebuilt_index:
                write_index(self.idx_path, pairs)
            self.idx = {self.key_type(k): off for k, off in pairs}
        self.keys = list(self.idx)

    def _finish(self, commit: bool):
        if not self.is_open:
            return
        super()._finish(commit)
        if self._fidx is not None:
            self._fidx.close()
            self._fidx = None
            if commit:
                os.replace(self._idx_tmp, self.idx_path)
            else:
                os.remove(self._idx_tmp)

    def seek(self, idx) -> None:
        """Position the reader at record `idx` (a key of the `.idx`)."""
        if self.writable:
            raise ValueError(f"{self.uri} is open for writing; seek is for readers")
        try:
            offset = self.idx[idx]
        except KeyError:
            raise RecordIOError(self.idx_path, None, f"key {idx!r} not in the index ({len(self.idx)} keys)") from None
        self._check_pid()
        self._f.seek(offset)

    def read_idx(self, idx) -> bytes:
        """The record with key `idx`, checked to end where the next indexed record starts (or where some
        other record starts, or at the end of the file): a corrupt length cannot pass as a shorter or longer
        record."""
        self.seek(idx)
        start = self.idx[idx]
        if self._bounds is None:  # sorted record offsets and the file size, built on first use
            self._bounds = sorted(set(self.idx.values())) + [os.fstat(self._f.fileno()).st_size]
        end = self._bounds[bisect.bisect_right(self._bounds, start)] if start < self._bounds[-1] else start
        try:
            record = _read_record(self._f, self.uri, end)
        except RecordIOError as err:
            reason = err.reason
            if reason.startswith("truncated") and end < self._bounds[-1]:
                reason = (f"the record runs past the next indexed record at byte offset {end} (a corrupt length "
                          "field or .idx offset)")
            raise RecordIOError(self.uri, start, f"key {idx!r}: {reason}") from None
        if record is None:
            raise RecordIOError(self.uri, start, f"key {idx!r} points at the end of the file")
        stop = self._f.tell()  # <= end: _read_record never reads past it
        if stop != end:
            head = self._f.read(8)
            self._f.seek(stop)
            if not _starts_record(head, 0):
                raise RecordIOError(self.uri, start, f"key {idx!r}: the record ends at byte offset {stop} but the "
                                    f"next indexed record starts at {end} and no record starts in between "
                                    "(a corrupt length field or .idx offset)")
        return record

    def write_idx(self, idx, buf) -> None:
        key = self.key_type(idx)
        pos = self.tell()
        self.write(buf)
        self._fidx.write(f"{key}\t{pos}\n")
        self.idx[key] = pos
        self.keys.append(key)


# --------------------------------------------------------------------------- image record headers


def pack(header, s: bytes) -> bytes:
    """IRHeader + payload -> record bytes. A non-scalar label is stored as `flag` float32 values."""
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
    else:
        label = np.asarray(header.label, dtype=np.float32)
        header = header._replace(flag=label.size, label=0)
        s = label.tobytes() + bytes(s)
    return _IR.pack(*header) + bytes(s)


def unpack(s) -> tuple[IRHeader, bytes]:
    """Record bytes -> (IRHeader, payload). With flag > 0, header.label is a float32 array of `flag` values."""
    if len(s) < _IR_SIZE:
        raise ValueError(f"record of {len(s)} bytes is shorter than the {_IR_SIZE}-byte IRHeader")
    header = IRHeader(*_IR.unpack_from(s))
    s = s[_IR_SIZE:]
    if header.flag > 0:
        if len(s) < 4 * header.flag:
            raise ValueError(f"IRHeader announces {header.flag} float32 labels but only {len(s)} bytes follow")
        header = header._replace(label=np.frombuffer(s, np.float32, header.flag))
        s = s[4 * header.flag:]
    return header, s


def unpack_img(s) -> tuple[IRHeader, np.ndarray]:
    """Record bytes -> (IRHeader, RGB uint8 (H, W, 3) image). MXNet's version returns BGR."""
    from magface.data.codec import decode_jpeg

    header, img = unpack(s)
    return header, decode_jpeg(img)


def pack_img(header, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """IRHeader + RGB uint8 image -> record bytes with the image JPEG-encoded (MXNet's takes BGR)."""
    from magface.data.codec import encode_jpeg

    if img_fmt.lower() not in (".jpg", ".jpeg"):
        raise ValueError(f"pack_img writes JPEG only, got img_fmt={img_fmt!r}")
    return pack(header, encode_jpeg(img, quality=quality))
