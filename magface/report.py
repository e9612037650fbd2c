"""The paper's claims, checked on the synthetic benchmark: Softmax, ArcFace and MagFace trained with the same
recipe and budget for several seeds, evaluated with the project's evaluator, and written up as one
self-contained Markdown report with PNG figures (also logged to MLflow as artifacts of one parent run).

What it draws and tabulates (MagFace, CVPR 2021):
- Figure 3: feature magnitude against cos(theta) to the class centre, for the final training samples of each
  loss (`last_samples.npz` in the final checkpoint; the centres are the classifier rows saved with it);
- magnitude histograms per band of the known quality q, and mean faces per magnitude bin with their counts
  (the paper's "mean faces on IJB-C"), on the IJB-style images;
- error-versus-discard curves (EDC, FNMR at a fixed FMR-1e-3 threshold) ranked by magnitude, with pAUC;
- recognition (verification accuracy, TAR@FAR 1e-4/1e-3/1e-2, MagFace+ templates), clustering (K-means, AHC,
  DBSCAN: BCubed F and NMI) and quality tables, mean +- std over seeds;
- a plain list of which claims held on this data and which did not.

Nothing here is tuned per loss: every loss gets the demo configuration (configs/demo.yaml) with only
`loss.kind` changed. Orchestration lives here, above the library (magface.train, magface.evaluation).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LOSSES = (("softmax", "Softmax"), ("arcface", "ArcFace"), ("magface", "MagFace"))
QUALITY_BANDS = (0.0, 0.25, 0.5, 0.75, 1.0)
BENCHMARKS = ("synth_verify", "synth_ijb", "quality", "cluster")
EDC_FMR, EDC_LIMIT = 1e-3, 0.2
CLUSTER_METHODS = (("kmeans", "K-means"), ("ahc", "AHC"), ("dbscan", "DBSCAN"))


# ---------------------------------------------------------------------------------------- metric helpers
def figure3_points(features, labels, centres) -> dict:
    """Magnitude |f| and cos(theta) between f and its class centre w_y, per sample (the paper's Figure 3)."""
    f = np.asarray(features, np.float64)
    w = np.asarray(centres, np.float64)[np.asarray(labels, np.int64)]
    mag = np.linalg.norm(f, axis=1)
    cos = np.einsum("ij,ij->i", f, w) / np.maximum(mag * np.linalg.norm(w, axis=1), 1e-12)
    return {"magnitude": mag, "cos": cos}


def class_centres(checkpoint_dir, num_classes: int) -> np.ndarray:
    """The classifier's class centres (num_classes x d) from a checkpoint's row files (tensors only)."""
    from magface.train.state import list_row_files, safe_load

    rows = [safe_load(path)["weight"].float().numpy() for _, _, path in list_row_files(checkpoint_dir, num_classes)]
    return np.concatenate(rows)


def load_last_samples(checkpoint_dir) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of the final training steps, written by the training loop into the last checkpoint."""
    from magface.train.loop import LAST_SAMPLES_FILE

    path = Path(checkpoint_dir) / LAST_SAMPLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no final training samples (the checkpoint is not a final one, or it "
                                f"was written before the loop saved them); retrain with this version")
    with np.load(path, allow_pickle=False) as z:
        return z["features"], z["labels"]


def mean_faces_by_magnitude(images, magnitudes, n_bins: int) -> dict:
    """Equal-width magnitude bins over [min, max]; each bin's mean image (float, NaN when empty) and count."""
    mags = np.asarray(magnitudes, np.float64)
    edges = np.linspace(mags.min(), mags.max(), n_bins + 1)
    idx = np.clip(np.searchsorted(edges, mags, side="right") - 1, 0, n_bins - 1)
    images = np.asarray(images)
    means = np.full((n_bins, *images.shape[1:]), np.nan)
    counts = np.bincount(idx, minlength=n_bins)
    for b in range(n_bins):
        if counts[b]:
            means[b] = images[idx == b].astype(np.float64).mean(0)
    return {"edges": edges, "means": means, "counts": counts}


def quality_bands(q, bands=QUALITY_BANDS) -> np.ndarray:
    """Band index per image: band b holds bands[b] <= q < bands[b+1] (the last band includes its top)."""
    q = np.asarray(q, np.float64)
    return np.clip(np.searchsorted(np.asarray(bands), q, side="right") - 1, 0, len(bands) - 2)


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample standard deviation (0 for one value), count) over the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not v.size:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def compare(a: list, b: list, higher_is_better: bool = True) -> dict:
    """Per-seed comparison of loss A against loss B: wins (A better in that seed), seeds, mean difference,
    and a verdict: "held" (better on average and in every seed), "mixed" (better on average only) or
    "did not hold"."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and np.isfinite(x) and np.isfinite(y)]
    if not pairs:
        return {"wins": 0, "n": 0, "diff": float("nan"), "verdict": "not measured"}
    d = np.array([x - y for x, y in pairs]) * (1 if higher_is_better else -1)
    wins = int((d > 0).sum())
    verdict = "held" if d.mean() > 0 and wins == len(d) else ("mixed" if d.mean() > 0 else "did not hold")
    return {"wins": wins, "n": len(d), "diff": float(d.mean()), "verdict": verdict}


def ijb_metric(metrics: dict, far: str, rule: str | None = None):
    """TAR@FAR of the IJB-style set: `rule` "magface_plus", else the plain template convention the evaluator
    used (insightface's, MagFace's plain mean, or the older "plain" name)."""
    names = [rule] if rule else ["insightface", "magface", "plain"]
    return next((metrics[f"synth_ijb.{n}.tar_far_{far}"] for n in names
                 if metrics.get(f"synth_ijb.{n}.tar_far_{far}") is not None), None)


# rows of the tables: (label, getter over (eval metrics, train metrics, extra), higher is better)
RECOGNITION_ROWS = [
    ("verification accuracy (10-fold, 6,000 pairs)", lambda m, t, x: m.get("synth_verify.accuracy"), True),
    *[(f"IJB-style TAR@FAR={far}", (lambda far: lambda m, t, x: ijb_metric(m, far))(far), True)
      for far in ("1e-4", "1e-3", "1e-2")],
    *[(f"IJB-style TAR@FAR={far}, MagFace+ templates",
       (lambda far: lambda m, t, x: ijb_metric(m, far, "magface_plus"))(far), True) for far in ("1e-4", "1e-3")],
]
MAGFACE_ONLY_ROWS = ("train |f| at or below l_a (fraction)", "train |f| at or above u_a (fraction)")
CLUSTER_ROWS = [(f"{label} {what}", (lambda k, key: lambda m, t, x: m.get(f"cluster.{k}.{key}"))(k, key), True)
                for k, label in CLUSTER_METHODS for what, key in (("BCubed F", "bcubed_f"), ("NMI", "nmi"))]
QUALITY_ROWS = [
    ("Spearman(|f|, q), verification images", lambda m, t, x: m.get("quality_spearman"), True),
    ("Spearman(|f|, q), IJB-style images", lambda m, t, x: m.get("quality_spearman_ijb"), True),
    (f"EDC pAUC@{EDC_LIMIT:.0%} by |f|, FMR {EDC_FMR:g} (lower is better)",
     lambda m, t, x: m.get("quality.magnitude.edc_pauc20_fmr_1e-3"), False),
    ("ERC AUC by |f| (lower is better)", lambda m, t, x: m.get("quality.erc_auc.magnitude"), False),
    ("Spearman(|f|, cos to class centre), final training samples", lambda m, t, x: x.get("fig3_spearman"), True),
    ("train |f| mean, last epoch", lambda m, t, x: t.get("epoch_mag_mean"), None),
    ("train |f| at or below l_a (fraction)", lambda m, t, x: t.get("epoch_mag_frac_at_l_a"), False),
    ("train |f| at or above u_a (fraction)", lambda m, t, x: t.get("epoch_mag_frac_at_u_a"), False),
]


def column(runs: list[dict], getter) -> list:
    return [getter(r["metrics"], r["train_metrics"], r["extra"]) for r in runs]


def md(text: str) -> str:
    """A Markdown table cell: a literal '|' (as in |f|) would split the cell."""
    return str(text).replace("|", "\\|")


def table_markdown(rows, runs_by_loss: dict[str, list[dict]], digits: int = 3) -> str:
    """Mean ± sample std over seeds per loss; rows about MagFace's clamp bounds only for the MagFace column."""
    names = list(runs_by_loss)
    out = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, getter, _ in rows:
        cells = []
        for n in names:
            mean, std, k = mean_std(column(runs_by_loss[n], getter))
            if label in MAGFACE_ONLY_ROWS and n != "MagFace":
                cells.append("n/a")
            else:
                cells.append("–" if k == 0 else f"{mean:.{digits}f} ± {std:.{digits}f}")
        out.append(f"| {md(label)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def claims(runs_by_loss: dict[str, list[dict]]) -> list[dict]:
    """The paper's claims, each compared seed by seed (MagFace against ArcFace unless stated)."""
    mag, arc = runs_by_loss.get("MagFace", []), runs_by_loss.get("ArcFace", [])
    get = {label: g for label, g, _ in RECOGNITION_ROWS + CLUSTER_ROWS + QUALITY_ROWS}
    out = []

    def add(claim: str, row: str, higher: bool, a=None, b=None, what: str = "MagFace vs ArcFace"):
        a = column(mag, get[row]) if a is None else a
        b = column(arc, get[row]) if b is None else b
        out.append({"claim": claim, "what": what, **compare(a, b, higher)})

    add("The magnitude ranks images by quality better (Spearman with the known q, verification images)",
        "Spearman(|f|, q), verification images", True)
    add("... and on the IJB-style images", "Spearman(|f|, q), IJB-style images", True)
    add("Discarding the lowest-magnitude pairs removes errors faster (EDC pAUC, lower is better)",
        f"EDC pAUC@{EDC_LIMIT:.0%} by |f|, FMR {EDC_FMR:g} (lower is better)", False)
    add("The magnitude grows with cos to the class centre (Figure 3: Spearman on the final training samples)",
        "Spearman(|f|, cos to class centre), final training samples", True)
    add("Recognition is not worse: TAR@FAR=1e-4 on the IJB-style set", "IJB-style TAR@FAR=1e-4", True)
    add("Recognition is not worse: verification accuracy", "verification accuracy (10-fold, 6,000 pairs)", True)
    add("Quality-aware templates help (TAR@FAR=1e-4)", "IJB-style TAR@FAR=1e-4", True,
        a=column(mag, get["IJB-style TAR@FAR=1e-4, MagFace+ templates"]), b=column(mag, get["IJB-style TAR@FAR=1e-4"]),
        what="MagFace+ vs plain templates, MagFace model")
    for _, label in CLUSTER_METHODS:
        add(f"Clustering is better ({label}, BCubed F)", f"{label} BCubed F", True)
    at_bounds = [max(r["train_metrics"].get("epoch_mag_frac_at_l_a") or 0.0,
                     r["train_metrics"].get("epoch_mag_frac_at_u_a") or 0.0) for r in mag]
    verdict = "not measured" if not at_bounds else ("held" if max(at_bounds) <= 0.05 else "did not hold")
    out.append({"claim": "MagFace's magnitudes spread inside [l_a, u_a] (at most 5% at either bound, every seed)",
                "what": "MagFace", "wins": sum(x <= 0.05 for x in at_bounds), "n": len(at_bounds),
                "diff": float(max(at_bounds)) if at_bounds else float("nan"), "verdict": verdict})
    return out


# ---------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure3(points: dict[str, dict], bounds: tuple[float, float] | None):
    plt = _plt()
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 3.6))
    axes = np.atleast_1d(axes)
    for ax, (name, p) in zip(axes, points.items()):
        ax.scatter(p["cos"], p["magnitude"], s=3, alpha=0.35, color="tab:blue")
        if name == "MagFace" and bounds:
            for y, lbl in zip(bounds, ("l_a", "u_a")):
                if y <= p["magnitude"].max() * 1.5:
                    ax.axhline(y, color="tab:red", ls="--", lw=1, label=f"{lbl} = {y:g}")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_title(f"{name}: {len(p['cos'])} final training samples", fontsize=9)
        ax.set_xlabel("cos(theta) to the class centre")
        ax.set_ylabel("feature magnitude ||f||")
        ax.grid(alpha=0.3)
    fig.suptitle("Figure 3 (reproduced): magnitude vs cos(theta), last training iterations", fontsize=10)
    fig.tight_layout()
    return fig


