"""Shared fixtures. Ray runs once per test session, with explicit CPUs so trainers cannot starve Ray Data."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Tests start their own Ray (and their own clusters, by address): never join one a CI machine happens to run.
os.environ.pop("RAY_ADDRESS", None)
# Keep Ray quiet and small on a 2-core CI machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "testdata" / "mxnet_recordio"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.exists():
        pytest.fail(f"MXNet golden files not found at {GOLDEN} (expected ../shared/testdata beside the repo)")
    return GOLDEN


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance for the whole session. 4 logical CPUs on 2 real cores: trainers take at most
    2, so Ray Data's read/decode tasks always have a CPU left and nothing deadlocks."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(
        address="local",  # a private instance: never join another test run's `ray start` head on this machine
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=512 * 1024 * 1024,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh file-backed sqlite MLflow store per test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):  # put back afterwards: a stale process-wide URI would outlive this store
        yield uri


# S3 on 127.0.0.1 (a real moto server subprocess): `s3_server` (session) and `s3_env` (AWS_* set per test).
from tests.s3_server import s3_env, s3_server  # noqa: E402,F401
