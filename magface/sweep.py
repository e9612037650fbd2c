"""Hyperparameter sweeps of MagFace's five numbers (l_a, u_a, l_m, u_m, lambda_g) with Ray Tune.

The Train V2 pattern: every Tune trial is a function trainable (`run_trial`, ~0 CPUs of its own) that builds
the job's TorchTrainer with `magface.train.trainer.build_trainer` (the very `train_loop_per_worker` of
`pipelines/train.py`) and fits it; the trainer's workers hold the CPUs/GPUs. `HeldOutReportCallback`, a
`TuneReportCallback`, runs on the Train controller after every epoch's report: it embeds a held-out
verification set with known quality from the checkpoint just written and forwards rank 0's metrics plus
`val_accuracy`, `val_tar_at_far`, `val_spearman` and `collapse_frac` to Tune, where ASHA compares trials.

Layout under `<storage>/<name>/`: Tune's experiment state and trial folders, `sweep.json` (the base config,
the settings, the MLflow parent run; what a re-run of the same name resumes with) and `train/<trial_id>/`
(each trial's Train run: checkpoints, so a retried trial resumes from its last epoch). Results:
`trials.csv`, `objective_vs_params.png`, `best_config.yaml` (loadable by `pipelines/train.py --config`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from magface.config import Config, ConfigError, apply_override
from magface.tuning import RAW_KEYS, SearchSpace, to_loss_params

log = logging.getLogger(__name__)

TUNE_SECTION = "tune"
OBJECTIVES = ("val_accuracy", "val_tar_at_far", "val_spearman")
DERIVED_KEYS = ("u_a", "u_m", "lambda_g")  # loss values computed from the searched coordinates (RAW_KEYS)
STATE_FILE = "sweep.json"
# The trial function only drives its TorchTrainer: no CPU (a fractional one would leave Ray Data's 1-CPU read
# tasks unschedulable on a 2-core node). Tune refuses an empty request, so it asks for a little logical memory.
TRIAL_RESOURCES = {"CPU": 0, "memory": 64 * 1024**2}


# ------------------------------------------------------------------------------------------ settings
@dataclass
class SweepSettings:
    """The `tune:` section of a sweep YAML (absent from the training config; popped before it is loaded)."""

    num_samples: int = 4
    metric: str = "val_accuracy"  # one of OBJECTIVES; always maximised
    search: str = "random"  # "random" or "optuna"
    seed: int = 0
    max_concurrent_trials: int | None = None  # None: what the cluster's CPUs/GPUs allow, one CPU kept for data
    grace_period: int = 1  # ASHA: epochs every trial gets before it may be stopped
    reduction_factor: int = 2
    max_failures: int = 1  # Tune-level retries of a failed trial (Train retries workers per train.max_failures)
    far: float = 1e-2  # the FAR of val_tar_at_far
    # A trial whose training magnitudes sit at l_a or u_a in more than this fraction (collapse_frac) is marked
    # collapsed and is not recommended as best_config.yaml while any trial is not (MagFace#42: x_norm at l_a).
    max_collapse_frac: float = 0.05
    heldout: str | None = None  # .bin with <name>_quality.csv beside it; None: <eval.data_root>'s synth.bin
    space: SearchSpace = field(default_factory=SearchSpace)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "<tune>") -> "SweepSettings":
        d = dict(d or {})
        names = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} in section 'tune'; valid keys: {sorted(names)}")
        try:
            space = SearchSpace.from_dict(d.pop("space", None))
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        s = cls(space=space, **d)
        s.validate(where)
        return s

    def validate(self, where: str) -> None:
        if self.metric not in OBJECTIVES:
            raise ConfigError(f"{where}: tune.metric {self.metric!r} unknown; choose one of {list(OBJECTIVES)}")
        if self.search not in ("random", "optuna"):
            raise ConfigError(f"{where}: tune.search must be 'random' or 'optuna', got {self.search!r}")
        for key in ("num_samples", "grace_period", "reduction_factor"):
            if not int(getattr(self, key)) >= 1:
                raise ConfigError(f"{where}: tune.{key} must be >= 1, got {getattr(self, key)!r}")
        if self.reduction_factor < 2:
            raise ConfigError(f"{where}: tune.reduction_factor must be >= 2, got {self.reduction_factor}")
        if not 0.0 < self.far < 1.0:
            raise ConfigError(f"{where}: tune.far must be in (0, 1), got {self.far}")
        if not 0.0 <= self.max_collapse_frac <= 1.0:
            raise ConfigError(f"{where}: tune.max_collapse_frac must be in [0, 1], got {self.max_collapse_frac}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["space"] = self.space.to_dict()
        return d


def load_sweep_config(path: str | os.PathLike, overrides=()) -> tuple[Config, SweepSettings]:
    """A training YAML with an optional `tune:` section. `--set tune.key=value` (and `tune.space.l_a=[5, 20]`)
    go to the sweep settings; every other override to the training config, through magface.config."""
    where = str(path)
    d = Config.read_yaml(path)
    tune_d = d.pop(TUNE_SECTION, None) or {}
    if not isinstance(tune_d, Mapping):
        raise ConfigError(f"{path}: section 'tune' must be a mapping")
    train_overrides = []
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not key.startswith(TUNE_SECTION + "."):
            train_overrides.append(item)
            continue
        if not eq:
            raise ConfigError(f"{where}: --set {item!r} must look like tune.key=value")
        value = yaml.safe_load(raw) if raw.strip() else ""
        *parents, leaf = key.split(".")[1:]
        node = tune_d
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    for item in train_overrides:
        apply_override(d, item, where)
    if overrides:
        where = f"{where} with --set {' '.join(overrides)}"
    cfg = Config.from_dict(d, where)
    if cfg.loss.kind != "magface":
        raise ConfigError(f"{where}: a sweep searches MagFace's magnitude/margin bounds; loss.kind must be "
                          f"'magface', got {cfg.loss.kind!r}")
    return cfg, SweepSettings.from_dict(tune_d, where)


def trial_config(base: Mapping, raw: Mapping[str, float], *, name: str, storage: str) -> Config:
    """The full run config of one trial: the base config with the loss bounds of the sampled raw point."""
    d = copy.deepcopy(dict(base))
    d["loss"] = {**d["loss"], **to_loss_params(raw, float(d["loss"]["s"]))}
    d["train"] = {**d["train"], "name": name, "storage_path": storage}
    d["tracking"] = {**d["tracking"], "run_id": None}
    return Config.from_dict(d, where=f"trial {name}")


# ------------------------------------------------------------------------------------------ objective
@dataclass
class HeldOut:
    """Pairs of decoded images (2P, H, W, 3) uint8, their labels (P,), and the known quality per image."""

    images: np.ndarray
    issame: np.ndarray
    quality: np.ndarray | None
    path: str


def heldout_path(cfg: Config, settings: SweepSettings) -> Path:
    if settings.heldout:
        return Path(settings.heldout).expanduser()
    if not cfg.eval.data_root:
        raise ConfigError("a sweep needs held-out data: set tune.heldout (a .bin) or eval.data_root (holding "
                          "synth.bin or verify/synth.bin)")
    from magface.evaluation.runner import bin_path

    return bin_path(Path(cfg.eval.data_root).expanduser(), "synth")


def load_heldout(path: str | os.PathLike, image_size: int) -> HeldOut:
    """A `.bin` set decoded (and resized) to the network's input, with `<name>_quality.csv` if present."""
    from magface.data.binfile import load_bin
    from magface.evaluation.features import image_table, load_batch
    from magface.evaluation.runner import read_known_quality

    path = Path(path)
    encoded, issame = load_bin(path)
    table = image_table(data=encoded, where=[f"{path} (image {i})" for i in range(len(encoded))])
    batch = load_batch({k: table.column(k).to_pylist() for k in table.column_names}, image_size)
    bad = [e for e in batch["error"] if e]
    if bad:
        raise ValueError(f"{path}: {len(bad)} held-out image(s) cannot be decoded, e.g. {bad[0]}")
    q_file = path.with_name(f"{path.stem}_quality.csv")
    quality = read_known_quality(q_file, [str(i) for i in range(len(encoded))])[0] if q_file.is_file() else None
    return HeldOut(batch["image"], np.asarray(issame, bool), quality, str(path))


