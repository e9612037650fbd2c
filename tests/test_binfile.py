"""insightface .bin verification sets: the golden file, round trips, older pickle layouts, and refusal of
pickles that would run code."""

import hashlib
import json
import os
import pickle

import numpy as np
import pytest

from magface.data.binfile import BinFileError, load_bin, write_bin
from magface.data.codec import decode_jpeg


@pytest.fixture(scope="module")
def golden(golden_dir):
    meta = json.loads((golden_dir / "manifest.json").read_text())["verify.bin"]
    return golden_dir / "verify.bin", meta


def test_golden_verify_bin_matches_manifest(golden):
    path, meta = golden
    images, issame = load_bin(path)
    assert issame.dtype == np.bool_ and issame.tolist() == meta["issame"] and len(issame) == meta["pairs"]
    assert [hashlib.sha256(img).hexdigest() for img in images] == meta["sha256"]
    assert decode_jpeg(images[0]).dtype == np.uint8 and decode_jpeg(images[-1]).ndim == 3


def test_round_trip_is_readable_by_insightface_loader(golden, tmp_path):
    images, issame = load_bin(golden[0])
    out = tmp_path / "copy.bin"
    write_bin(out, images, issame)
    with open(out, "rb") as f:  # insightface's own loader: a plain pickle.load with encoding="bytes"
        bins, issame_list = pickle.load(f, encoding="bytes")
    assert bins == images and issame_list == issame.tolist()
    again, issame2 = load_bin(out)
    assert again == images and np.array_equal(issame2, issame)
    assert [p.name for p in tmp_path.iterdir()] == ["copy.bin"]  # no temporary left behind


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_older_layouts_load(golden, tmp_path, protocol):
    images, issame = load_bin(golden[0])
    variants = [
        (images, issame.tolist()),                                       # protocol 2: bytes via _codecs.encode
        ([np.frombuffer(b, np.uint8) for b in images], np.array(issame)),  # MXNet-era numpy arrays
        (tuple(images), [np.bool_(x) for x in issame]),                   # numpy bool scalars
    ]
    for i, obj in enumerate(variants):
        path = tmp_path / f"v{i}.bin"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        got, got_issame = load_bin(path)
        assert got == images and np.array_equal(got_issame, issame), (protocol, i)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"\xff\xd8", _RunsCode(marker)], [True])))
    with pytest.raises(BinFileError) as ei:
        load_bin(path)
    assert str(path) in str(ei.value) and ".system" in str(ei.value)  # posix.system on Linux
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the same file through plain pickle does run the command
    assert marker.exists()


@pytest.mark.parametrize("payload, match", [
    (pickle.dumps((["not bytes", b"x"], [True])), "image 0"),
    (pickle.dumps(([b"a", b"b", b"c"], [True])), "3 images for 1 pairs"),
    (pickle.dumps([b"a", b"b", b"c"]), "images, issame"),
    (pickle.dumps([b"ab", [True]]), "images must be a list"),
    (pickle.dumps(([b"a", b"b"], [2.5])), "booleans"),
    (b"\x80\x04garbage", "not a readable pickle"),
    (pickle.dumps(([b"a", b"b"], [True]), protocol=4)[:-5], "not a readable pickle"),
], ids=["str-image", "odd-count", "not-a-pair", "images-not-list", "float-issame", "garbage", "truncated"])
def test_bad_files_name_the_file(tmp_path, payload, match):
    path = tmp_path / "bad.bin"
    path.write_bytes(payload)
    with pytest.raises(BinFileError, match=match) as ei:
        load_bin(path)
    assert str(path) in str(ei.value)


def test_builtin_eval_global_is_refused(tmp_path):
    path = tmp_path / "eval.bin"
    path.write_bytes(b"cbuiltins\neval\n(V1+1\ntR.")
    with pytest.raises(BinFileError, match="builtins.eval"):
        load_bin(path)


def test_write_bin_checks_pair_count(tmp_path):
    with pytest.raises(ValueError, match="need 2 per pair"):
        write_bin(tmp_path / "x.bin", [b"a"], [True])
    assert not (tmp_path / "x.bin").exists()
