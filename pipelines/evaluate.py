"""Evaluate a MagFace checkpoint: IJB-B/C 1:1 TAR@FAR under named conventions (default: insightface's
eval_ijbc.py with its defaults, and MagFace+), .bin verification (with the mirrored image, as insightface),
quality ERC and EDC, clustering; each benchmark a Ray task, results to MLflow.

    python pipelines/evaluate.py --checkpoint PATH --benchmarks ijbb,ijbc,lfw,cfp_fp,agedb_30 --data-root ROOT
    python pipelines/evaluate.py            # the newest demo checkpoint, on the synthetic sets

ROOT is a local folder or s3://bucket/prefix (mirrored to a local cache first). Submit to a cluster with
`ray job submit -- python pipelines/evaluate.py ...`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magface.evaluation.runner import BENCHMARKS, SYNTHETIC_BENCHMARKS, evaluate  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory holding model.pt (default: the newest MagFace-loss "
                                        "checkpoint under --runs-root, see --run)")
    p.add_argument("--run", default=None, metavar="NAME",
                   help="evaluate the newest checkpoint of the job folders named NAME* under --runs-root, e.g. "
                        "demo_magface or demo_arcface (default: the newest MagFace-loss checkpoint)")
    p.add_argument("--runs-root", default=None,
                   help="where to look for the newest checkpoint (default: the demo's $MAGFACE_CACHE/runs)")
    p.add_argument("--benchmarks", default=None,
                   help=f"comma-separated, from {','.join(BENCHMARKS)} (default without --checkpoint: "
                        f"{','.join(SYNTHETIC_BENCHMARKS)})")
    p.add_argument("--data-root", help="folder or s3:// prefix with the .bin sets and IJB layouts "
                                       "(default: the checkpoint config's eval.data_root)")
    p.add_argument("--run-id", help="MLflow run id of the training run; results go to a child run")
    p.add_argument("--experiment", default="magface", help="MLflow experiment for a new run")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--conventions", default="insightface,magface_plus",
                   help="IJB template conventions, comma-separated from insightface (arcface_torch eval_ijbc.py), "
                        "magface, magface_plus (MagFace eval_ijb.py qlt=0/1); see docs/conventions.md")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="no mirrored image: insightface's F1 only (default F1 + F2, as its IJB and .bin scripts)")
    p.add_argument("--no-norm-score", dest="norm_score", action="store_false",
                   help="insightface convention: unit image features (default: keep their norms, N1)")
    p.add_argument("--no-detector-score", dest="detector_score", action="store_false",
                   help="insightface convention: no faceness weighting (default: weight by it, D1)")
    p.add_argument("--batch-size", type=int, default=128, help="images per embedding batch")
    p.add_argument("--pool-size", type=int, default=None, help="embedding actors (default: one per GPU)")
    p.add_argument("--on-bad-image", choices=("skip", "raise"), default="raise",
                   help="an undecodable image: stop (raise) or count and skip (landmarks outside the image are aligned as OpenCV would, and counted)")
    p.add_argument("--out", help="also write the results as JSON into this folder")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parse_args(argv)
    benchmarks = a.benchmarks or (",".join(SYNTHETIC_BENCHMARKS) if not a.checkpoint else None)
    if benchmarks is None:
        raise SystemExit("--benchmarks is required with --checkpoint")
    return evaluate(a.checkpoint, benchmarks, a.data_root, run_id=a.run_id, conventions=a.conventions,
                    flip=a.flip, norm_score=a.norm_score, detector_score=a.detector_score,
                    batch_size=a.batch_size, on_bad_image=a.on_bad_image,
                    pool_size=a.pool_size, tracking=not a.no_tracking, experiment=a.experiment,
                    runs_root=a.runs_root, out_dir=a.out, run=a.run)


if __name__ == "__main__":
    from magface.cluster import ClusterError
    from magface.evaluation.ijb import BadImageError, ProtocolError

    try:
        main()
    except (ProtocolError, BadImageError, FileNotFoundError, ClusterError) as e:  # the message says what to do
        raise SystemExit(f"evaluate: {e}") from None