def band_histograms_figure(per_loss: dict[str, dict], bands=QUALITY_BANDS):
    plt = _plt()
    fig, axes = plt.subplots(1, len(per_loss), figsize=(4.2 * len(per_loss), 3.3))
    axes = np.atleast_1d(axes)
    colours = plt.get_cmap("viridis")(np.linspace(0.1, 0.9, len(bands) - 1))
    for ax, (name, d) in zip(axes, per_loss.items()):
        band = quality_bands(d["q"], bands)
        lo, hi = np.percentile(d["magnitude"], [0.5, 99.5])
        bins = np.linspace(lo, hi, 40)
        for b in range(len(bands) - 1):
            sel = d["magnitude"][band == b]
            ax.hist(sel, bins=bins, alpha=0.55, color=colours[b],
                    label=f"q in [{bands[b]:.2f}, {bands[b + 1]:.2f}{']' if b == len(bands) - 2 else ')'}: "
                          f"{sel.size}")
        ax.set_title(f"{name}: IJB-style image magnitudes by known quality", fontsize=9)
        ax.set_xlabel("feature magnitude ||f||")
        ax.set_ylabel("images")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def mean_faces_figure(per_loss: dict[str, dict]):
    plt = _plt()
    n_bins = len(next(iter(per_loss.values()))["counts"])
    fig, axes = plt.subplots(len(per_loss), n_bins, figsize=(1.25 * n_bins, 1.55 * len(per_loss)))
    axes = np.atleast_2d(axes)
    for row, (name, d) in zip(axes, per_loss.items()):
        for b, ax in enumerate(row):
            ax.axis("off")
            if d["counts"][b]:
                ax.imshow(np.clip(d["means"][b], 0, 255).astype(np.uint8))
            ax.set_title(f"{0.5 * (d['edges'][b] + d['edges'][b + 1]):.1f}\nn={d['counts'][b]}", fontsize=6)
        row[0].text(-0.15, 0.5, name, transform=row[0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle("Mean aligned IJB-style faces per magnitude bin (bin centre, count); low to high magnitude",
                 fontsize=8)
    fig.tight_layout()
    return fig


def edc_figure(curves: dict[str, dict], paucs: dict[str, float]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, c in curves.items():
        ls = ":" if "oracle" in name else "-"
        ax.step(c["discard_fractions"], c["fnmr"], where="post", ls=ls,
                label=f"{name} (pAUC@{EDC_LIMIT:.0%} {paucs[name]:.4f})")
    ax.axvline(EDC_LIMIT, color="grey", lw=0.8)
    ax.set_xlim(0, 0.6)
    ax.set_xlabel("fraction of pairs discarded (lowest quality first)")
    ax.set_ylabel(f"FNMR at FMR {EDC_FMR:g} (threshold fixed)")
    ax.set_title("EDC on the 6,000 verification pairs, quality = magnitude", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- figure data
def embed_eval_images(checkpoint: str, data_root: Path, n_bins: int) -> dict:
    """Per-image data for the figures of one model: IJB-style magnitudes with q and the mean faces per
    magnitude bin, and the verification pairs' scores and magnitudes."""
    from magface.data.binfile import load_bin
    from magface.embedder import Embedder
    from magface.evaluation.features import image_table, load_batch
    from magface.evaluation.ijb import find_ijb_dir, load_face, read_protocol
    from magface.evaluation.runner import bin_path, read_known_quality

    emb = Embedder.from_checkpoint(checkpoint, device="cpu")
    size = emb.input_size
    proto = read_protocol(find_ijb_dir(data_root, "SYNTH"), "synth")
    faces = np.stack([load_face(None, str(proto.image_dir / im), proto.landmarks[i], size, proto.where(i))
                      for i, im in enumerate(proto.images)])
    _, mags = emb.embed(faces)
    q, _ = read_known_quality(proto.set_dir / "meta" / "synth_quality.csv", proto.images)
    path = bin_path(data_root, "synth")
    encoded, issame = load_bin(path)
    table = image_table(data=encoded, where=[f"{path} (image {i})" for i in range(len(encoded))])
    images = load_batch({k: table.column(k).to_pylist() for k in table.column_names}, size)["image"]
    vf, vm = emb.embed(images)
    vq = read_known_quality(path.with_name("synth_quality.csv"), [str(i) for i in range(len(encoded))])[0]
    return {"magnitude": mags, "q": q, **mean_faces_by_magnitude(faces, mags, n_bins),
            "scores": np.sum(vf[0::2] * vf[1::2], axis=1), "issame": np.asarray(issame, bool),
            "pair_mags": (vm[0::2], vm[1::2]), "pair_q": (vq[0::2], vq[1::2])}


# ---------------------------------------------------------------------------------------- the run
@dataclass
class ReportResult:
    report_path: Path
    figures: dict[str, Path]
    runs: dict[str, list[dict]]
    claims: list[dict]
    parent_run_id: str | None
    elapsed_s: float
    extra: dict = field(default_factory=dict)


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    _plt().close(fig)
    return path


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_report(*, seeds: int = 3, overrides=(), out_dir=None, cache: Path | None = None, name: str | None = None,
               mean_face_bins: int = 8) -> ReportResult:
    """Train every loss for `seeds` seeds (train.seed = 0..seeds-1) with the demo recipe, evaluate, draw, write
    `<out_dir>/report.md` with its PNGs, and log them to one MLflow parent run. The same `name` resumes."""
    from magface.config import Config
    from magface.evaluation.quality import edc_curve, edc_pauc
    from magface.tracking import Tracker
    from magface.train.demo import DEMO_CONFIG, cache_dir, demo_config, prepare_data
    from magface.train.trainer import run

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    t0 = time.perf_counter()
    cache = cache or cache_dir()
    base = Config.load(DEMO_CONFIG, list(overrides))
    data = prepare_data(cache, base)
    name = name or time.strftime("report_%Y%m%d-%H%M%S")
    out = Path(out_dir or Path("reports") / name)
    out.mkdir(parents=True, exist_ok=True)
    parent = Tracker.start(name, experiment=base.tracking.experiment, enabled=base.tracking.enabled,
                           params={"report": True, "seeds": seeds, "overrides": " ".join(overrides) or "-",
                                   "data": str(data.root)}, tags={"magface.kind": "report"})
    runs: dict[str, list[dict]] = {label: [] for _, label in LOSSES}
    checkpoints: dict[str, str] = {}
    cfg = base
    done_dir = out / "runs"  # one JSON per trained and evaluated model: a rerun of the same name skips it
    done_dir.mkdir(exist_ok=True)
    for seed in range(seeds):
        for kind, label in LOSSES:
            cfg = demo_config(data, cache, kind, f"{name}_s{seed}", [*overrides, f"train.seed={seed}"])
            done = done_dir / f"{kind}_s{seed}.json"
            if done.is_file():
                rec = json.loads(done.read_text())
                print(f"[report] {label}, seed {seed}: done before ({done})", flush=True)
            else:
                print(f"[report] training {label}, seed {seed} ({time.perf_counter() - t0:.0f}s so far)", flush=True)
                trained = run(cfg, parent_run_id=parent.run_id, run_name=f"{name}_{kind}_s{seed}")
                if trained.error is not None:
                    parent.end("FAILED")
                    raise RuntimeError(f"report: training {label} seed {seed} failed: {trained.error}")
                from magface.evaluation.runner import evaluate

                ev = evaluate(trained.checkpoint_path, benchmarks=BENCHMARKS, data_root=str(data.root),
                              run_id=trained.run_id, experiment=cfg.tracking.experiment, show=False)
                rec = {"seed": seed, "metrics": ev["metrics"], "train_metrics": dict(trained.metrics),
                       "checkpoint": str(trained.checkpoint_path), "run_id": trained.run_id}
                _atomic_text(done, json.dumps(rec, default=float))
            extra = {}
            try:
                feats, labels = load_last_samples(rec["checkpoint"])
                pts = figure3_points(feats, labels, class_centres(rec["checkpoint"], cfg.data.num_classes))
                from scipy.stats import spearmanr

                extra = {"fig3": pts, "fig3_spearman": float(spearmanr(pts["magnitude"], pts["cos"]).statistic)}
            except (FileNotFoundError, ValueError) as e:
                print(f"[report] {label} seed {seed}: no Figure 3 data ({e})", flush=True)
            runs[label].append({**rec, "extra": extra})
            if seed == 0:
                checkpoints[label] = rec["checkpoint"]

    # figures from seed 0's models
    print(f"[report] drawing ({time.perf_counter() - t0:.0f}s so far)", flush=True)
    per_loss = {label: embed_eval_images(ck, data.root, mean_face_bins) for label, ck in checkpoints.items()}
    figs = {}
    pts = {label: r[0]["extra"]["fig3"] for label, r in runs.items() if r and "fig3" in r[0]["extra"]}
    if pts:
        figs["figure3"] = _save(figure3(pts, (cfg.loss.l_a, cfg.loss.u_a)), out / "figure3_magnitude_vs_cos.png")
    figs["histograms"] = _save(band_histograms_figure(per_loss), out / "magnitude_by_quality_band.png")
    figs["mean_faces"] = _save(mean_faces_figure(per_loss), out / "mean_faces_by_magnitude.png")
    curves, paucs = {}, {}
    for label, d in per_loss.items():
        curves[label] = edc_curve(d["scores"], d["issame"], *d["pair_mags"], fmr=EDC_FMR)
        paucs[label] = edc_pauc(curves[label], EDC_LIMIT)
    ref = "MagFace" if "MagFace" in per_loss else next(iter(per_loss))
    oracle = f"known q (oracle), {ref}'s scores"  # the same pairs and scores, ranked by the true quality
    d0 = per_loss[ref]
    curves[oracle] = edc_curve(d0["scores"], d0["issame"], *d0["pair_q"], fmr=EDC_FMR)
    paucs[oracle] = edc_pauc(curves[oracle], EDC_LIMIT)
    figs["edc"] = _save(edc_figure(curves, paucs), out / "edc_by_magnitude.png")

    verdicts = claims(runs)
    elapsed = time.perf_counter() - t0
    text = render_markdown(runs, verdicts, figs, cfg, data, seeds=seeds, elapsed_s=elapsed, name=name,
                           paucs=paucs)
    report_path = out / "report.md"
    _atomic_text(report_path, text)
    summary = {label: [{k: v for k, v in r.items() if k != "extra"} | {"fig3_spearman": r["extra"].get("fig3_spearman")}
                       for r in rs] for label, rs in runs.items()}
    _atomic_text(out / "runs.json", json.dumps({"runs": summary, "claims": verdicts, "elapsed_s": elapsed},
                                               indent=1, default=float))
    for path in [report_path, out / "runs.json", *figs.values()]:
        parent.log_artifact(path, "report")
    parent.log_metrics({f"{label}.{k}": mean_std(column(rs, g))[0] for label, rs in runs.items()
                        for k, g in (("quality_spearman", QUALITY_ROWS[0][1]),
                                     ("tar_far_1e-4", RECOGNITION_ROWS[1][1])) if rs})
    parent.end()
    print(f"[report] {report_path} in {elapsed / 60:.1f} min; MLflow parent run {parent.run_id}", flush=True)
    return ReportResult(report_path, figs, runs, verdicts, parent.run_id, elapsed)


def render_markdown(runs, verdicts, figs, cfg, data, *, seeds: int, elapsed_s: float, name: str, paucs) -> str:
    counts = (json.loads(data.manifest.read_text()).get("counts", {}) if data.manifest.is_file() else {})
    lines = [f"# MagFace's claims on synthetic faces: {name}", "",
             f"Softmax, ArcFace and MagFace, each trained with `configs/demo.yaml` (only `loss.kind` differs): "
             f"{cfg.model.backbone} backbone {cfg.model.backbone_kwargs}, d = {cfg.model.embedding_size}, "
             f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}, s = {cfg.loss.s:g}; MagFace l_a = "
             f"{cfg.loss.l_a:g}, u_a = {cfg.loss.u_a:g}, l_m = {cfg.loss.l_m:g}, u_m = {cfg.loss.u_m:g}, "
             f"lambda_g = {cfg.loss.lambda_g:g}. {seeds} seed(s) per loss (train.seed = 0..{seeds - 1}); tables "
             f"show mean ± sample std over seeds, figures seed 0.", "",
             f"Data: {counts.get('train_identities', '?')} training identities "
             f"({counts.get('train_images', '?')} images); {counts.get('verify_pairs', '?')} verification pairs; "
             f"IJB-style set of {counts.get('ijb_templates', '?')} templates ({counts.get('ijb_images', '?')} "
             f"images, {counts.get('ijb_impostor_pairs', '?')} impostor pairs); evaluation settings "
             f"{cfg.data.synthetic or 'generator defaults'}.", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU core(s), Python {platform.python_version()}; this "
             f"invocation took {elapsed_s / 60:.1f} min (models finished by an earlier invocation of the same name "
             f"are reused, not counted).", "",
             "## Which claims held", "",
             "| claim | comparison | verdict | seeds better | mean difference |", "|---|---|---|---|---|"]
    for c in verdicts:
        lines.append(f"| {md(c['claim'])} | {c['what']} | **{c['verdict']}** | {c['wins']}/{c['n']} | "
                     f"{c['diff']:+.4f} |")
    lines += ["", "\"held\": better on average and in every seed; \"mixed\": better on average only; "
              "\"did not hold\": not better on average. For the bounds row the last column is the largest "
              "fraction at a bound.", "",
              "## Recognition", "", table_markdown(RECOGNITION_ROWS, runs), "",
              "## Clustering (IJB-style images, identities as classes)", "", table_markdown(CLUSTER_ROWS, runs), "",
              "## Quality", "", table_markdown(QUALITY_ROWS, runs, digits=4), "",
              "The l_a/u_a rows concern MagFace's clamp; Softmax and ArcFace have no such bounds (n/a).", "",
              "## Figures", ""]
    captions = {"figure3": "Figure 3: magnitude vs cos(theta) to the class centre, final training samples",
                "histograms": "Magnitude histograms per band of the known quality q (IJB-style images)",
                "mean_faces": "Mean faces per magnitude bin, with counts (as the paper's IJB-C figure)",
                "edc": "Error-versus-discard by magnitude (the oracle ranks MagFace's pairs by the known q); "
                       "pAUC in the legend"}
    for key, path in figs.items():
        lines += [f"### {captions[key]}", "", f"![{captions[key]}]({path.name})", ""]
    lines += ["EDC pAUC (seed 0): " + ", ".join(f"{k} {v:.4f}" for k, v in paucs.items()) + ". The pAUC also "
              "carries each model's FNMR before any discard, so it mixes recognition with quality ranking; "
              "compare each curve's fall with its own start, and with the oracle's.", ""]
    return "\n".join(lines)