def heldout_metrics(checkpoint_dir: str, heldout: HeldOut, *, far: float, l_a: float, u_a: float) -> dict:
    """The objectives of one checkpoint: 10-fold verification accuracy, TAR at `far` over the pair cosines,
    Spearman(|f|, q), and the fraction of held-out magnitudes at l_a."""
    from scipy.stats import spearmanr

    from magface.embedder import Embedder
    from magface.evaluation.metrics import tar_at_far
    from magface.evaluation.verification import verification_accuracy
    from magface.train.loop import magnitude_stats

    feats, mags = Embedder.from_checkpoint(checkpoint_dir, device="cpu").embed(heldout.images)
    e1, e2 = feats[0::2], feats[1::2]
    acc, _, _ = verification_accuracy(e1, e2, heldout.issame, n_folds=min(10, len(heldout.issame)))
    out = {"val_accuracy": float(acc),
           "val_tar_at_far": float(tar_at_far(np.sum(e1 * e2, axis=1), heldout.issame, fars=[far])[far]),
           "val_frac_at_l_a": magnitude_stats(mags, l_a, u_a)["mag_frac_at_l_a"],
           "val_frac_at_u_a": magnitude_stats(mags, l_a, u_a)["mag_frac_at_u_a"],
           "val_mag_mean": float(mags.mean())}
    if heldout.quality is not None:
        rho = spearmanr(mags, heldout.quality).statistic
        out["val_spearman"] = float(rho) if np.isfinite(rho) else 0.0  # constant magnitudes rank nothing
    return out


