"""A real S3 endpoint for tests: moto's standalone server on 127.0.0.1, started as a subprocess.

`moto_s3()` is a context manager yielding the endpoint URL; the session fixture `s3_server` wraps it and
`s3_env` points boto3 at it through the standard AWS_* variables (the same path users configure).
Register in tests/conftest.py with `from tests.s3_server import s3_env, s3_server  # noqa: F401`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import pytest

MOTO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# moto's server with one fix: its CompleteMultipartUpload reply is rooted at <CompleteMultipartUploadResponse>,
# where S3 says <CompleteMultipartUploadResult>. boto3 does not mind; the AWS C++ SDK inside pyarrow, which Ray
# Train uses to upload checkpoints, rejects the reply and retries until it fails.
_MOTO_SERVER = """
import sys
from werkzeug.serving import run_simple
from moto.server import DomainDispatcherApplication, create_backend_app

moto_app = DomainDispatcherApplication(create_backend_app)

def app(environ, start_response):
    if environ["REQUEST_METHOD"] != "POST" or "uploadId=" not in environ.get("QUERY_STRING", ""):
        return moto_app(environ, start_response)
    reply = {}
    body = b"".join(moto_app(environ, lambda status, headers, exc_info=None: reply.update(s=status, h=headers)))
    body = body.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
    start_response(reply["s"], [(k, str(len(body)) if k.lower() == "content-length" else v) for k, v in reply["h"]])
    return [body]

run_simple("127.0.0.1", int(sys.argv[1]), app, threaded=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3(timeout_s: float = 30.0):
    """Start `moto_server` on a free local port, wait until it answers, yield its URL, stop it by PID."""
    with moto_s3_process(timeout_s) as (url, _):
        yield url


@contextmanager
def moto_s3_process(timeout_s: float = 30.0):
    """Like `moto_s3`, yielding (URL, the server's Popen) for tests that freeze or kill this server."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", _MOTO_SERVER, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer on {url} within {timeout_s} s") from None
                time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # a test may have left it frozen
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server():
    """URL of a moto S3 server shared by the session."""
    with moto_s3() as url:
        yield url


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 at the moto server through the environment (credentials + AWS_ENDPOINT_URL_S3)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**MOTO_CREDENTIALS, "AWS_ENDPOINT_URL_S3": s3_server}.items():
        monkeypatch.setenv(name, value)
    yield s3_server


def make_bucket(name: str) -> None:
    """Create a bucket on the endpoint the environment points at."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)


if __name__ == "__main__":  # manual use: python tests/s3_server.py
    with moto_s3() as endpoint:
        print(endpoint, flush=True)
        os.environ.update(MOTO_CREDENTIALS)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
