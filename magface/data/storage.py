"""Local paths and ``s3://`` URIs behind a few small functions: ranged reads, listing, atomic writes, uploads.

S3 goes through boto3 with its standard configuration chain, nothing project-specific: credentials from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or a profile, or an instance role), region from
``AWS_DEFAULT_REGION``, and a custom endpoint (MinIO, moto, Ceph) from ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, which botocore >= 1.31 reads natively.

Network waits are bounded and said out loud: each request attempt waits at most
``MAGFACE_S3_CONNECT_TIMEOUT`` seconds to connect (default 5) and ``MAGFACE_S3_READ_TIMEOUT`` seconds for
each read from the socket (default 20), and is tried ``MAGFACE_S3_MAX_ATTEMPTS`` times in all (default 3).
Every retry logs a warning naming the object and the failure, so a frozen endpoint is reported within one
read timeout and fails with a StorageError after about attempts x (read timeout + backoff).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = [
    "StorageError",
    "atomic_write",
    "check_readable",
    "download_tree",
    "exists",
    "is_s3",
    "join",
    "list_files",
    "parent",
    "read_bytes",
    "read_range",
    "size",
    "split_s3",
    "upload_file",
]

S3_SCHEME = "s3://"
_MiB = 1024 * 1024
# Variables that select the S3 client; the cached client is rebuilt when any of them changes.
_CLIENT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")
_clients: dict = {}
_clients_lock = threading.Lock()
logger = logging.getLogger(__name__)
# The bounds on network waits (see module docstring): environment variable -> default.
TIMEOUT_ENV = {"MAGFACE_S3_CONNECT_TIMEOUT": 5.0, "MAGFACE_S3_READ_TIMEOUT": 20.0, "MAGFACE_S3_MAX_ATTEMPTS": 3}


class StorageError(OSError):
    """A storage location cannot be read or written; the message names it and says what is missing."""


def is_s3(uri) -> bool:
    return str(uri).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, key = str(uri)[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: an S3 URI needs a bucket, e.g. s3://bucket/prefix")
    return bucket, key


def join(base, *names: str) -> str:
    """Join path parts for either kind of location."""
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])
    return os.path.join(base, *names)


def parent(uri) -> str:
    """The folder (or S3 prefix) holding `uri`."""
    uri = str(uri)
    if is_s3(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri))


def timeouts() -> dict:
    """The network bounds in force: {connect_timeout, read_timeout (seconds), max_attempts}, from the
    MAGFACE_S3_* environment variables (errors name the variable)."""
    out = {}
    for name, default in TIMEOUT_ENV.items():
        raw = os.environ.get(name)
        try:
            value = type(default)(raw) if raw not in (None, "") else default
        except ValueError:
            raise StorageError(f"{name}={raw!r}: expected a number") from None
        if not 0 < value < 1e6:
            raise StorageError(f"{name}={raw!r}: must be > 0")
        out[name[len("MAGFACE_S3_"):].lower()] = value
    return out


def _client(retries: int | None = None):
    """One boto3 S3 client per process and configuration (boto3 clients are thread-safe). `retries`: total
    attempts per request (default MAGFACE_S3_MAX_ATTEMPTS)."""
    limits = timeouts()
    attempts = limits["max_attempts"] if retries is None else retries
    key = (tuple(os.environ.get(k) for k in _CLIENT_ENV), attempts, limits["connect_timeout"], limits["read_timeout"])
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(retries={"mode": "standard", "max_attempts": attempts},
                         connect_timeout=limits["connect_timeout"], read_timeout=limits["read_timeout"],
                         max_pool_connections=32)
            client = _clients[key] = boto3.session.Session().client("s3", config=cfg)
            client.meta.events.register("needs-retry.s3", _note_failure)
            client.meta.events.register("request-created.s3", _warn_retry)
        return client


def _note_failure(request_dict=None, response=None, caught_exception=None, **_):
    """Remember why an attempt failed (botocore's own retry handler decides whether to retry)."""
    if request_dict is None:
        return None
    if caught_exception is not None:
        why = f"{type(caught_exception).__name__}: {caught_exception}"
    elif response is not None:
        status = response[0].status_code if response[0] is not None else "?"
        why = f"HTTP {status} {response[1].get('Error', {}).get('Code', '')}".strip()
    else:
        why = "unknown failure"
    request_dict["context"]["magface_last_failure"] = why
    return None


def _warn_retry(request=None, operation_name=None, **_):
    """A warning per retry, as it happens: which request, which attempt, and why the last one failed."""
    ctx = getattr(request, "context", None) or {}
    attempt = ctx.get("retries", {}).get("attempt", 1)
    if attempt > 1:
        url = getattr(request, "url", "?").split("?")[0]
        logger.warning("S3 %s %s: attempt %d of %d after %s (bounds: MAGFACE_S3_READ_TIMEOUT, "
                       "MAGFACE_S3_MAX_ATTEMPTS)", operation_name, url, attempt, timeouts()["max_attempts"],
                       ctx.get("magface_last_failure", "a failure"))


def _s3_error(uri: str, exc: Exception) -> StorageError:
    """Translate a botocore failure into a message that says which bucket and what is wrong."""
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError,
                                     ReadTimeoutError)

    bucket, key = split_s3(uri)
    if isinstance(exc, NoCredentialsError):
        why = ("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
               "or run with an instance role")
    elif isinstance(exc, EndpointConnectionError):
        why = f"S3 endpoint unreachable ({exc}); check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and the network"
    elif isinstance(exc, (ReadTimeoutError, ConnectTimeoutError)):
        limits = timeouts()
        why = (f"S3 endpoint stopped answering ({exc}) after {limits['max_attempts']} attempt(s) of "
               f"{limits['read_timeout']:g} s (MAGFACE_S3_READ_TIMEOUT / MAGFACE_S3_MAX_ATTEMPTS); check the "
               "endpoint and the network")
    elif isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket",):
            why = f"bucket {bucket!r} does not exist"
        elif code in ("NoSuchKey", "404", "NotFound"):
            why = f"object {key!r} not found in bucket {bucket!r}"
        elif code in ("AccessDenied", "403", "Forbidden"):
            why = f"access denied to bucket {bucket!r} (key {key!r}): the credentials lack s3:GetObject/ListBucket"
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            why = f"the AWS credentials were rejected ({code})"
        else:
            why = f"S3 error {code}: {exc}"
    else:
        why = f"{type(exc).__name__}: {exc}"
    return StorageError(f"{uri}: {why}")