def _tune_report_callback_type():
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback


def make_report_callback(heldout_file: str, image_size: int, *, far: float, l_a: float, u_a: float,
                         tracking_uri: str | None, run_id: str | None):
    """A TuneReportCallback that adds the held-out objectives (computed from each epoch's checkpoint on the
    Train controller) to rank 0's metrics, logs them to the trial's MLflow run, and forwards them to Tune."""
    base = _tune_report_callback_type()

    class HeldOutReportCallback(base):
        def __init__(self):
            super().__init__()
            self._heldout: HeldOut | None = None
            self._tracker = None

        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            if checkpoint is not None:
                if self._heldout is None:
                    self._heldout = load_heldout(heldout_file, image_size)
                with checkpoint.as_directory() as d:
                    m.update(heldout_metrics(d, self._heldout, far=far, l_a=l_a, u_a=u_a))
            if "epoch_mag_frac_at_l_a" in m:  # training samples at either bound this epoch (rank 0)
                m["collapse_frac"] = max(m["epoch_mag_frac_at_l_a"], m.get("epoch_mag_frac_at_u_a", 0.0))
            if run_id:
                m["mlflow_run_id"] = run_id
                if self._tracker is None:
                    from magface.tracking import Tracker

                    if tracking_uri:
                        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the controller is this trial's own
                    self._tracker = Tracker(run_id)
                self._tracker.log_metrics({k: v for k, v in m.items()
                                           if k.startswith("val_") or k == "collapse_frac"}, step=m.get("step"))
                # Train never closes a user callback and its controller process may end at any time: wait a
                # little (the held-out evaluation already paused it) and keep the rest on disk for the driver
                if not self._tracker.flush(timeout_s=30):
                    self._tracker.persist()
            super().after_report(run_context, [m, *metrics[1:]], checkpoint)

    return HeldOutReportCallback()


