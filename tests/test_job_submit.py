"""`ray job submit --working-dir .` for real: a private Ray head on 127.0.0.1, pipelines/train.py with a small
config, SUCCEEDED, a readable checkpoint and an MLflow run. The head is stopped through its own process group."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import yaml

from tests.conftest import REPO
from tests.test_train import write_rec


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_http(url, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout_s}s")


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` in its own session; every port chosen free so it cannot collide with other
    clusters on the machine; killed by process group at the end (never `ray stop`)."""
    gcs, dash, agent_http, agent_grpc, metrics, client, node_mgr, obj_mgr, runtime_env_agent = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rjs")  # short: Ray's unix socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)  # jobs choose their store (runtime env, else the job's default)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
           f"--runtime-env-agent-port={runtime_env_agent}", f"--temp-dir={temp_dir}"]
    log = open(tmp_path / "ray_head.log", "w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(f"{address}/api/version", 180)
        yield address
    finally:
        stop_session(head)
        log.close()


def stop_session(head: subprocess.Popen) -> None:
    """End a `ray start --block` started with start_new_session=True: its process group, by id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(2)  # let the raylet/GCS children in the group exit too
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_ray_job_submit_trains_and_tracks(ray_head, tmp_path):
    import mlflow

    from magface.checkpoint import load_model_file

    rec = write_rec(tmp_path / "data", 24)
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {
        "data": {"train": [str(rec)], "num_classes": 8, "image_size": 16, "flip": False},
        "model": {"backbone": "small", "embedding_size": 16, "backbone_kwargs": {"width": 4}},
        "loss": {"s": 16.0},
        "train": {"name": "submitted", "storage_path": str(tmp_path / "runs"), "epochs": 2, "batch_size": 4},
        "scaling": {"num_workers": 1},
        "tracking": {"log_every": 1},
        "eval": {"at_end": False},
    }
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_uri, "RAY_AUTH_MODE": "disabled"}}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray_head,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
           "--", "python", "pipelines/train.py", "--config", str(cfg_path), "--set", "optim.lr=0.05"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=REPO,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()

    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(ray_head).list_jobs()
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED]

    ckpt = tmp_path / "runs" / "submitted" / "checkpoint_epoch002_step00000012"
    model = load_model_file(ckpt)
    assert model["step"] == 12 and model["config"]["optim"]["lr"] == 0.05  # --set reached the workers
    assert (ckpt / "train_state.pt").is_file()

    client = mlflow.tracking.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("magface").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["checkpoint_path"] == str(ckpt)
    assert runs[0].data.params["optim.lr"] == "0.05"
    assert max(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")) == 12


@pytest.mark.slow
def test_ray_job_submit_runs_the_demo_on_a_two_cpu_head_and_says_where_mlflow_is(ray_head, tmp_path):
    """The demo as submitted by a new user: no config, no tracking URI. On a 2-CPU head its trainer (2 CPUs per
    worker) would leave Ray Data no CPU and hang; the resource check lowers it with a message, and MLflow logs
    to the store the job names (not the job's temporary working directory)."""
    import re

    from mlflow.tracking import MlflowClient

    cache = os.environ.get("MAGFACE_TEST_CACHE") or str(tmp_path / "cache")
    runtime_env = {"env_vars": {"RAY_AUTH_MODE": "disabled", "MAGFACE_CACHE": cache}}
    small = ["--set", "train.epochs=1", "--set", "data.num_classes=20", "--set", "data.image_size=32",
             "--set", "data.synthetic={bin_pairs: 200, num_eval_ids: 20}"]
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray_head,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
           "--", "python", "pipelines/train.py", "--no-baseline", *small]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                         env={**env, "RAY_AUTH_MODE": "disabled"})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "scaling.cpus_per_worker lowered from 2 to 1" in text, text[-4000:]
    said = re.search(r"MLflow logs to (\S+) on this node", text)
    assert said and said.group(1) == f"sqlite:///{cache}/mlflow.db", text[-4000:]
    client = MlflowClient(said.group(1))
    runs = client.search_runs([client.get_experiment_by_name("magface").experiment_id])
    train = [r for r in runs if r.info.run_name == "demo_magface"]
    assert train and all(r.info.status == "FINISHED" for r in train), [(r.info.run_name, r.info.status) for r in runs]
    assert f"run {train[-1].info.run_id}" in text  # the closing block names it
    assert f"mlflow ui --backend-store-uri {said.group(1)}" in text