@contextmanager
def _s3_errors(uri: str):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(uri, exc) from exc


def read_range(uri, start: int, length: int) -> bytes:
    """`length` bytes of `uri` from byte `start` (one ranged GET on S3)."""
    if length <= 0:
        return b""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            resp = _client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            data = resp["Body"].read()
    else:
        with open(uri, "rb") as f:
            f.seek(start)
            data = f.read(length)
    if len(data) != length:
        raise StorageError(f"{uri}: wanted bytes [{start}, {start + length}), got {len(data)} bytes "
                           "(the file is shorter than its index says)")
    return data


def read_bytes(uri) -> bytes:
    """The whole object or file."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
    with open(uri, "rb") as f:
        return f.read()


def size(uri) -> int:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            return int(_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return os.path.getsize(uri)


def exists(uri) -> bool:
    """True if the file or object exists. Other failures (credentials, endpoint) raise StorageError."""
    if not is_s3(uri):
        return os.path.exists(uri)
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        _client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise _s3_error(uri, exc) from exc
    except Exception as exc:  # botocore's connection/credential errors
        raise _s3_error(uri, exc) from exc


def list_files(prefix, suffix: str = "") -> list[str]:
    """Files directly or recursively under a folder / S3 prefix whose names end with `suffix`, sorted."""
    prefix = str(prefix)
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        out = []
        with _s3_errors(prefix):
            for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                out += [f"{S3_SCHEME}{bucket}/{o['Key']}" for o in page.get("Contents", ())
                        if o["Key"].endswith(suffix)]
        return sorted(out)
    if not os.path.isdir(prefix):
        raise StorageError(f"{prefix}: not a directory")
    return sorted(str(p) for p in Path(prefix).rglob(f"*{suffix}") if p.is_file())


@contextmanager
def atomic_write(uri) -> Iterator:
    """Open `uri` for binary writing; readers see either the old content or the complete new one.

    Local: a temporary name in the same folder, `os.replace`d into place on success. S3: spooled to a local
    temporary file and uploaded on success (an S3 PUT is atomic); nothing is written if the block raises.
    """
    uri = str(uri)
    if is_s3(uri):
        with tempfile.NamedTemporaryFile(prefix="magface-upload-") as tmp:
            yield tmp
            tmp.flush()
            upload_file(tmp.name, uri)
        return
    from magface.recordio import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    with atomic_path(uri) as tmp_path, open(tmp_path, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def upload_file(local_path, uri: str, *, part_size_mb: int = 64, max_concurrency: int = 8) -> None:
    """Copy a local file to `uri`; S3 uploads above `part_size_mb` go multipart, in parallel parts."""
    if not is_s3(uri):
        with atomic_write(uri) as dst, open(local_path, "rb") as src:
            shutil.copyfileobj(src, dst, 16 * _MiB)
        return
    from boto3.s3.transfer import TransferConfig

    bucket, key = split_s3(uri)
    cfg = TransferConfig(multipart_threshold=part_size_mb * _MiB, multipart_chunksize=part_size_mb * _MiB,
                         max_concurrency=max_concurrency)
    with _s3_errors(uri):
        _client().upload_file(str(local_path), bucket, key, Config=cfg)


def download_tree(prefix: str, dest) -> Path:
    """Mirror every object under an S3 prefix (or files under a folder) into `dest`; files already there
    with the same size are kept, so a second call is cheap."""
    dest = Path(dest)
    base = str(prefix).rstrip("/") + "/"
    for uri in list_files(prefix):
        rel = uri[len(base):] if uri.startswith(base) else ""
        if not rel or rel.endswith("/"):
            continue  # "folder" marker objects (S3 consoles and some uploaders create them) hold no file
        target = dest / rel
        n = size(uri)
        if target.exists() and target.stat().st_size == n:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as f:
            f.write(read_bytes(uri) if n else b"")
    return dest


def check_readable(uri) -> None:
    """Fail early, with what is wrong, if `uri` cannot be read: no credentials, unreachable endpoint,
    missing bucket, access denied, or missing object/file. Fast: no retries."""
    uri = str(uri)
    if not is_s3(uri):
        if not os.path.exists(uri):
            raise StorageError(f"{uri}: no such file or directory")
        if not os.access(uri, os.R_OK):
            raise StorageError(f"{uri}: permission denied")
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    client = _client(retries=1)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from exc
        raise _s3_error(uri, exc) from exc
    except BotoCoreError as exc:
        raise _s3_error(uri, exc) from exc
    if key and not key.endswith("/"):
        try:
            client.head_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(uri, exc) from exc