# ------------------------------------------------------------------------------------------ one trial
def run_trial(config: dict, *, state: dict) -> None:
    """Tune function trainable: one TorchTrainer for the sampled point, metrics forwarded by the callback."""
    import ray.tune

    from magface.tracking import Tracker
    from magface.train.trainer import build_dataset, build_trainer, make_runtime, steps_per_epoch

    ctx = ray.tune.get_context()
    trial_id = ctx.get_trial_id()
    raw = {k: float(config[k]) for k in RAW_KEYS}
    cfg = trial_config(state["base"], raw, name=trial_id, storage=state["train_storage"])
    settings = SweepSettings.from_dict(state["settings"], where=state["where"])
    spe = steps_per_epoch(cfg, cfg.data.num_images)

    uri = state["tracking_uri"]
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri  # this actor process is the trial's own
    run_id = _trial_run_id(cfg)
    tracker = Tracker.start(ctx.get_trial_name(), experiment=cfg.tracking.experiment, run_id=run_id,
                            params=None if run_id else {**cfg.to_dict(), "tune": raw},
                            parent_run_id=state["parent_run_id"], enabled=cfg.tracking.enabled,
                            tags={"sweep": state["name"], "trial_id": trial_id, "loss": cfg.loss.kind})
    if tracker.run_id and not run_id:
        _save_trial_run_id(cfg, tracker.run_id)
    runtime = make_runtime(cfg, spe, uri, tracker.run_id)
    report = make_report_callback(state["heldout"], cfg.data.image_size, far=settings.far, l_a=cfg.loss.l_a,
                                  u_a=cfg.loss.u_a, tracking_uri=uri, run_id=tracker.run_id)
    trainer = build_trainer(cfg, {"train": build_dataset(cfg)}, runtime, callbacks=[report])
    try:
        trainer.fit()
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def _run_id_file(cfg: Config) -> str:
    from magface.data.storage import join
    from magface.train.trainer import storage_path

    return join(storage_path(cfg), cfg.train.name, "mlflow_run_id")


def _trial_run_id(cfg: Config) -> str | None:
    """A retried trial logs into the MLflow run its first attempt opened."""
    from magface.data import storage

    f = _run_id_file(cfg)
    return storage.read_bytes(f).decode().strip() or None if storage.exists(f) else None


def _save_trial_run_id(cfg: Config, run_id: str) -> None:
    from magface.data.storage import atomic_write

    with atomic_write(_run_id_file(cfg)) as fh:
        fh.write(run_id.encode())


# ------------------------------------------------------------------------------------------ the sweep
@dataclass
class SweepResult:
    table: Any  # pandas DataFrame, sorted by the objective (best first)
    best_config_path: Path | None
    csv_path: Path
    plot_path: Path | None
    parent_run_id: str | None
    experiment_path: str
    restored: bool


