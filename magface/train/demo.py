"""The embedded demo: synthetic faces with known quality -> MagFace on CPU -> evaluation -> one table.

Also trains an ArcFace baseline with the same recipe when the time budget allows, because the claim to
check is that MagFace's feature magnitude tracks quality better than a plain margin loss's does.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from magface.config import Config

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def cache_dir() -> Path:
    """$MAGFACE_CACHE, else ~/.cache/magface, else ./.magface_cache (read-only home directories)."""
    if os.environ.get("MAGFACE_CACHE"):
        return Path(os.environ["MAGFACE_CACHE"]).expanduser()
    home = Path("~/.cache/magface").expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return Path(".magface_cache").resolve()


def prepare_data(root: Path, cfg: Config):
    """Generate the synthetic set once (the generator writes a manifest last and reuses a complete set).
    `data.synthetic` holds the generator's other settings; each parameter set has its own folder."""
    import hashlib
    import json

    from magface.data.synthetic import generate
    from magface.data.synthetic.writers import dataset_params

    kw = {**cfg.data.synthetic, "num_train_ids": cfg.data.num_classes, "image_size": cfg.data.image_size}
    digest = hashlib.sha256(json.dumps(dataset_params(**kw), sort_keys=True).encode()).hexdigest()[:8]
    return generate(root / f"synthetic_{cfg.data.num_classes}ids_{cfg.data.image_size}px_{digest}", **kw)


def prepare_validation(root: Path, cfg: Config, bin_pairs: int = 2000):
    """A held-out validation `.bin` for sweeps: the evaluation sets' settings, another seed (other identities
    and images than the test sets the demo and the report score), a token training part."""
    syn = dict(cfg.data.synthetic)
    syn.update(seed=int(syn.get("seed", 0)) + 1000, bin_pairs=bin_pairs, images_per_id=2)
    val = Config.from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "num_classes": 2, "synthetic": syn}})
    return prepare_data(root, val).verify_bin


def demo_config(data, cache: Path, kind: str, stamp: str, overrides=()) -> Config:
    return Config.load(DEMO_CONFIG, [
        f"data.train=[{data.train_rec}]",
        f"eval.data_root={data.root}",
        f"train.storage_path={cache / 'runs'}",
        f"train.name=demo_{kind}_{stamp}",
        f"loss.kind={kind}",
        *overrides,
    ])


def _row(label: str, values: list, fmt: str = "{:>10.3f}") -> str:
    cells = "".join(fmt.format(v) if v is not None else f"{'-':>10}" for v in values)
    return f"  {label:<44}{cells}"


def _first(metrics: dict, *keys):
    """The first of `keys` present in `metrics` (metric names of the IJB template conventions)."""
    return next((metrics[k] for k in keys if metrics.get(k) is not None), None)


def format_table(results: dict[str, dict], elapsed_s: float, cfg: Config) -> str:
    """Rows: verification accuracy, TAR@FAR on the IJB-style set, Spearman(magnitude, q), EDC/ERC areas, the
    fraction of last-epoch training magnitudes at the clamp bounds; one column per loss."""
    names = list(results)
    m = {k: r.get("metrics", {}) for k, r in results.items()}
    train = {k: r.get("train_metrics", {}) for k, r in results.items()}
    lines = [f"MagFace demo: synthetic faces ({cfg.data.num_classes} identities, {cfg.data.image_size}x"
             f"{cfg.data.image_size}), {cfg.model.backbone} backbone, {cfg.train.epochs} epochs on CPU, "
             f"{elapsed_s / 60:.1f} min",
             f"  {'metric':<44}" + "".join(f"{n:>10}" for n in names)]
    lines.append(_row("synth_verify accuracy (10-fold)", [m[n].get("synth_verify.accuracy") for n in names]))
    for far in ("1e-4", "1e-3", "1e-2"):
        lines.append(_row(f"synth_ijb TAR@FAR={far}", [_first(m[n], f"synth_ijb.insightface.tar_far_{far}",
                                                             f"synth_ijb.magface.tar_far_{far}",
                                                             f"synth_ijb.plain.tar_far_{far}") for n in names]))
    lines.append(_row("synth_ijb TAR@FAR=1e-4, MagFace+ templates",
                      [m[n].get("synth_ijb.magface_plus.tar_far_1e-4") for n in names]))
    lines.append(_row("Spearman(|f|, q), verification images", [m[n].get("quality_spearman") for n in names]))
    lines.append(_row("Spearman(|f|, q), IJB-style images", [m[n].get("quality_spearman_ijb") for n in names]))
    lines.append(_row("EDC pAUC@20% by |f|, FMR 1e-3 (lower better)",
                      [m[n].get("quality.magnitude.edc_pauc20_fmr_1e-3") for n in names], "{:>10.4f}"))
    lines.append(_row("ERC AUC by magnitude (lower is better)",
                      [m[n].get("quality.erc_auc.magnitude") for n in names], "{:>10.4f}"))
    lines.append(_row("train |f| mean, last epoch", [train[n].get("epoch_mag_mean") for n in names], "{:>10.1f}"))
    lines.append(_row(f"train |f| at l_a={cfg.loss.l_a:g} (fraction)",
                      [train[n].get("epoch_mag_frac_at_l_a") for n in names]))
    lines.append(_row(f"train |f| at u_a={cfg.loss.u_a:g} (fraction)",
                      [train[n].get("epoch_mag_frac_at_u_a") for n in names]))
    return "\n".join(lines)


