"""Where a pipeline's Ray comes from and whether the job fits it (magface.cluster), checked before work starts:
the resource plan against node sets, and the pipelines as a user runs them (subprocesses, real Ray): a GPU
request on a CPU-only Ray, a dead cluster address, a template config, a config typo, a missing shard."""

import os
import subprocess
import sys
import time

import pytest
import yaml

from magface.cluster import ClusterError, plan_resources
from magface.config import Config
from tests.conftest import REPO
from tests.test_job_submit import _free_ports, stop_session
from tests.test_train import write_rec


def _cfg(**scaling):
    return Config.from_dict({"data": {"num_classes": 8}, "scaling": scaling}, "test")


# ------------------------------------------------------------------------------------------- resource plan
def test_trainers_that_would_take_every_cpu_are_lowered_and_say_which_setting():
    """The `ray job submit` hang: a 2-CPU head, one worker asking 2 CPUs, Ray Data left with none."""
    cfg = _cfg(num_workers=1, cpus_per_worker=2)
    plan = plan_resources(cfg, nodes=[{"CPU": 2.0}], node_types=[])
    assert cfg.scaling.cpus_per_worker == 1 and plan.overrides == ["scaling.cpus_per_worker=1"]
    assert "scaling.cpus_per_worker lowered from 2 to 1" in plan.messages[0] and "Ray Data" in plan.messages[0]

    cfg = _cfg(num_workers=2, cpus_per_worker=1)  # 2 x 1 of 2 CPUs: half a CPU each leaves one
    assert plan_resources(cfg, nodes=[{"CPU": 2.0}]).overrides == ["scaling.cpus_per_worker=0.5"]

    cfg = _cfg(num_workers=1, cpus_per_worker=2)  # room enough: nothing changes
    assert plan_resources(cfg, nodes=[{"CPU": 2.0}, {"CPU": 4.0}]).overrides == []
    assert cfg.scaling.cpus_per_worker == 2

    cfg = _cfg(num_workers=1, cpus_per_worker=2)  # an autoscaler that adds CPU nodes: Ray Data gets one later
    assert plan_resources(cfg, nodes=[{"CPU": 2.0}], node_types=[{"CPU": 8.0}]).overrides == []


def test_a_cluster_too_small_for_any_split_is_refused_naming_the_setting():
    with pytest.raises(ClusterError, match=r"leave Ray Data no CPU.*scaling\.num_workers"):
        plan_resources(_cfg(num_workers=4, cpus_per_worker=1), nodes=[{"CPU": 1.0}])


def test_a_request_no_node_type_can_hold_fails_naming_the_resource():
    with pytest.raises(ClusterError, match=r"GPU \(asks 1, largest node has 0; scaling\.use_gpu"):
        plan_resources(_cfg(use_gpu=True, cpus_per_worker=8), nodes=[{"CPU": 16.0}], node_types=[])
    with pytest.raises(ClusterError, match=r"CPU \(asks 8, largest node has 4"):
        plan_resources(_cfg(cpus_per_worker=8), nodes=[{"CPU": 4.0}, {"CPU": 4.0}])
    # an autoscaler node type with GPUs can satisfy it later: no error
    plan_resources(_cfg(use_gpu=True, cpus_per_worker=8), nodes=[{"CPU": 16.0}],
                   node_types=[{"CPU": 16.0, "GPU": 8.0}])


# --------------------------------------------------------------------------------- pipelines, as a user runs them
def _pipeline(args, timeout=120, **env):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled", **env})
    return p, time.monotonic() - t0


