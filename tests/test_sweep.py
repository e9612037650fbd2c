"""Sweeps with Ray Tune: settings, held-out objective, the 2-core CLI run, resume without repeats, retried trials."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from magface.config import Config, ConfigError
from magface.sweep import load_sweep_config, results_table, trial_config
from magface.tuning import RAW_KEYS, to_loss_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from magface.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth") / "d", num_train_ids=8, images_per_id=8, num_eval_ids=6,
                    eval_images_per_id=6, image_size=24, bin_pairs=40, workers=1)


def tiny_yaml(path: Path, data, storage: Path, **tune) -> Path:
    d = {
        "data": {"train": [str(data.train_rec)], "num_classes": 8, "image_size": 24, "flip": False,
                 "shuffle": "none"},
        "model": {"backbone": "small", "embedding_size": 16, "backbone_kwargs": {"width": 4}},
        "loss": {"kind": "magface", "s": 16.0},
        "optim": {"lr": 0.05, "schedule": "step", "milestones": [100]},
        "train": {"name": "tiny", "storage_path": str(storage), "epochs": 2, "batch_size": 16, "max_failures": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"experiment": "sweep-test", "log_every": 2},
        "eval": {"data_root": str(data.root)},
        "tune": {"num_samples": 2, "grace_period": 2, **tune},
    }
    path.write_text(yaml.safe_dump(d))
    return path


def test_tune_section_is_split_from_the_training_config(tmp_path, tiny_data):
    path = tiny_yaml(tmp_path / "c.yaml", tiny_data, tmp_path / "runs", metric="val_spearman")
    cfg, s = load_sweep_config(path, ["tune.space.l_a=[2, 4]", "tune.num_samples=7", "optim.lr=0.2"])
    assert (s.metric, s.num_samples, s.space.l_a.low, s.space.l_a.high) == ("val_spearman", 7, 2.0, 4.0)
    assert cfg.optim.lr == 0.2
    with pytest.raises(ConfigError, match=r"c\.yaml.*tune.*metrc"):
        load_sweep_config(path, ["tune.metrc=val_accuracy"])
    with pytest.raises(ConfigError, match=r"c\.yaml.*loss.kind"):
        load_sweep_config(path, ["loss.kind=arcface"])
    # every trial config passes the loader's feasibility check and carries the mapped bounds
    raw = {"l_a": 3.0, "a_width": 50.0, "l_m": 0.4, "m_width": 0.3, "lambda_ratio": 1.0}
    tc = trial_config(cfg.to_dict(), raw, name="t1", storage=str(tmp_path))
    p = to_loss_params(raw, 16.0)
    assert (tc.loss.l_a, tc.loss.u_a, tc.loss.lambda_g) == (3.0, 53.0, pytest.approx(p["lambda_g"]))
    assert tc.loss.lambda_g * (1 / 3.0**2 - 1 / 53.0**2) == pytest.approx(16.0 * 0.3 / 50.0)


def test_heldout_metrics_match_an_independent_computation(tmp_path, tiny_data):
    """The objective from a saved checkpoint equals a direct numpy computation on the same .bin set."""
    import torch
    from scipy.stats import rankdata

    from magface.checkpoint import save_model_file
    from magface.data.binfile import load_bin
    from magface.data.codec import decode_jpeg
    from magface.models import get_backbone
    from magface.preprocess import PixelConvention
    from magface.sweep import heldout_metrics, load_heldout

    torch.manual_seed(0)
    net = get_backbone("small", embedding_size=16, input_size=24, width=4).eval()
    conv = PixelConvention.named("insightface")
    save_model_file(tmp_path, "small", {"embedding_size": 16, "input_size": 24, "width": 4}, net.state_dict(),
                    conv, {}, 1, 1)
    h = load_heldout(tiny_data.verify_bin, 24)
    m = heldout_metrics(str(tmp_path), h, far=0.1, l_a=10.0, u_a=110.0)

    images, issame = load_bin(tiny_data.verify_bin)
    x = torch.from_numpy(np.stack([decode_jpeg(b) for b in images]))
    with torch.no_grad():
        f = net(conv.apply(x)).numpy()
    mags = np.linalg.norm(f, axis=1)
    q = np.loadtxt(tiny_data.verify_quality, delimiter=",", skiprows=1, usecols=2)
    rho = np.corrcoef(rankdata(mags), rankdata(q))[0, 1]
    assert m["val_spearman"] == pytest.approx(rho, abs=1e-5)
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    cos = np.sum(u[0::2] * u[1::2], axis=1)
    neg = np.sort(cos[~issame])[::-1]
    # TAR at FAR 0.1: genuine pairs scoring above the impostor score ranked at 10% (nearest-point convention)
    assert 0.0 <= m["val_tar_at_far"] <= 1.0
    assert m["val_tar_at_far"] == pytest.approx(np.mean(cos[issame] >= neg[int(0.1 * len(neg)) - 1]), abs=0.15)
    assert 0.0 <= m["val_accuracy"] <= 1.0
    assert m["val_frac_at_l_a"] == pytest.approx(np.mean(mags <= 10.0 + 0.1), abs=1e-6)


def _cli(cfg_path, name, storage, mlflow_uri, *extra):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "RAY_AUTH_MODE": "disabled",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "tune.py"), "--config", str(cfg_path),
                           "--name", name, "--num-cpus", "2", *extra], env=env, capture_output=True, text=True,
                          timeout=900)


def _result_lines(exp: Path) -> dict:
    return {p.parent.name: len(p.read_text().splitlines()) for p in exp.glob("*/result.json")}


@pytest.mark.slow
def test_two_core_sweep_then_resume_without_repeating_trials(tmp_path, tiny_data, mlflow_uri):
    """A fresh local Ray with 2 CPUs (1 trainer worker + Ray Data): no deadlock; table, CSV, plot, best YAML
    loadable by the training config loader, MLflow parent with one child per trial. Re-running the same
    name restores the sweep and no finished trial runs again."""
    storage = tmp_path / "runs"
    cfg_path = tiny_yaml(tmp_path / "c.yaml", tiny_data, storage)
    first = _cli(cfg_path, "s", storage, mlflow_uri)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Trials sorted by val_accuracy" in first.stdout
    exp = storage / "s"
    import pandas as pd

    table = pd.read_csv(exp / "trials.csv")
    assert len(table) == 2 and set(table["status"]) == {"done"} and (table["epochs"] == 2).all()
    assert list(table["val_accuracy"]) == sorted(table["val_accuracy"], reverse=True)
    assert table["collapse_frac"].between(0, 1).all()
    assert (exp / "objective_vs_params.png").stat().st_size > 1000
    best = Config.load(exp / "best_config.yaml")  # what pipelines/train.py --config does
    top = table.iloc[0]
    expect = to_loss_params({k: top[k] for k in RAW_KEYS}, 16.0)
    assert best.loss.l_a == pytest.approx(expect["l_a"]) and best.loss.lambda_g == pytest.approx(expect["lambda_g"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp_id = client.get_experiment_by_name("sweep-test").experiment_id
    runs = client.search_runs([exp_id])
    parent = [r for r in runs if r.info.run_name == "sweep_s"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(children) == 2
    for c in children:
        assert "loss.l_a" in c.data.params and "val_accuracy" in c.data.metrics
        assert len(client.get_metric_history(c.info.run_id, "val_accuracy")) == 2  # one point per epoch
    arts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"trials.csv", "objective_vs_params.png", "best_config.yaml"} <= arts

    lines = _result_lines(exp)
    state = json.loads((exp / "sweep.json").read_text())
    second = _cli(cfg_path, "s", storage, mlflow_uri)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[sweep] resuming" in second.stdout
    assert _result_lines(exp) == lines  # no trial reported again
    assert json.loads((exp / "sweep.json").read_text())["parent_run_id"] == state["parent_run_id"]
    runs = client.search_runs([exp_id])
    assert sum(r.data.tags.get("mlflow.parentRunId") == state["parent_run_id"] for r in runs) == 2


@pytest.mark.slow
def test_a_failing_trial_is_retried_and_the_sweep_completes(ray_session, tmp_path, tiny_data, mlflow_uri):
    """The trainer's worker dies once mid-epoch with no Train-level retries: the trial errors, Tune retries it
    (tune.max_failures=1) and the sweep still returns a finished table."""
    from magface.sweep import run_sweep

    cfg_path = tiny_yaml(tmp_path / "c.yaml", tiny_data, tmp_path / "runs", num_samples=1, max_failures=1)
    cfg, settings = load_sweep_config(cfg_path, ["train.fault_kill_rank=0", "train.fault_kill_step=1",
                                                 "train.epochs=1"])
    res = run_sweep(cfg, settings, name="f", where=str(cfg_path))
    assert list(res.table["status"]) == ["done"]
    trial_dir = next((tmp_path / "runs" / "f" / "train").iterdir())
    assert (trial_dir / ".fault_injected").is_file()  # the fault did happen
    assert res.best_config_path is not None


def test_results_table_sorts_by_objective_with_errors_last():
    class R:
        def __init__(self, tid, acc, err=None, epochs=2):
            import pandas as pd

            self.config = {"l_a": 10.0, "a_width": 100.0, "l_m": 0.45, "m_width": 0.35, "lambda_ratio": 1.5}
            self.metrics = {"trial_id": tid}
            self.metrics_dataframe = None if acc is None else pd.DataFrame(
                {"epoch": list(range(1, epochs + 1)), "val_accuracy": [acc - 0.1] * (epochs - 1) + [acc]})
            self.error, self.path = err, None

    t = results_table([R("a", 0.6), R("b", None, err=RuntimeError()), R("c", 0.9, epochs=1)], "val_accuracy", 2, 64)
    assert list(t["trial_id"]) == ["c", "a", "b"]
    assert list(t["status"]) == ["stopped@1", "done", "ERROR"]
    assert t.loc[0, "lambda_g"] == pytest.approx(round(1.5 * 64 * 0.0035 / (1 / 100 - 1 / 110**2), 4))


def test_collapsed_trials_are_marked_and_never_recommended_silently():
    """issue 14 item 5: collapse is a constraint on best_config.yaml, and the table names the searched
    coordinates as Tune does (l_a, a_width, l_m, m_width, lambda_ratio) next to the loss values they give."""
    import pandas as pd

    from magface.sweep import choose_best, format_table
    from magface.tuning import RAW_KEYS

    class R:
        def __init__(self, tid, acc, at_l_a, at_u_a=0.0):
            self.config = {"l_a": 10.0, "a_width": 100.0, "l_m": 0.45, "m_width": 0.35, "lambda_ratio": 1.5}
            self.metrics = {"trial_id": tid}
            self.metrics_dataframe = pd.DataFrame({"epoch": [1, 2], "val_accuracy": [acc - 0.1, acc],
                                                   "collapse_frac": [0.9, max(at_l_a, at_u_a)]})
            self.error, self.path = None, None

    t = results_table([R("a", 0.9, 0.98), R("b", 0.8, 0.01), R("c", 0.7, 0.0, at_u_a=0.3)], "val_accuracy", 2, 64,
                      max_collapse_frac=0.05)
    assert list(t["trial_id"]) == ["a", "b", "c"]
    assert list(t["collapsed"]) == ["yes", "no", "yes"]
    assert list(t["collapse_frac"]) == [0.98, 0.01, 0.3]  # at the chosen (best) epoch, not epoch 1's 0.9
    best, note = choose_best(t, "val_accuracy", 0.05)
    assert best["trial_id"] == "b" and "trial a scored higher" in note
    text = format_table(t, "val_accuracy", 0.05)
    header = text.splitlines()[1].split()
    assert [h for h in header if h in (*RAW_KEYS, "u_a", "lambda_g")] == [*RAW_KEYS, "u_a", "lambda_g"]
    assert "collapsed" in header
    # every trial collapsed: the best by the objective, with a warning that says so
    t2 = results_table([R("a", 0.9, 0.98), R("c", 0.7, 0.6)], "val_accuracy", 2, 64, max_collapse_frac=0.05)
    best, note = choose_best(t2, "val_accuracy", 0.05)
    assert best["trial_id"] == "a" and note.startswith("WARNING")
    t3 = results_table([R("a", 0.9, 0.98), R("c", 0.7, 0.6)], "val_accuracy", 2, 64, max_collapse_frac=0.99)
    best, note = choose_best(t3, "val_accuracy", 0.99)
    assert best["trial_id"] == "a" and note is None


def test_sweep_ray_serves_the_state_api_that_frees_stopped_trials(tmp_path):
    """When ASHA stops a trial, only Ray Train's placement-group cleaner releases that trial's CPUs, and it
    asks the dashboard's state API whether the controller died. Without it (include_dashboard=False) the next
    trial waited ~14 minutes on 2 cores; the local Ray that pipelines/tune.py starts must serve it to its
    workers, also while another Ray instance runs on the machine (this test session's own)."""
    code = """
import ray
from magface.train.trainer import connect
connect(None, num_cpus=1)

@ray.remote(num_cpus=0)
class Probe:
    def ping(self):
        return 1

@ray.remote(num_cpus=0)
def alive(actor_id):  # what the cleaner asks, from a worker process as the cleaner does
    from ray.train.v2._internal.state.util import is_actor_alive
    return bool(is_actor_alive(actor_id=actor_id, timeout=30))

a = Probe.remote()
ray.get(a.ping.remote())
aid = a._actor_id.hex()
before = ray.get(alive.remote(aid))
ray.kill(a)
import time
time.sleep(2)
print("alive", before, ray.get(alive.remote(aid)))
"""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                         cwd=tmp_path)
    assert out.returncode == 0 and "alive True False" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
