"""Real services on 127.0.0.1: an S3 server (moto) and an MLflow tracking server (`mlflow server`, sqlite backend,
artifacts on that S3), each started and stopped by this module by process id with bounded waits.

- convert -> train -> evaluate with shards, checkpoints and MLflow artifacts on S3, then everything is looked
  up where it should have landed (objects in the bucket; the MLflow run, its metrics and artifacts through
  the server);
- preflight failures (missing bucket, no credentials, endpoint down) name the bucket and what is missing,
  before any training starts; an unreachable MLflow server is only a warning;
- the MLflow server is the one infra/mlflow/start_local.sh starts, so that script is exercised for real.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from magface.preflight import PreflightError, preflight
from tests.s3_server import MOTO_CREDENTIALS as KEYS
from tests.s3_server import moto_s3

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUCKET = "magface-it"
SERVER_START_S = 120  # mlflow server needs ~10 s on an idle 2-core VM, much more when the machine is busy


# ----------------------------------------------------------------------------- processes we own
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A server in its own session, so that stopping it by its pid also stops the workers it forks."""
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the process group led by our own child
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = SERVER_START_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def run(cmd: list[str], env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    return p


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"{' '.join(map(str, p.args))} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return p


# ----------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 server on 127.0.0.1 with the test bucket; yields its endpoint and the environment that points
    boto3 (and pyarrow, which Ray Train uses for checkpoints) at it."""
    with moto_s3(timeout_s=60) as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, **_boto_keys()).create_bucket(Bucket=BUCKET)
        yield {"endpoint": endpoint, "env": {**KEYS, "AWS_ENDPOINT_URL": endpoint}}


def _boto_keys() -> dict:
    return {"aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"],
            "region_name": KEYS["AWS_DEFAULT_REGION"]}


def s3_client(s3):
    import boto3

    return boto3.client("s3", endpoint_url=s3["endpoint"], **_boto_keys())


def keys_under(s3, prefix: str) -> dict[str, int]:
    out = {}
    for page in s3_client(s3).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory):
    """A real `mlflow server` (sqlite backend, artifacts proxied to s3://BUCKET/mlflow on the S3 server), started
    through infra/mlflow/start_local.sh, the development script users run, so the script is exercised too."""
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, **KEYS, "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = d / "server.log"
    proc = start(["bash", str(REPO / "infra/mlflow/start_local.sh"), "--artifacts", f"s3://{BUCKET}/mlflow",
                  "--port", str(port), "--dir", str(d / "store")], env, log)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc, log)
        assert (d / "store" / "mlflow.db").is_file(), "the server does not use the sqlite store in --dir"
        yield uri
    finally:
        stop(proc)
    deadline = time.monotonic() + 20
    while _listening(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _listening(port), "the MLflow server outlived start_local.sh"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process's boto3 pointed at the S3 server."""
    for k, v in s3["env"].items():
        monkeypatch.setenv(k, v)
    return s3


# ----------------------------------------------------------------------------- preflight failures
def test_preflight_names_a_missing_bucket_and_passes_an_existing_one(s3_env):
    cfg = {"data": {"train": [f"s3://{BUCKET}/shards/a.rec", "s3://no-such-magface-bucket/b.rec"]},
           "train": {"storage_path": f"s3://{BUCKET}/runs"}}
    with pytest.raises(PreflightError) as e:
        preflight(cfg)
    assert len(e.value.problems) == 1, e.value.problems  # the existing bucket is fine
    msg = e.value.problems[0]
    assert "'no-such-magface-bucket'" in msg and "does not exist" in msg and "data.train[1]" in msg
    assert preflight({"train": {"storage_path": f"s3://{BUCKET}/runs"}}) == []


def test_preflight_without_credentials_names_the_bucket(s3_env, monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role on this machine
    with pytest.raises(PreflightError) as e:
        preflight({"train": {"storage_path": f"s3://{BUCKET}/runs"}})
    (msg,) = e.value.problems
    assert f"'{BUCKET}'" in msg and "no AWS credentials" in msg and "train.storage_path" in msg


def test_preflight_with_the_endpoint_down_fails_fast(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(PreflightError) as e:
        preflight({"data": {"train": [f"s3://{BUCKET}/a.rec"]}})
    assert time.monotonic() - t0 < 30
    (msg,) = e.value.problems
    assert f"'{BUCKET}'" in msg and "unreachable" in msg


def test_preflight_cli_exits_nonzero_naming_file_and_bucket(s3):
    p = run([sys.executable, "-m", "magface.preflight", "--config", "configs/ms1mv2_r100_magface.yaml",
             "--set", "data.train=[s3://no-such-magface-bucket/train.rec]",
             "--set", f"train.storage_path=s3://{BUCKET}/runs", "--set", f"eval.data_root=s3://{BUCKET}/eval"],
            {**os.environ, **s3["env"]}, 60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "configs/ms1mv2_r100_magface.yaml" in p.stderr and "no-such-magface-bucket" in p.stderr
    assert "does not exist" in p.stderr


@pytest.mark.skipif("preflight" not in (REPO / "pipelines/train.py").read_text(),
                    reason="pipelines/train.py does not call magface.preflight.preflight(cfg) before training yet")
def test_train_job_with_a_missing_checkpoint_bucket_stops_before_training(s3):
    """Without the check the job would read and train a whole epoch, then fail at its first checkpoint."""
    env = {**os.environ, **s3["env"], "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled"}
    p = run([sys.executable, "pipelines/train.py", "--config", "configs/demo.yaml",
             "--set", f"data.train=[s3://{BUCKET}/data/shards]", "--set", "train.storage_path=s3://no-such-ckpt-bucket/runs",
             "--set", "tracking.enabled=false"], env, 120)
    assert p.returncode != 0
    assert "no-such-ckpt-bucket" in p.stderr and "does not exist" in p.stderr, p.stderr[-3000:]
    assert "train.storage_path" in p.stderr
    assert "[magface] job" not in p.stdout, "training started before the storage was checked"


def test_unreachable_mlflow_is_only_a_warning(s3_env):
    warnings = preflight({"train": {"storage_path": f"s3://{BUCKET}/runs"}},
                         mlflow_uri=f"http://127.0.0.1:{free_port()}", timeout_s=2)
    assert len(warnings) == 1 and "not reachable" in warnings[0]


# ----------------------------------------------------------------------------- convert -> train -> evaluate
def test_convert_train_evaluate_with_s3_and_mlflow_server(s3, mlflow_server, tmp_path):
    # RAY_ADDRESS=local: every job starts its own Ray instead of joining a cluster someone else started here
    env = {**os.environ, **s3["env"], "MLFLOW_TRACKING_URI": mlflow_server, "RAY_AUTH_MODE": "disabled",
           "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO), "MAGFACE_CACHE": str(tmp_path / "cache")}
    from magface.data.synthetic import generate

    data = generate(tmp_path / "synth", num_train_ids=12, images_per_id=8, num_eval_ids=8, eval_images_per_id=12,
                    image_size=56, bin_pairs=40, workers=1)

    # convert: split the MS1MV2-layout .rec into shards and upload them
    shards = f"s3://{BUCKET}/data/shards"
    timings = {}
    t0 = time.monotonic()
    ok(run([sys.executable, "pipelines/convert.py", "split", str(data.train_rec), str(tmp_path / "shards"),
            "--shards", "2", "--upload", shards, "--address", "local"], env, 180))
    timings["convert"] = time.monotonic() - t0
    landed = keys_under(s3, "data/shards/")
    recs = sorted(k for k in landed if k.endswith(".rec"))
    assert len(recs) == 2 and all(k[:-4] + ".idx" in landed for k in recs), landed
    assert sum(landed[k] for k in recs) > data.train_rec.stat().st_size * 0.9
    # the evaluation set goes up as a user would copy it (aws s3 cp)
    s3_client(s3).upload_file(str(data.verify_bin), BUCKET, "data/eval/synth.bin")

    # train: tiny config, checkpoints to S3, tracking on the server
    sets = [f"data.train=[{shards}]", f"data.num_classes={data.num_classes}",
            "data.image_size=56", f"train.storage_path=s3://{BUCKET}/runs", "train.name=it_s3", "train.epochs=1",
            "train.batch_size=16", "train.max_steps_per_epoch=3", "scaling.num_workers=1",
            "scaling.cpus_per_worker=1", "eval.at_end=false", "tracking.log_every=1"]
    t0 = time.monotonic()
    p = ok(run([sys.executable, "pipelines/train.py", "--config", "configs/demo.yaml", "--no-eval",
                *[a for s in sets for a in ("--set", s)]], env, 240))
    timings["train"] = time.monotonic() - t0
    landed_ckpt = keys_under(s3, "runs/it_s3/")
    ckpts = {k for k in landed_ckpt if k.endswith("/model.pt")}
    assert ckpts, f"no model.pt under s3://{BUCKET}/runs/it_s3/:\n{p.stdout[-2000:]}"
    ckpt_dir = f"s3://{BUCKET}/{sorted(ckpts)[-1].rsplit('/', 1)[0]}"
    assert any(k.startswith(sorted(ckpts)[-1].rsplit("/", 1)[0] + "/train_state.pt") for k in landed_ckpt), \
        "train state missing next to model.pt"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    (train_run,) = client.search_runs([client.get_experiment_by_name("magface").experiment_id],
                                      filter_string="tags.job_name = 'it_s3'")
    assert train_run.info.status == "FINISHED"
    assert {"loss"} <= set(train_run.data.metrics), train_run.data.metrics
    assert train_run.data.params["train.storage_path"] == f"s3://{BUCKET}/runs"
    tag = train_run.data.tags.get("checkpoint_path")
    assert tag and ckpt_dir.endswith(tag), (tag, ckpt_dir)  # the run says where its checkpoint is

    # evaluate the checkpoint's model.pt (copied from S3 as a user would with `aws s3 cp`: evaluate.py reads a
    # checkpoint directory) on the .bin set on S3, as a child run of the training run
    local_ckpt = tmp_path / "ckpt"
    local_ckpt.mkdir()
    model_key = sorted(ckpts)[-1]
    s3_client(s3).download_file(BUCKET, model_key, str(local_ckpt / "model.pt"))
    assert (local_ckpt / "model.pt").stat().st_size == landed_ckpt[model_key]
    out = tmp_path / "eval_out"
    t0 = time.monotonic()
    ok(run([sys.executable, "pipelines/evaluate.py", "--checkpoint", str(local_ckpt), "--benchmarks", "synth_verify",
            "--data-root", f"s3://{BUCKET}/data/eval", "--run-id", train_run.info.run_id, "--out", str(out)],
           env, 240))
    timings["evaluate"] = time.monotonic() - t0
    children = client.search_runs([train_run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{train_run.info.run_id}'")
    assert children, "evaluation did not log a child run"
    child = children[0]
    assert any(k.startswith("synth_verify") for k in child.data.metrics), child.data.metrics

    # artifacts: listed and downloadable through the server, stored as objects in the bucket
    artifacts = [f.path for f in client.list_artifacts(child.info.run_id)]
    assert artifacts, "no MLflow artifacts on the evaluation run"
    stored = keys_under(s3, "mlflow/")
    assert any(child.info.run_id in k for k in stored), "MLflow artifacts did not land in the S3 bucket"
    first_file = next(k for k in stored if child.info.run_id in k)
    rel = first_file.split(f"{child.info.run_id}/artifacts/", 1)[1]
    local = client.download_artifacts(child.info.run_id, rel, str(tmp_path / "dl"))
    assert Path(local).read_bytes() == s3_client(s3).get_object(Bucket=BUCKET, Key=first_file)["Body"].read()
    results = list(out.glob("*.json"))
    assert results and json.loads(results[0].read_text())
    print("pipeline step seconds:", {k: round(v, 1) for k, v in timings.items()})
