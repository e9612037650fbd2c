"""The embedded demo, end to end, as a user runs it: `python pipelines/train.py` (no config).

It must finish in under 10 minutes on 2 CPU cores and show a positive correlation between feature magnitude
and the known image quality q, logged to MLflow's default local store (here: the test's working directory)."""

import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_demo_runs_and_magnitude_tracks_quality(tmp_path):
    import mlflow

    env = {**os.environ, "MAGFACE_CACHE": os.environ.get("MAGFACE_TEST_CACHE", str(tmp_path / "cache")),
           "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    # The ArcFace baseline column is left out here to keep the suite's time budget; the demo itself runs it.
    cmd = [sys.executable, str(REPO / "pipelines" / "train.py"), "--no-baseline"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert elapsed < 600

    table = text[text.index("MagFace demo: synthetic faces"):]
    header = table.splitlines()[1].split()
    assert header[:2] == ["metric", "MagFace"]

    def row(label):
        line = next(ln for ln in table.splitlines() if ln.strip().startswith(label))
        return [None if v == "-" else float(v) for v in line[len("  ") + 44:].split()]

    accuracy = row("synth_verify accuracy")[0]
    spearman = row("Spearman(|f|, q), verification images")[0]
    assert accuracy > 0.7, table  # held-out identities, so this is recognition, not memorisation
    assert spearman > 0.1, table
    assert 0.0 <= row("synth_ijb TAR@FAR=1e-2")[0] <= 1.0
    # issue 11's healthy regime on the harder sets: not saturated, not hopeless, magnitudes off the bounds
    assert 0.5 < row("synth_ijb TAR@FAR=1e-4")[0] < 0.95, table
    assert row("train |f| at l_a")[0] <= 0.05 and row("train |f| at u_a")[0] <= 0.05, table

    # MLflow's default local store in the working directory holds the demo's runs.
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("magface").experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"demo_magface"} <= names and any(n.startswith("demo_2") for n in names)
    train = next(r for r in runs if r.info.run_name == "demo_magface")
    assert re.search(r"checkpoint_epoch\d+_step\d+$", train.data.tags["checkpoint_path"])
    assert client.list_artifacts(train.info.run_id, "magnitude")