def default_max_concurrent(cfg: Config) -> int:
    """Trials that fit at once with one CPU left for Ray Data's read/decode tasks (2 cores: 1 trial)."""
    import ray

    res = ray.cluster_resources()
    per_trial = cfg.scaling.max_workers * cfg.scaling.cpus_per_worker
    n = int((res.get("CPU", 1.0) - 1.0) // per_trial) if per_trial > 0 else 1
    if cfg.scaling.use_gpu:
        n = min(n, int(res.get("GPU", 0.0) // (cfg.scaling.max_workers * cfg.scaling.gpus_per_worker)))
    return max(1, n)


def check_cpus_left_for_data(cfg: Config, max_concurrent: int) -> None:
    """Ray Data's read/decode tasks need a whole CPU that no trainer holds, else every trial hangs."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    held = max_concurrent * cfg.scaling.max_workers * cfg.scaling.cpus_per_worker
    if not cfg.scaling.use_gpu and total - held < 1.0:
        raise ConfigError(f"{max_concurrent} trial(s) x {cfg.scaling.num_workers} worker(s) x "
                          f"{cfg.scaling.cpus_per_worker} CPUs leave {total - held:g} of {total:g} CPUs for Ray "
                          f"Data; lower scaling.cpus_per_worker or tune.max_concurrent_trials, or add CPUs")


def _searcher(settings: SweepSettings, max_concurrent: int):
    if settings.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise ConfigError(f"tune.search=optuna needs optuna installed (pip install -e .[optuna]): {e}") from None
        return OptunaSearch(seed=settings.seed)
    from ray.tune.search import BasicVariantGenerator

    # TuneConfig.max_concurrent_trials ignores a search generator: it takes the limit itself
    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=max_concurrent)


def _read_state(path: str) -> dict | None:
    from magface.data import storage

    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def _write_state(path: str, state: dict) -> None:
    from magface.data.storage import atomic_write

    with atomic_write(path) as fh:
        fh.write(json.dumps(state, indent=1, sort_keys=True, default=str).encode())


def count_images(cfg: Config) -> int:
    from magface.data import read_recordio

    return int(read_recordio(cfg.data.train, num_classes=cfg.data.num_classes).count())


def run_sweep(cfg: Config, settings: SweepSettings, *, name: str | None = None, storage: str | None = None,
              output_dir: str | os.PathLike | None = None, where: str = "<config>") -> SweepResult:
    """Run (or resume: same name and storage) a sweep; print and log the trial table; write the best config."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from magface.data.storage import is_s3, join
    from magface.tracking import Tracker, collect_spools
    from magface.train.trainer import _bound_tracking_uri, storage_path, tracking_uri

    name = name or f"tune_{cfg.train.name}"
    storage = storage or storage_path(cfg)
    exp_path = join(storage, name)
    state_file = join(exp_path, STATE_FILE)
    restored = tune.Tuner.can_restore(exp_path)
    state = _read_state(state_file) if restored else None
    if state is not None:
        print(f"[sweep] resuming {exp_path}: finished trials are kept, unfinished and errored ones continue "
              f"(the saved base config and settings apply)", flush=True)
        settings = SweepSettings.from_dict(state["settings"], where=f"{state_file}")
    else:
        restored = False
        if not cfg.data.train:
            raise ConfigError(f"{where}: data.train is empty; give the .rec shards")
        heldout = heldout_path(cfg, settings)
        probe = load_heldout(heldout, cfg.data.image_size)  # fail before any trial on a bad held-out set
        if settings.metric == "val_spearman" and probe.quality is None:
            raise ConfigError(f"{where}: tune.metric=val_spearman needs {heldout.stem}_quality.csv beside {heldout}")
        base = cfg.to_dict()
        base["data"]["num_images"] = cfg.data.num_images or count_images(cfg)
        state = {"name": name, "base": base, "settings": settings.to_dict(), "heldout": str(heldout),
                 "train_storage": join(exp_path, "train"), "tracking_uri": tracking_uri(cfg), "where": where,
                 "parent_run_id": None}

    uri = state["tracking_uri"]
    with _bound_tracking_uri(uri):
        parent = Tracker.start(f"sweep_{name}", experiment=cfg.tracking.experiment, run_id=state["parent_run_id"],
                               params=None if state["parent_run_id"] else
                               {"tune": state["settings"], "base": state["base"], "heldout": state["heldout"]},
                               tags={"sweep": name, "experiment_path": exp_path}, enabled=cfg.tracking.enabled)
    state["parent_run_id"] = parent.run_id
    _write_state(state_file, state)

    base_cfg = Config.from_dict(state["base"], where=state["where"])
    max_concurrent = settings.max_concurrent_trials or default_max_concurrent(base_cfg)
    check_cpus_left_for_data(base_cfg, max_concurrent)
    trainable = tune.with_resources(tune.with_parameters(run_trial, state=state), TRIAL_RESOURCES)
    if restored:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=settings.space.param_space(),
            tune_config=tune.TuneConfig(
                metric=settings.metric, mode="max", num_samples=settings.num_samples,
                search_alg=_searcher(settings, max_concurrent),
                max_concurrent_trials=max_concurrent if settings.search != "random" else None,
                # max_t one past the last epoch: a trial that reaches it ends by itself instead of being stopped
                # by Tune while its trainer shuts down (that kill leaves the trainer's CPUs to Train's cleaner)
                scheduler=ASHAScheduler(time_attr="epoch", max_t=base_cfg.train.epochs + 1,
                                        grace_period=min(settings.grace_period, base_cfg.train.epochs),
                                        reduction_factor=settings.reduction_factor)),
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=settings.max_failures)),
        )
    print(f"[sweep] {name}: {settings.num_samples} trial(s), objective {settings.metric} (max), "
          f"{settings.search} search, ASHA on epochs (max {base_cfg.train.epochs}), {max_concurrent} at a time; "
          f"MLflow parent run {parent.run_id}", flush=True)
    grid = tuner.fit()

    table = results_table(grid, settings.metric, base_cfg.train.epochs, float(state["base"]["loss"]["s"]),
                          max_collapse_frac=settings.max_collapse_frac)
    out = Path(output_dir) if output_dir else (Path(exp_path) if not is_s3(exp_path) else Path.cwd() / name)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "trials.csv"
    _atomic_text(csv_path, table.to_csv(index=False))
    plot_path = out / "objective_vs_params.png"
    fig = objective_figure(table, settings.metric)
    fig.savefig(plot_path.with_suffix(".tmp.png"), dpi=110, bbox_inches="tight")
    os.replace(plot_path.with_suffix(".tmp.png"), plot_path)
    best_path = None
    best, note = choose_best(table, settings.metric, settings.max_collapse_frac)
    caveat = note if note and note.startswith("WARNING") else None
    if best is not None:
        best_cfg = trial_config(state["base"], {k: best[k] for k in RAW_KEYS},
                                name=f"{name}_best", storage=str(storage_path(cfg)))
        best_path = out / "best_config.yaml"
        header = (f"# best trial {best['trial_id']} of sweep {name}: {settings.metric} = {best[settings.metric]:.4f}, "
                  f"collapse_frac = {_num(best['collapse_frac'])} (trials with more than "
                  f"{settings.max_collapse_frac:g} are not chosen while any other is)\n"
                  + (f"# {caveat}\n" if caveat else "")
                  + f"# train it: python pipelines/train.py --config {best_path}\n")
        _atomic_text(best_path, header + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))

    text = format_table(table, settings.metric, settings.max_collapse_frac)
    if note:
        text += f"\n{note}"
    print(text, flush=True)
    with _bound_tracking_uri(uri):
        parent.log_artifact(csv_path)
        parent.log_artifact(plot_path)
        parent.log_text(text, "trials.txt")
        if best_path:
            parent.log_artifact(best_path)
            parent.log_metrics({f"best_{settings.metric}": float(best[settings.metric]),
                                "trials_finished": float((table["status"] != "ERROR").sum()),
                                "trials_errored": float((table["status"] == "ERROR").sum())})
        trial_runs = [r for r in table.get("mlflow_run_id", []) if isinstance(r, str)]
        collect_spools(trial_runs, tracking_uri=uri)  # what trial workers and controllers left, on any node
        for _, row in table.iterrows():  # trials stopped by ASHA or failed never closed their runs
            if isinstance(row.get("mlflow_run_id"), str) and row["status"] != "done":
                Tracker(row["mlflow_run_id"]).end("KILLED" if row["status"].startswith("stopped") else "FAILED")
        parent.end("FINISHED")
    return SweepResult(table, best_path, csv_path, plot_path, parent.run_id, exp_path, restored)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ results
