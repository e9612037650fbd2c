"""Fault tolerance: a worker killed mid-run, resume from the latest checkpoint, rerun of the same job name;
and what the MLflow run records (the unreachable-server case is in test_train.py's split test)."""

import pytest
import torch

from magface.checkpoint import load_model_file
from magface.train.state import load_train_state
from tests.test_train import random_rows, tiny_config


def _checkpoints(root):
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))


@pytest.mark.slow
def test_killed_worker_resumes_with_step_count_intact(ray_session, tmp_path, mlflow_uri):
    import mlflow
    import ray

    from magface.train.trainer import run

    # 2 workers x batch 2 over 16 rows: 4 steps per epoch, 3 epochs; rank 1 dies hard at step 6 (epoch 2).
    cfg = tiny_config(tmp_path, "faulty", train={"epochs": 3, "batch_size": 2, "max_failures": 1,
                                                 "fault_kill_rank": 1, "fault_kill_step": 6, "num_to_keep": 5},
                      scaling={"num_workers": 2}, tracking={"enabled": True, "log_every": 2})
    ds = ray.data.from_items(random_rows(16))
    result = run(cfg, ds)
    assert result.error is None
    job_dir = tmp_path / "runs" / "faulty"
    assert (job_dir / ".fault_injected").read_text().startswith("rank 1 killed at step 6")
    # The restarted attempt began from the epoch-1 checkpoint (step 4) and still ended at 3 x 4 = 12.
    assert result.metrics["resumed_from_step"] == 4
    assert result.metrics["step"] == 12 and result.metrics["epoch"] == 3

    # Every checkpoint is complete and readable, its files agree on the step, no temporary is left behind.
    ckpts = _checkpoints(job_dir)
    assert [p.name for p in ckpts] == [f"checkpoint_epoch{e:03d}_step{4 * e:08d}" for e in (1, 2, 3)]
    for p in ckpts:
        assert sorted(f.name for f in p.iterdir() if f.name != "last_samples.npz") == [
            "classifier_rows_000000000_000000004.pt", "classifier_rows_000000004_000000008.pt",
            "complete_rank0.json", "complete_rank1.json", "model.pt", "train_state.pt"]
        model = load_model_file(p)
        states = [load_train_state(p, rank=r, world_size=2) for r in range(2)]
        assert model["step"] == states[0]["step"] == states[1]["step"] == int(p.name[-8:])
        assert states[0]["scheduler"]["last_epoch"] == model["step"]
        assert model["preprocessing"] == cfg.data.convention.to_dict() and model["config"]["train"]["name"] == "faulty"
        assert not torch.equal(states[0]["classifier"]["weight"], states[1]["classifier"]["weight"])

    # MLflow: whole config as params, per-step metrics incl. magnitude stats, histograms, final checkpoint tag.
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    r = client.get_run(result.run_id)
    assert r.data.params["loss.lambda_g"] == "35.0" and r.data.params["train.fault_kill_step"] == "6"
    for key in ("loss", "accuracy", "lr", "samples_per_s", "mag_mean", "mag_min", "mag_max", "mag_p5", "mag_p50",
                "mag_p95", "mag_frac_at_l_a", "mag_frac_at_u_a", "magnitude_collapse"):
        assert key in r.data.metrics, key
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    assert max(steps) == 12 and 2 in steps
    assert r.data.tags["checkpoint_path"] == str(ckpts[-1]) and "git_commit" in r.data.tags
    assert r.data.tags["ray_version"] == ray.__version__ and r.data.tags["torch_version"] == torch.__version__
    figures = [a.path for a in client.list_artifacts(result.run_id, "magnitude")]
    assert "magnitude/epoch_003.png" in figures
    assert sorted({m.value for m in client.get_metric_history(result.run_id, "epoch")}) == [1, 2, 3]  # as printed
    assert r.data.tags["final.step"] == "12" and "final_step" not in r.data.metrics  # one value: a tag
    assert "magface" in r.data.tags["mlflow.note.content"]  # the run page's description
    (logged,) = client.search_logged_models(experiment_ids=[r.info.experiment_id])
    assert logged.source_run_id == result.run_id  # the backbone as an MLflow model (tests/test_mlflow_model.py)

    # Rerunning the same job name resumes it: one more epoch from step 12.
    more = tiny_config(tmp_path, "faulty", train={"epochs": 4, "batch_size": 2, "max_failures": 1,
                                                  "fault_kill_rank": 1, "fault_kill_step": 6},
                       scaling={"num_workers": 2})
    again = run(more, ds)
    assert again.error is None and again.metrics["resumed_from_step"] == 12 and again.metrics["step"] == 16


def test_fault_injection_fires_once_per_marker(tmp_path):
    """The configured rank exits hard at the configured step; once the marker exists it never fires again,
    and other ranks/steps are untouched."""
    import subprocess
    import sys

    from magface.train.faults import marker_path

    marker = marker_path(str(tmp_path), "job")
    assert marker == tmp_path / "job" / ".fault_injected" and marker_path("s3://b/runs", "job") is None
    code = ("import sys; from pathlib import Path; from magface.train.faults import maybe_kill\n"
            "for rank, step in [(0, 5), (1, 4), (1, 5)]:\n"
            "    maybe_kill(rank=rank, step=step, kill_rank=1, kill_step=5, marker=Path(sys.argv[1]))\n"
            "print('survived')")
    from tests.conftest import REPO

    first = subprocess.run([sys.executable, "-c", code, str(marker)], capture_output=True, text=True, cwd=REPO)
    assert first.returncode == 17 and "survived" not in first.stdout
    assert marker.read_text() == "rank 1 killed at step 5\n"
    second = subprocess.run([sys.executable, "-c", code, str(marker)], capture_output=True, text=True, cwd=REPO)
    assert second.returncode == 0 and "survived" in second.stdout


def test_magnitude_stats_and_collapse_warning():
    import numpy as np

    from magface.train.loop import collapse_warning, magnitude_stats

    mags = np.array([10.0, 10.0, 10.0, 50.0, 110.0])
    s = magnitude_stats(mags, 10.0, 110.0)
    assert s["mag_frac_at_l_a"] == 0.6 and s["mag_frac_at_u_a"] == 0.2
    assert (s["mag_min"], s["mag_max"], s["mag_p50"]) == (10.0, 110.0, 10.0)
    assert s["mag_mean"] == 38.0 and s["mag_p95"] == np.percentile(mags, 95)
    assert "60% of samples sit at l_a" in collapse_warning(s)
    assert collapse_warning(magnitude_stats(np.linspace(20, 90, 50), 10.0, 110.0)) is None
