"""Shards on S3 (a real moto server on 127.0.0.1), read through read_recordio like users do."""

import os
import time

import boto3
import pytest

from tests.s3_server import make_bucket


def _rows(ds):
    return sorted((r["key"], r["label"], r["image"]) for r in ds.take_all())


def test_s3_shards_read_like_local(ray_session, s3_env, golden_dir, tmp_path):
    from magface.data import read_recordio
    from magface.data.convert import split_rec, upload_shards

    golden = str(golden_dir / "ms1m_layout" / "train.rec")
    local = tmp_path / "shards"
    t0 = time.perf_counter()
    split_rec(golden, local, 3, progress=False)
    print(f"split {time.perf_counter() - t0:.1f} s")
    make_bucket("faces")
    report = upload_shards(local, "s3://faces/ms1m")
    assert len(report.uploaded) == 1 + 3 * 3 and not report.skipped
    assert upload_shards(local, "s3://faces/ms1m").uploaded == []  # resumable: nothing re-sent
    # The read tasks run in Ray workers started before AWS_* was set: read_recordio forwards the driver's
    # environment, the same path a user's `ray job submit` takes.
    t0 = time.perf_counter()
    from_s3 = _rows(read_recordio("s3://faces/ms1m", override_num_blocks=3))
    print(f"s3 read {time.perf_counter() - t0:.1f} s")
    assert from_s3 == _rows(read_recordio(str(local)))
    assert sorted(r[1:] for r in from_s3) == sorted(r[1:] for r in _rows(read_recordio(golden)))
    assert len(from_s3) == 78
    # Labels are checked against the property file on S3 too.
    with pytest.raises(Exception, match=r"s3://faces/ms1m/train-\d+-of-00003\.rec: record key \d+ .*outside \[0, 3\)"):
        read_recordio("s3://faces/ms1m", num_classes=3).take_all()


def test_storage_functions_and_multipart(s3_env, tmp_path):
    from magface.data import storage

    make_bucket("blobs")
    data = os.urandom(11 * 1024 * 1024 + 5)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    storage.upload_file(src, "s3://blobs/x/big.bin", part_size_mb=5)
    etag = boto3.client("s3").head_object(Bucket="blobs", Key="x/big.bin")["ETag"]
    assert etag.strip('"').endswith("-3")  # three parts: a multipart upload
    assert storage.size("s3://blobs/x/big.bin") == len(data)
    assert storage.read_range("s3://blobs/x/big.bin", 5 * 1024 * 1024 - 3, 10) == data[5 * 1024 * 1024 - 3:][:10]
    assert storage.read_bytes("s3://blobs/x/big.bin") == data
    with storage.atomic_write("s3://blobs/x/small.txt") as f:
        f.write(b"hello")
    with pytest.raises(RuntimeError):
        with storage.atomic_write("s3://blobs/x/never.txt") as f:
            f.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert not storage.exists("s3://blobs/x/never.txt")
    assert storage.list_files("s3://blobs/x") == ["s3://blobs/x/big.bin", "s3://blobs/x/small.txt"]
    with pytest.raises(storage.StorageError, match="bucket 'nobucket' does not exist"):
        storage.check_readable("s3://nobucket/a.rec")
    with pytest.raises(storage.StorageError, match="object 'x/missing.rec' not found in bucket 'blobs'"):
        storage.check_readable("s3://blobs/x/missing.rec")


def test_check_readable_credentials_and_endpoint(s3_env, monkeypatch):
    from magface.data import storage

    make_bucket("creds")
    storage.check_readable("s3://creds")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(storage.StorageError, match="endpoint unreachable"):
        storage.check_readable("s3://creds/a.rec")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(storage.StorageError, match="no AWS credentials"):
        storage.check_readable("s3://creds/a.rec")


def test_frozen_endpoint_is_reported_within_the_configured_timeout(monkeypatch, caplog):
    """A server stopped with SIGSTOP (it accepts connections but never answers): every retry is logged as it
    happens, the read fails with a named error after attempts x read timeout, and it works again after SIGCONT."""
    import signal

    from magface.data import storage
    from tests.s3_server import MOTO_CREDENTIALS, moto_s3_process

    with moto_s3_process() as (url, proc):
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)
        for name, value in {**MOTO_CREDENTIALS, "AWS_ENDPOINT_URL_S3": url, "MAGFACE_S3_READ_TIMEOUT": "1.5",
                            "MAGFACE_S3_CONNECT_TIMEOUT": "1", "MAGFACE_S3_MAX_ATTEMPTS": "2"}.items():
            monkeypatch.setenv(name, value)
        make_bucket("frozen")
        payload = os.urandom(300_000)
        boto3.client("s3").put_object(Bucket="frozen", Key="a.rec", Body=payload)
        assert storage.read_range("s3://frozen/a.rec", 10, 100) == payload[10:110]
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            caplog.set_level("WARNING", logger="magface.data.storage")
            t0 = time.monotonic()
            with pytest.raises(storage.StorageError, match=r"s3://frozen/a.rec: S3 endpoint stopped answering.*"
                                                           r"2 attempt\(s\) of 1.5 s.*MAGFACE_S3_READ_TIMEOUT"):
                storage.read_range("s3://frozen/a.rec", 0, 1000)
            elapsed = time.monotonic() - t0
            retries = [r.getMessage() for r in caplog.records if "attempt 2 of 2" in r.getMessage()]
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # two read timeouts at least; at most the configured worst case, 2 x (connect 1 + read 1.5) s plus
        # botocore's jitter (< 0.1 s for non-throttling errors), with 5 s for a loaded 2-core runner (7.3 s seen
        # once in CI). Unbounded reads would take the 20 s default per attempt, so the bound still tells.
        assert 2 * 1.5 <= elapsed < 2 * (1 + 1.5) + 5, elapsed
        assert len(retries) == 1 and "frozen/a.rec" in retries[0] and "Read timeout" in retries[0], retries
        assert storage.read_range("s3://frozen/a.rec", 0, 1000) == payload[:1000]
    with pytest.raises(storage.StorageError, match="MAGFACE_S3_MAX_ATTEMPTS='x': expected a number"):
        monkeypatch.setenv("MAGFACE_S3_MAX_ATTEMPTS", "x")
        storage.timeouts()