def results_table(grid, metric: str, max_epochs: int, s: float, max_collapse_frac: float = 0.05):
    """One row per trial: status, epochs run, the searched coordinates (named as Tune samples them:
    l_a, a_width, l_m, m_width, lambda_ratio) and the loss values they give (u_a, u_m, lambda_g), the
    objectives at the trial's best epoch (by `metric`), the collapse fraction there and `collapsed`
    ("yes" above max_collapse_frac). Sorted by `metric`, best first; errored trials last."""
    import pandas as pd

    rows = []
    for r in grid:
        raw = {k: float(r.config[k]) for k in RAW_KEYS}
        row = {"trial_id": (r.metrics or {}).get("trial_id") or (Path(r.path).name if r.path else "?")}
        hist = r.metrics_dataframe
        epochs = int(hist["epoch"].max()) if hist is not None and "epoch" in hist else 0
        row["status"] = "ERROR" if r.error is not None else ("done" if epochs >= max_epochs else f"stopped@{epochs}")
        row["epochs"] = epochs
        row.update(raw)  # exact: best_config.yaml is rebuilt from these
        row.update({k: round(v, 4) for k, v in to_loss_params(raw, s).items() if k in DERIVED_KEYS})
        pick = {}
        if hist is not None and metric in hist and hist[metric].notna().any():
            pick = hist.loc[hist[metric].idxmax()].to_dict()
        for k in (*OBJECTIVES, "collapse_frac", "val_frac_at_l_a", "val_frac_at_u_a"):
            v = pick.get(k)
            row[k] = float(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else None
        c = row["collapse_frac"]
        row["collapsed"] = "?" if c is None else ("yes" if c > max_collapse_frac else "no")
        row["mlflow_run_id"] = (r.metrics or {}).get("mlflow_run_id") or pick.get("mlflow_run_id")
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(metric, ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    return table


def _num(v) -> str:
    return "not measured" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.3f}"


def choose_best(table, metric: str, max_collapse_frac: float):
    """(the trial row for best_config.yaml or None, a note or None). The best by `metric` among the trials
    not collapsed; when every trial collapsed (or none reported a collapse fraction), the best by `metric`
    with a note starting "WARNING" that says so. Never a collapsed trial without saying it."""
    ok = table[table[metric].notna()] if len(table) else table
    if not len(ok):
        return None, None
    healthy = ok[ok["collapsed"] == "no"]
    if not len(healthy):
        return ok.iloc[0], (f"WARNING: no trial is known to be free of collapse (more than {max_collapse_frac:g} "
                            f"of training magnitudes at l_a or u_a, or not measured); best_config.yaml holds the "
                            f"best by {metric}, whose magnitudes may rank quality poorly. Widen tune.space, train "
                            f"longer, or raise tune.max_collapse_frac knowingly.")
    best = healthy.iloc[0]
    if best["trial_id"] != ok.iloc[0]["trial_id"]:
        return best, (f"best_config.yaml: trial {best['trial_id']}, the best of the {len(healthy)} trial(s) not "
                      f"collapsed; trial {ok.iloc[0]['trial_id']} scored higher but is collapsed or unmeasured "
                      f"(collapse_frac {_num(ok.iloc[0]['collapse_frac'])}) and is not recommended")
    return best, None


def format_table(table, metric: str, max_collapse_frac: float = 0.05) -> str:
    cols = ["trial_id", "status", "epochs", *RAW_KEYS, *DERIVED_KEYS, *OBJECTIVES, "collapse_frac", "collapsed"]
    shown = table[[c for c in cols if c in table]].copy()
    title = (f"Trials sorted by {metric} (best first; metrics at each trial's best epoch). Searched: "
             f"{', '.join(RAW_KEYS)}; giving u_a = l_a + a_width, u_m = l_m + m_width, lambda_g = lambda_ratio x "
             f"its feasibility bound. collapsed: more than {max_collapse_frac:g} of training magnitudes at l_a/u_a:")
    return title + "\n" + shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def objective_figure(table, metric: str):
    """Objective vs each searched coordinate (RAW_KEYS, as in the tables), one panel each; colour marks
    finished / stopped / errored, a cross a collapsed trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RAW_KEYS), figsize=(3.2 * len(RAW_KEYS), 3.0), sharey=True)
    colours = {"done": "tab:green", "ERROR": "tab:red"}
    for ax, key in zip(axes, RAW_KEYS):
        for _, row in table.iterrows():
            y = row[metric]
            if y is None or (isinstance(y, float) and math.isnan(y)):
                continue
            ax.scatter(row[key], y, color=colours.get(row["status"], "tab:orange"), s=30,
                       marker="x" if row.get("collapsed") == "yes" else "o")
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    fig.suptitle("sweep trials: green finished, orange stopped by ASHA; x = collapsed (magnitudes at l_a/u_a)",
                 fontsize=9)
    fig.tight_layout()
    return fig