def run_demo(*, overrides=(), baseline: bool = True, time_budget_s: float = 540.0, cache: Path | None = None,
             stamp: str | None = None) -> dict:
    """Train + evaluate MagFace (and ArcFace if the projected time fits the budget); print and return the table.
    `stamp` names the jobs (demo_<kind>_<stamp>): an interrupted demo's stamp resumes it."""
    from magface.evaluation.runner import evaluate
    from magface.tracking import Tracker
    from magface.train.trainer import run

    t0 = time.perf_counter()
    cache = cache or cache_dir()
    base = Config.load(DEMO_CONFIG, list(overrides))
    data = prepare_data(cache, base)
    print(f"[demo] synthetic data ready in {cache} ({time.perf_counter() - t0:.0f}s)", flush=True)
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    parent = Tracker.start(f"demo_{stamp}", experiment=base.tracking.experiment,
                           params={"demo": True, "cache": str(cache)}, enabled=base.tracking.enabled)

    results: dict[str, dict] = {}
    for kind, label in (("magface", "MagFace"), ("arcface", "ArcFace")):
        if kind == "arcface":
            spent = time.perf_counter() - t0
            if not baseline or spent * 2 > time_budget_s:
                print(f"[demo] skipping the ArcFace baseline ({spent:.0f}s spent of a {time_budget_s:.0f}s "
                      f"budget)", flush=True)
                break
        cfg = demo_config(data, cache, kind, stamp, overrides)
        try:
            trained = run(cfg, parent_run_id=parent.run_id, run_name=f"demo_{kind}")
        except BaseException as e:  # the demo's run ends with its training run (KILLED on Ctrl-C)
            from magface.train.interrupt import TrainingInterrupted

            parent.end("KILLED" if isinstance(e, (TrainingInterrupted, KeyboardInterrupt)) else "FAILED")
            raise
        if trained.error is not None:
            raise RuntimeError(f"demo training ({kind}) failed: {trained.error}")
        ev = evaluate(trained.checkpoint_path, benchmarks=cfg.eval.benchmarks, data_root=str(data.root),
                      run_id=trained.run_id, experiment=cfg.tracking.experiment, show=False)
        results[label] = {"metrics": ev["metrics"], "train_metrics": trained.metrics,
                          "checkpoint": trained.checkpoint_path,
                          "train_run_id": trained.run_id, "eval_run_id": ev.get("mlflow_run_id")}
    elapsed = time.perf_counter() - t0
    table = format_table(results, elapsed, cfg)
    parent.log_text(table, "demo_table.txt")
    parent.log_metrics({f"{label}.{k}": v for label, r in results.items() for k, v in r["metrics"].items()
                        if k in ("synth_verify.accuracy", "quality_spearman", "quality_spearman_ijb")})
    parent.end()
    print(table, flush=True)
    for label, r in results.items():
        print(f"  {label} checkpoint: {r['checkpoint']}")
    return {"results": results, "table": table, "elapsed_s": elapsed, "parent_run_id": parent.run_id}