@pytest.fixture
def tiny_config(tmp_path):
    rec = write_rec(tmp_path / "data", 24)
    cfg = {"data": {"train": [str(rec)], "num_classes": 8, "image_size": 16, "flip": False},
           "model": {"backbone": "small", "embedding_size": 16, "backbone_kwargs": {"width": 4}},
           "loss": {"s": 16.0},
           "train": {"name": "tiny", "storage_path": str(tmp_path / "runs"), "epochs": 1, "batch_size": 4},
           "scaling": {"num_workers": 1}, "eval": {"at_end": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_mistakes_fail_before_ray_starts_without_a_traceback(tiny_config, tmp_path):
    env = {"RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    cases = [
        (["--config", "configs/ms1mv2_r100_magface.yaml"],
         ["this config is a template", "data.train[0]", "train.storage_path", "eval.data_root"]),
        (["--config", str(tiny_config), "--set", "train.epochz=2"], ["epochz"]),
        (["--config", str(tiny_config), "--set", f"data.train=[{tmp_path / 'nope' / 'train.rec'}]"],
         ["data.train[0]", "nope/train.rec does not exist"]),
    ]
    for args, expected in cases:
        p, took = _pipeline(["pipelines/train.py", *args], **env)
        out = p.stdout + p.stderr
        assert p.returncode == 2, out
        for text in expected:
            assert text in out, (text, out)
        assert "Traceback" not in out and "Started a local Ray" not in out, out
        assert took < 30, took


@pytest.mark.slow
def test_gpu_job_on_a_cpu_only_ray_fails_in_seconds_naming_the_gpu(tiny_config, tmp_path):
    p, took = _pipeline(["pipelines/train.py", "--config", str(tiny_config), "--set", "scaling.use_gpu=true"],
                        RAY_ADDRESS="", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}")
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "no node of this cluster can hold one training worker" in out and "GPU (asks 1" in out, out
    assert "Traceback" not in out and "[magface] job" not in out, out  # nothing was started
    assert took < 60, took


@pytest.mark.slow
def test_a_dead_cluster_address_fails_in_seconds_with_a_message(tmp_path):
    """A real `ray start --head`, killed by its process id; then every pipeline given its address (RAY_ADDRESS
    or --address) must say so within seconds instead of retrying the dead GCS forever."""
    import tempfile

    gcs, dash = _free_ports(2)
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rdead")
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""})
    try:
        deadline = time.monotonic() + 120
        import socket

        while True:  # the GCS accepts connections: the cluster is up
            try:
                socket.create_connection(("127.0.0.1", gcs), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and head.poll() is None, (tmp_path / "head.log").read_text()
                time.sleep(1)
    finally:
        stop_session(head)  # the whole `ray start` session, by its process group id
        log.close()
    address = f"127.0.0.1:{gcs}"
    import numpy as np

    from magface.data.codec import encode_jpeg

    (tmp_path / "imgs" / "id0").mkdir(parents=True)
    (tmp_path / "imgs" / "id0" / "a.jpg").write_bytes(encode_jpeg(np.zeros((112, 112, 3), np.uint8)))
    runs = [
        (["pipelines/convert.py", "folder", str(tmp_path / "imgs"), str(tmp_path / "out"), "--shards", "1"],
         {"RAY_ADDRESS": address}),
        (["pipelines/train.py", "--address", address, "--no-baseline"], {"RAY_ADDRESS": ""}),
    ]
    for args, env in runs:
        p, took = _pipeline(args, timeout=90, **env)
        out = p.stdout + p.stderr
        assert p.returncode != 0, out
        assert f"no Ray cluster answers at {address}" in out and "ray start --head" in out, out
        assert "Traceback" not in out, out
        assert took < 30, (args[0], took)


def test_a_minimal_ray_without_mlflow_still_trains_and_says_so(tmp_path):
    """A GPU node's image often has plain `pip install ray` (no dashboard packages) and no MLflow: the training
    benchmark (the real TorchTrainer job, tracking off) must run there. Both are made unimportable for the
    subprocess and its Ray workers by shadowing packages on PYTHONPATH."""
    shim = tmp_path / "shim"
    for name in ("mlflow", "aiohttp_cors"):
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(  # what Python raises for a package that is not installed
            f"raise ModuleNotFoundError(\"No module named '{name}' (hidden by the test)\", name='{name}')\n")
    out_json = tmp_path / "train_step.json"
    p, _ = _pipeline(["benchmarks/train_step.py", "--workers", "1", "--steps", "2", "--out", str(out_json)],
                     timeout=300, RAY_ADDRESS="", PYTHONPATH=f"{shim}{os.pathsep}{REPO}")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "starting Ray without its dashboard (" in out and "'aiohttp_cors' (hidden by the test)" in out, out[-4000:]
    import json

    record = json.loads(out_json.read_text())
    assert record["samples_per_s"]["1"] > 0 and record["bare_samples_per_s"] > 0, record
    assert "the job's 1-worker rate is" in out
