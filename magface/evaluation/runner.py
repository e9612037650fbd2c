"""Run evaluation benchmarks on Ray and report them to MLflow.

Phases: (1) the driver reads every protocol / .bin set the chosen benchmarks need (bad files fail here,
before any compute); (2) ONE Ray Data pipeline embeds the union of their images with one actor pool, so
benchmarks sharing a set (quality, cluster, synth_*) embed it once; (3) each benchmark runs as its own Ray
task, in parallel, on the features (templates, scores, metrics, curves); (4) the driver logs metrics, JSON/CSV
tables and PNG plots to one MLflow run (a child of the training run when run_id is given) and prints a
table shaped like the paper's Tables 2/3.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magface.evaluation.features import Extracted
from magface.tracking import flatten

log = logging.getLogger(__name__)

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IJB_SETS = {"ijbb": "IJBB", "ijbc": "IJBC", "synth_ijb": "SYNTH"}
BIN_SETS = {"lfw": "lfw", "cfp_fp": "cfp_fp", "agedb_30": "agedb_30", "synth_verify": "synth"}
BENCHMARKS = tuple(IJB_SETS) + tuple(BIN_SETS) + ("quality", "cluster")
SYNTHETIC_BENCHMARKS = ("synth_ijb", "synth_verify", "quality", "cluster")


# ---------------------------------------------------------------------------------------- locating inputs
def default_runs_root() -> Path:
    """Where the demo (`python pipelines/train.py`) keeps its runs: <demo cache>/runs."""
    from magface.train.demo import cache_dir

    return cache_dir() / "runs"


def find_latest_checkpoint(root: str | os.PathLike | None = None, run: str | None = None) -> Path:
    """The checkpoint evaluate.py uses by default: under root (default: the demo's runs), among complete
    checkpoints (a directory holding model.pt whose completion manifests check out, `is_complete`), the newest
    (model.pt mtime) of a MagFace-loss model (the demo also trains an ArcFace baseline, which is rarely what is
    meant); the newest of any loss if there is none. `run`: only checkpoints of job folders named `run` or
    starting with it (e.g. "demo_magface" for the demo's demo_magface_<time> jobs)."""
    from magface.checkpoint import completeness, read_model_summary
    from magface.losses import MAG_KINDS

    root = Path(root).expanduser() if root is not None else default_runs_root()
    found = [p.parent for p in root.rglob("model.pt")] if root.is_dir() else []
    if run:
        runs = sorted({d.relative_to(root).parts[0] for d in found if d != root})
        found = [d for d in found if d != root and d.relative_to(root).parts[0].startswith(run)]
        if not found:
            raise FileNotFoundError(f"no checkpoint of a run named {run!r}* under {root}; runs there: "
                                    f"{', '.join(runs) or 'none'}")
    if not found:
        raise FileNotFoundError(f"no checkpoint (a directory holding model.pt) under {root}; train the demo "
                                f"first (pipelines/train.py) or pass --checkpoint")
    state = {d: completeness(d) for d in found}
    complete = [d for d in found if state[d][0] == "complete"]
    if not complete:
        why = "; ".join(sorted(w for _, w in state.values())[:3])
        raise FileNotFoundError(f"no complete checkpoint under {root}: {len(found)} folder(s) hold model.pt but none "
                                f"has complete completion manifests ({why}); pass --checkpoint DIR to use one anyway")
    newest_first = sorted(complete, key=lambda d: (d / "model.pt").stat().st_mtime, reverse=True)
    for d in newest_first:
        try:
            if read_model_summary(d)["loss"] in MAG_KINDS:
                return d
        except ValueError:
            continue
    log.warning("no MagFace-loss checkpoint under %s; using the newest checkpoint, %s", root, newest_first[0])
    return newest_first[0]


def parse_benchmarks(spec) -> list[str]:
    names = [b.strip() for b in (spec.split(",") if isinstance(spec, str) else spec) if b.strip()]
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(f"unknown benchmark(s) {unknown or spec!r}; known: {', '.join(BENCHMARKS)}")
    return list(dict.fromkeys(names))


def bin_path(root: Path, name: str) -> Path:
    """<root>/<name>.bin or <root>/verify/<name>.bin (insightface keeps them beside the training shards)."""
    for p in (root / f"{name}.bin", root / "verify" / f"{name}.bin"):
        if p.is_file():
            return p
    raise FileNotFoundError(f"verification set {name}.bin not found under {root} or {root / 'verify'}")


def read_known_quality(path: Path, names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(q, identity) per image from a synthetic set's quality file (magface.data.synthetic writes
    `index,identity,quality` for .bin sets and `image_name,identity,quality` for IJB sets). With `names`, rows
    are matched by image name; else they must be in image order. Errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"quality file {path} not found (written by magface.data.synthetic)")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    qcol = next((c for c in ("quality", "q") if rows and c in rows[0]), None)
    if qcol is None:
        raise ValueError(f"{path}:1: expected a header with a 'quality' column")
    q = np.empty(len(rows), np.float64)
    ident = np.full(len(rows), -1, np.int64)
    for i, r in enumerate(rows):
        try:
            q[i] = float(r[qcol])
            if "identity" in r:
                ident[i] = int(r["identity"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{i + 2}: expected numbers, got {r[qcol]!r}, {r.get('identity')!r}") from None
    key = next((k for k in ("image_name", "image", "name") if k in rows[0]), None)
    if names is not None and key is not None:
        pos = {Path(r[key]).name: i for i, r in enumerate(rows)}
        missing = [n for n in names if Path(n).name not in pos]
        if missing:
            raise ValueError(f"{path}: no quality for {len(missing)} image(s), e.g. {missing[0]!r}")
        order = np.array([pos[Path(n).name] for n in names])
        q, ident = q[order], ident[order]
    elif names is not None and len(q) != len(names):
        raise ValueError(f"{path}: {len(q)} rows but the set has {len(names)} images")
    return q, (ident if "identity" in rows[0] else None)


def needed_sets(names: list[str]) -> list[tuple[str, str]]:
    """The data sets the benchmarks read, each once: ("ijb", NAME) or ("bin", name)."""
    needed: list[tuple[str, str]] = []
    for b in names:
        if b in IJB_SETS:
            needed.append(("ijb", IJB_SETS[b]))
        elif b in BIN_SETS:
            needed.append(("bin", BIN_SETS[b]))
        elif b == "quality":
            needed += [("bin", "synth"), ("ijb", "SYNTH")]
        elif b == "cluster":
            needed.append(("ijb", "SYNTH"))
    return list(dict.fromkeys(needed))


def local_data_root(data_root: str, sets: list[tuple[str, str]], cache_dir: str | None = None) -> Path:
    """A local folder for data_root. An s3:// root is mirrored into a local cache first, only the sets named
    (an IJB folder, or a .bin with its q file); files already cached with the same size are not fetched again."""
    if not str(data_root).startswith("s3://"):
        return Path(data_root).expanduser()
    from magface.data import storage

    cache = Path(cache_dir or os.environ.get("MAGFACE_CACHE", "~/.cache/magface")).expanduser()
    dest = cache / str(data_root)[len("s3://"):].strip("/")
    for kind, name in sets:
        if kind == "ijb":
            rel = next((r for r in (name, f"ijb/{name}") if storage.exists(
                storage.join(data_root, r, "meta", f"{name.lower()}_face_tid_mid.txt"))), None)
            if rel is None:
                raise FileNotFoundError(f"IJB set {name} not found under {data_root} (looked for {name}/meta and "
                                        f"ijb/{name}/meta)")
            storage.download_tree(storage.join(data_root, rel), dest / rel)
            continue
        for rel in (f"{name}.bin", f"verify/{name}.bin"):
            if storage.exists(storage.join(data_root, rel)):
                for f in (rel, rel[:-len(".bin")] + "_quality.csv"):
                    uri, target = storage.join(data_root, f), dest / f
                    if storage.exists(uri) and not (target.exists() and target.stat().st_size == storage.size(uri)):
                        with storage.atomic_write(target) as fh:
                            fh.write(storage.read_bytes(uri))
                break
        else:
            raise FileNotFoundError(f"verification set {name}.bin not found under {data_root} or {data_root}/verify")
    return dest


# ---------------------------------------------------------------------------------------- benchmark tasks
@dataclass
class _Source:
    key: tuple
    table: object  # pyarrow table of images
    meta: dict  # protocol / issame / q / labels


def _load_sources(names: list[str], root: Path) -> dict[tuple, _Source]:
    """Read every protocol and .bin the benchmarks need, once each."""
    from magface.data.binfile import load_bin
    from magface.evaluation.features import image_table
    from magface.evaluation.ijb import find_ijb_dir, protocol_images, read_protocol

    sources = {}
    for key in needed_sets(names):
        kind, name = key
        if kind == "ijb":
            proto = read_protocol(find_ijb_dir(root, name), name.lower())
            meta = {"protocol": proto}
            q_file = proto.set_dir / "meta" / f"{proto.name}_quality.csv"
            if q_file.is_file():  # synthetic sets: known quality and identity per image
                meta["q"], meta["subjects"] = read_known_quality(q_file, proto.images)
            sources[key] = _Source(key, protocol_images(proto), meta)
        else:
            path = bin_path(root, name)
            images, issame = load_bin(path)
            where = [f"{path} (image {i})" for i in range(len(images))]
            meta = {"issame": np.asarray(issame, bool), "path": path}
            q_file = path.with_name(f"{name}_quality.csv")
            if q_file.is_file():
                meta["q"] = read_known_quality(q_file, [f"{i}" for i in range(len(images))])[0]
            sources[key] = _Source(key, image_table(data=images, where=where), meta)
    return sources


def _verification_task(name: str, ext: Extracted, issame: np.ndarray, flip: bool) -> dict:
    """insightface's verification.py: 10-fold accuracy on normalise(F1 + F2) (F1 alone without flip); the
    quality curves rank pairs by |F1|, the magnitude the loss trained."""
    from magface.evaluation.metrics import roc_points
    from magface.evaluation.verification import verification_accuracy

    ok = ext.valid[0::2] & ext.valid[1::2]  # pairs with a skipped image (--on-bad-image skip) are left out
    feats, _ = ext.fused(flip)
    e1, e2, issame = feats[0::2][ok], feats[1::2][ok], issame[ok]
    mean, std, details = verification_accuracy(e1, e2, issame, n_folds=10)
    scores = np.sum(e1 * e2, axis=1)
    q1, q2 = ext.magnitudes[0::2][ok], ext.magnitudes[1::2][ok]
    # the paper's Figure 6: FNMR at FMR=1e-3 after rejecting the pairs of lowest magnitude
    erc = _erc(scores, issame, q1, q2)
    metrics = {f"{name}.accuracy": mean, f"{name}.accuracy_std": std, f"{name}.erc_auc": erc["auc"]}
    edc = _edc(scores, issame, q1, q2, name, metrics)
    return {"kind": "verification", "name": name, "erc": {"magnitude": erc}, "edc": {"magnitude": edc},
            "metrics": metrics,
            "table": {"accuracy": mean, "accuracy_std": std, "fold_accuracy": details["fold_accuracy"],
                      "best_threshold": details["best_threshold"], "n_pairs": int(len(issame)),
                      "n_pairs_dropped": int((~ok).sum()), "flip": flip, "edc_pauc": edc["pauc"],
                      "n_failed_images": len(ext.failures)},
            "roc": {name: roc_points(scores, issame)}, "magnitudes": ext.magnitudes[ext.valid]}


def _edc(scores, labels, q1, q2, prefix: str, metrics: dict) -> dict:
    """EDC (ISO/IEC 29794-1) at FMR 1e-3 and 1e-4; pAUCs at 20% / 30% discard go into `metrics` as
    `<prefix>.edc_pauc<limit %>_fmr_<fmr>`."""
    from magface.evaluation.quality import edc_report

    rep = edc_report(scores, labels, q1, q2)
    for fmr, by_limit in rep["pauc"].items():
        for lim, v in by_limit.items():
            metrics[f"{prefix}.edc_pauc{round(100 * lim)}_fmr_{_far_str(fmr)}"] = v
    return rep


def _template_quality(protocol, ext: Extracted, t_ids: np.ndarray) -> np.ndarray:
    """Mean |F1| of each template's usable images, for the templates `t_ids` (0 where none is usable)."""
    tids = protocol.template_ids[ext.valid]
    rows = np.searchsorted(t_ids, tids)
    ok = (rows < t_ids.size) & (t_ids[np.minimum(rows, t_ids.size - 1)] == tids)
    total = np.bincount(rows[ok], weights=ext.magnitudes[ext.valid][ok], minlength=t_ids.size)
    count = np.bincount(rows[ok], minlength=t_ids.size)
    return np.divide(total, count, out=np.zeros(t_ids.size), where=count > 0)


def _ijb_task(name: str, protocol, ext: Extracted, conventions) -> dict:
    from magface.evaluation.ijb import ijb_verification
    from magface.evaluation.metrics import roc_points

    res = ijb_verification(protocol, ext.features, ext.magnitudes, ext.valid, flip_features=ext.flip_features,
                           flip_magnitudes=ext.flip_magnitudes, conventions=conventions, fars=FARS)
    metrics = {}
    for conv, by_tie in res["tar_at_far"].items():
        for tie, tars in by_tie.items():
            for far, tar in tars.items():
                suffix = "" if tie == "nearest" else ".strict"
                metrics[f"{name}.{conv}.tar_far_{_far_str(far)}{suffix}"] = tar
    # EDC on template pairs: a template's quality is the mean magnitude of its images, a pair's the min
    t_ids = np.unique(protocol.template_ids)
    tq = _template_quality(protocol, ext, t_ids)
    pq = np.minimum(tq[np.searchsorted(t_ids, protocol.pairs[:, 0])], tq[np.searchsorted(t_ids, protocol.pairs[:, 1])])
    edc = {conv: _edc(s, res["labels"], pq, None, f"{name}.{conv}", metrics) for conv, s in res["scores"].items()}
    n_outside = int(ext.landmarks_outside.sum()) if ext.landmarks_outside is not None else 0
    metrics[f"{name}.landmarks_outside"] = n_outside
    table = {k: v for k, v in res.items() if k not in ("scores", "labels")}
    table["n_failed_images"] = len(ext.failures)
    table["n_landmarks_outside"] = n_outside  # aligned as OpenCV would, as the reference scripts do
    table["edc_pauc"] = {conv: r["pauc"] for conv, r in edc.items()}
    return {"kind": "ijb", "name": name, "metrics": metrics, "table": table, "edc": edc,
            "roc": {conv: roc_points(s, res["labels"]) for conv, s in res["scores"].items()},
            "magnitudes": ext.magnitudes[ext.valid]}


def _quality_task(verify: Extracted, issame: np.ndarray, q_verify, ijb: Extracted | None, q_ijb) -> dict:
    from scipy.stats import spearmanr

    f = verify.features
    scores = np.sum(f[0::2] * f[1::2], axis=1)
    mags = verify.magnitudes
    ok = verify.valid[0::2] & verify.valid[1::2]
    curves = {"magnitude": _erc(scores[ok], issame[ok], mags[0::2][ok], mags[1::2][ok])}
    metrics = {}
    if q_verify is not None:
        q = np.asarray(q_verify)
        curves["known q (oracle)"] = _erc(scores[ok], issame[ok], q[0::2][ok], q[1::2][ok])
        metrics["quality_spearman"] = float(spearmanr(mags[verify.valid], q[verify.valid]).statistic)
    if ijb is not None and q_ijb is not None:
        metrics["quality_spearman_ijb"] = float(spearmanr(ijb.magnitudes[ijb.valid],
                                                          np.asarray(q_ijb)[ijb.valid]).statistic)
    edc = {}
    for label, c in curves.items():
        key = "magnitude" if label == "magnitude" else "known_q"
        metrics[f"quality.erc_auc.{key}"] = c["auc"]
        qa = mags if label == "magnitude" else np.asarray(q_verify)
        edc[label] = _edc(scores[ok], issame[ok], qa[0::2][ok], qa[1::2][ok], f"quality.{key}", metrics)
    return {"kind": "quality", "name": "quality", "metrics": metrics,
            "table": {"erc": curves, "edc_pauc": {k: r["pauc"] for k, r in edc.items()}, **metrics},
            "erc": curves, "edc": edc, "magnitudes": mags[verify.valid],
            "q": None if q_verify is None else np.asarray(q_verify)}


def _erc(scores, labels, q1, q2) -> dict:
    """ERC over the standard reject fractions, cut short where a small set runs out of genuine or impostor
    pairs (the full 0..95% range needs both classes among the best 5%)."""
    from magface.evaluation.quality import DEFAULT_REJECT_FRACTIONS, error_versus_reject

    fractions = list(DEFAULT_REJECT_FRACTIONS)
    while True:
        try:
            return error_versus_reject(scores, labels, q1, q2, reject_fractions=fractions)
        except ValueError:
            if len(fractions) <= 2:
                raise
            fractions.pop()


def _cluster_task(ext: Extracted, subjects: np.ndarray) -> dict:
    from magface.evaluation.clustering import cluster_report

    keep = ext.valid & (subjects >= 0)
    report = cluster_report(ext.features[keep], ext.magnitudes[keep], subjects[keep])
    mvc = report.pop("magnitude_vs_center")
    for r in report.values():
        r.pop("labels", None)
    report["magnitude_vs_center_spearman"] = mvc["spearman"]
    metrics = {f"cluster.{k}": float(v) for k, v in flatten(report).items()
               if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
    return {"kind": "cluster", "name": "cluster", "metrics": metrics, "table": report,
            "magnitudes": ext.magnitudes[keep], "magnitude_vs_center": mvc}


def _far_str(far: float) -> str:
    """1e-4 -> '1e-4' (MLflow metric names cannot hold '@' or '=')."""
    e = np.log10(far)
    return f"1e{int(round(e))}" if abs(e - round(e)) < 1e-9 else f"{far:g}"


# ---------------------------------------------------------------------------------------- the entry
def evaluate(checkpoint=None, benchmarks=SYNTHETIC_BENCHMARKS, data_root=None, *, run_id: str | None = None,
             conventions=None, flip: bool = True, norm_score: bool = True, detector_score: bool = True,
             batch_size: int = 128, on_bad_image: str = "raise", pool_size: int | None = None, use_gpu: bool | None = None, tracking: bool = True,
             experiment: str = "magface", runs_root: str | None = None, out_dir: str | None = None,
             show: bool = True, run: str | None = None) -> dict:
    """Evaluate a checkpoint on the named benchmarks; returns {"metrics", "tables", "checkpoint", "mlflow_run_id"}.

    checkpoint None: `find_latest_checkpoint(runs_root, run)` (the newest MagFace checkpoint of the demo's runs,
    or of the job folders named `run`*). data_root None: the checkpoint's eval.data_root.
    run_id: the training run; results go to a child run of it (else a new top-level run).
    conventions: IJB template conventions (default insightface + magface_plus, docs/conventions.md); flip,
    norm_score, detector_score: insightface's switches, on by default as in its scripts (flip also makes .bin
    verification use F1 + F2, as insightface's verification.py does).
    """
    import ray

    from magface.evaluation.ijb import DEFAULT_CONVENTIONS, parse_conventions

    from magface.evaluation.features import concat_tables, extract_features, input_size, ray_init_if_needed

    # a str, not a Path: Path() would fold s3://bucket/... into s3:/bucket/...
    checkpoint = str(checkpoint) if checkpoint else str(find_latest_checkpoint(runs_root, run))
    if "://" not in checkpoint:
        checkpoint = str(Path(checkpoint).expanduser().resolve())
    names = parse_benchmarks(benchmarks)
    convs = parse_conventions(conventions or DEFAULT_CONVENTIONS, norm_score=norm_score,
                              detector_score=detector_score, flip=flip)
    if not flip and any(c.flip for c in convs):  # an explicit Convention object asking for flip
        raise ValueError("a convention with flip needs flip=True (the mirrored images are embedded only then)")
    from magface.checkpoint import load_model_file, model_summary

    payload = load_model_file(checkpoint)
    model = model_summary(payload)
    print(f"[evaluate] checkpoint {checkpoint}\n[evaluate] model: {model['loss']} loss, {model['backbone']}, "
          f"epoch {model['epoch']} step {model['step']}, pixel convention {model['convention']}", flush=True)
    if data_root is None:
        data_root = ((payload.get("config") or {}).get("eval") or {}).get("data_root")
        if not data_root:
            raise ValueError(f"no data root: pass --data-root (the checkpoint {checkpoint} names none in eval.data_root)")
    root = local_data_root(str(data_root), needed_sets(names))
    sources = _load_sources(names, root)

    ray_init_if_needed()
    size = input_size(str(checkpoint))
    table, offsets = concat_tables([s.table for s in sources.values()])
    log.info("embedding %d images from %d set(s) at %dx%d", len(table), len(sources), size, size)
    ext = extract_features(table, str(checkpoint), image_size=size, batch_size=batch_size, pool_size=pool_size,
                           use_gpu=use_gpu, flip=flip, on_bad_image=on_bad_image)
    n_failed = len(ext.failures)
    parts = {key: ray.put(ext.slice(offsets[i], offsets[i + 1])) for i, key in enumerate(sources)}
    del ext, table
    metas = ray.put({key: s.meta for key, s in sources.items()})  # protocols: stored once, shared by tasks
    del sources
    del payload

    task = ray.remote(num_cpus=1)(_run_one)  # retried by Ray if its worker dies (OOM kill), not on errors
    futures = {b: task.remote(b, metas, parts, convs, flip) for b in names}
    results, failed = {}, {}
    for b, f in futures.items():  # one failing benchmark does not lose the others' results
        try:
            results[b] = ray.get(f)
        except Exception as e:  # noqa: BLE001 - reported below and re-raised after logging
            failed[b] = f"{type(e).__name__}: {getattr(e, 'cause', None) or e}"
            log.error("benchmark %s failed: %s", b, failed[b])

    metrics = {k: v for r in results.values() for k, v in r["metrics"].items()}
    tables = {b: r["table"] for b, r in results.items()}
    metrics["failed_images"] = n_failed
    text = (f"Checkpoint {checkpoint}\n({model['loss']} loss, {model['backbone']}, epoch {model['epoch']}, "
            f"pixel convention {model['convention']})\n\n" + format_table(results, checkpoint))
    if show:
        print(text)
    mlflow_run = _log(results, metrics, tables, text, checkpoint, names, run_id, experiment, tracking, model,
                      {"flip": flip, "norm_score": norm_score, "detector_score": detector_score,
                       "conventions": ",".join(c.name for c in convs), "batch_size": batch_size, "on_bad_image": on_bad_image,
                       "data_root": str(data_root), "checkpoint": str(checkpoint), "benchmarks": ",".join(names),
                       "input_size": size, "loss": model["loss"], "backbone": model["backbone"]}, failed)
    if failed:
        raise RuntimeError(f"benchmark(s) failed: {failed} (the others were logged to MLflow run {mlflow_run})")
    out = {"metrics": metrics, "tables": _jsonable(tables), "checkpoint": str(checkpoint),
           "mlflow_run_id": mlflow_run, "table_text": text}
    if out_dir:
        from magface.tracking import write_json_atomic

        write_json_atomic(Path(out_dir) / "evaluation.json", out)
    return out


def _run_one(bench: str, metas: dict, parts: dict, conventions, flip: bool) -> dict:
    """One benchmark, as a Ray task. `metas` (protocols, labels, q) arrives resolved; the features of each set
    are object refs inside `parts`, fetched only for the sets this benchmark reads."""
    import ray

    def get(key):
        return ray.get(parts[key])

    if bench in IJB_SETS:
        key = ("ijb", IJB_SETS[bench])
        return _ijb_task(bench, metas[key]["protocol"], get(key), conventions)
    if bench in BIN_SETS:
        key = ("bin", BIN_SETS[bench])
        return _verification_task(bench, get(key), metas[key]["issame"], flip)
    if bench == "quality":
        v, i = ("bin", "synth"), ("ijb", "SYNTH")
        return _quality_task(get(v), metas[v]["issame"], metas[v].get("q"), get(i), metas[i].get("q"))
    if bench == "cluster":
        key = ("ijb", "SYNTH")
        if metas[key].get("subjects") is None:
            raise ValueError(f"cluster: no identity labels (an 'identity' column in "
                             f"{metas[key]['protocol'].set_dir}/meta/synth_quality.csv)")
        return _cluster_task(get(key), metas[key]["subjects"])
    raise ValueError(f"unknown benchmark {bench!r}")


# ---------------------------------------------------------------------------------------- reporting
def format_table(results: dict, checkpoint) -> str:
    """Paper-style table (Tables 2/3): one row per method, TAR@FAR=1e-6..1e-1 per IJB set; then .bin accuracies
    and the other benchmarks' headline numbers."""
    lines = []
    method = Path(checkpoint).name
    for name, r in results.items():
        if r["kind"] != "ijb":
            continue
        lines.append(f"{name.upper()} 1:1 verification, TAR (%) @ FAR (nearest ROC point, as published); "
                     f"[convention] as in docs/conventions.md; EDC pAUC to 20% discard at FMR 1e-3")
        lines.append(f"{'Method [convention]':<44}" + "".join(f"{_far_str(f):>9}" for f in FARS)
                     + f"{'EDC pAUC20':>12}")
        for conv, by_tie in r["table"]["tar_at_far"].items():
            row = by_tie["nearest"]
            label = f"{method[:44 - len(conv) - 4]} [{conv}]"
            pauc = r["table"].get("edc_pauc", {}).get(conv, {}).get(1e-3, {}).get(0.2)
            lines.append(f"{label:<44}" + "".join(f"{100 * row[f]:9.2f}" for f in FARS)
                         + (f"{pauc:12.4f}" if pauc is not None else ""))
        lines.append("")
    others = [(k, v) for r in results.values() if r["kind"] != "ijb" for k, v in r["metrics"].items()
              if ".edc_pauc" not in k or "_fmr_1e-3" in k]
    if others:
        lines.append("Other benchmarks")
        lines += [f"  {k:<40} {v:.4f}" for k, v in others]
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 10000 else f"<array {obj.shape}>"
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _tar_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["benchmark", "convention", "ties"] + [_far_str(f) for f in FARS])
    for name, r in results.items():
        if r["kind"] == "ijb":
            for conv, by_tie in r["table"]["tar_at_far"].items():
                for tie, row in by_tie.items():
                    w.writerow([name, conv, tie] + [f"{row[f]:.6f}" for f in FARS])
    return buf.getvalue()


def _log(results, metrics, tables, text, checkpoint, names, run_id, experiment, enabled, model, params,
         failed) -> str | None:
    from magface.evaluation import plots
    from magface.tracking import Tracker

    where = Path(checkpoint) if "://" not in str(checkpoint) else Path(str(checkpoint).split("://", 1)[1])
    label = f"{model['loss']} {model['backbone']}"
    desc = (f"Evaluation of `{checkpoint}` ({label}, epoch {model['epoch']}, step {model['step']}, pixel "
            f"convention {model['convention']}) on {', '.join(names)}.")
    tracker = Tracker.start(f"eval {label} {where.parent.name}/{where.name} on {'+'.join(names)}",
                            experiment=experiment, params=params, parent_run_id=run_id, description=desc,
                            tags={"magface.kind": "evaluation", "checkpoint_path": str(checkpoint),
                                  "loss": model["loss"], "backbone": model["backbone"]}, enabled=enabled)
    if not tracker.enabled:
        return None
    _log_eval_inputs(tracker, params.get("data_root"), names)
    tracker.log_metrics(metrics)
    if failed:
        tracker.set_tags({"failed_benchmarks": ",".join(failed)})
        tracker.log_dict(failed, "evaluation/errors.json")
    tracker.log_dict(_jsonable(tables), "evaluation/tables.json")
    tracker.log_text(_tar_csv(results), "evaluation/tar_at_far.csv")
    tracker.log_text(text, "evaluation/table.txt")
    for name, r in results.items():
        figs = {}
        if r.get("roc"):
            figs["roc"] = plots.roc_figure(r["roc"], title=f"{name} ROC, {label} ({model['convention']})")
        if r.get("erc"):
            figs["erc"] = plots.erc_figure(r["erc"], title=f"{name} ERC, {label}")
        if r.get("edc"):
            figs["edc"] = plots.edc_figure({f"{label}, FMR {_far_str(fmr)}": c for label, rep in r["edc"].items()
                                            for fmr, c in rep["curves"].items()},
                                           title=f"{name} EDC (ISO/IEC 29794-1), {label}")
        if r.get("magnitudes") is not None and len(r["magnitudes"]):
            figs["magnitudes"] = plots.magnitude_histogram(r["magnitudes"], title=f"{name} magnitudes, {label}",
                                                           bounds=_bounds(model))
        if r.get("magnitude_vs_center"):
            figs["magnitude_vs_center"] = plots.magnitude_center_figure(
                r["magnitude_vs_center"], title=f"{label}: magnitude vs distance to centre")
        for kind, fig in figs.items():
            tracker.log_figure(fig, f"plots/{name}_{kind}.png")
    tracker.end("FAILED" if failed else "FINISHED")
    return tracker.run_id


def _bounds(model: dict) -> dict | None:
    """The loss's magnitude range [l_a, u_a] for histogram lines (MagFace kinds only)."""
    from magface.losses import MAG_KINDS

    m = model.get("magnitude_range")
    return {"l_a": m[0], "u_a": m[1]} if m and None not in m and model["loss"] in MAG_KINDS else None


def _log_eval_inputs(tracker, data_root, names) -> None:
    """Each evaluation set as a run input (context "evaluation"), with a digest of its files (best effort)."""
    from magface.data import storage
    from magface.tracking import dataset_digest

    for kind, name in needed_sets(names) if data_root else ():
        try:
            if kind == "ijb":
                src, files = next((storage.join(data_root, r), f) for r in (f"{name}/meta", f"ijb/{name}/meta")
                                  if (f := _files(storage.join(data_root, r))))
            else:
                src = next(u for r in (f"{name}.bin", f"verify/{name}.bin")
                           if storage.exists(u := storage.join(data_root, r)))
                files = [src]
            tracker.log_dataset(name, src, dataset_digest(files), context="evaluation")
        except Exception as e:  # noqa: BLE001 - a missing input entry must not fail an evaluation
            log.info("not logging evaluation set %s as a run input: %s", name, e or type(e).__name__)


def _files(prefix: str) -> list[str]:
    from magface.data import storage

    try:
        return storage.list_files(prefix)
    except Exception:  # noqa: BLE001 - not there
        return []
