"""Evaluate a MagFace checkpoint: IJB-B/C 1:1 TAR@FAR (MagFace and MagFace+), .bin verification, quality ERC,
clustering; each benchmark a Ray task, results to MLflow.

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
    p.add_argument("--checkpoint", help="checkpoint directory holding model.pt (default: newest under --runs-root)")
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
    p.add_argument("--flip", action="store_true", help="flip fusion: sum features of image and mirror")
    p.add_argument("--faceness", action="store_true", help="weight IJB images by the detector score")
    p.add_argument("--batch-size", type=int, default=128, help="images per embedding batch")
    p.add_argument("--pool-size", type=int, default=None, help="embedding actors (default: one per GPU)")
    p.add_argument("--on-bad-image", choices=("skip", "raise"), default="raise",
                   help="an undecodable image or landmarks outside it: stop (raise) or count and skip")
    p.add_argument("--out", help="also write the results as JSON into this folder")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parse_args(argv)
    benchmarks = a.benchmarks or (",".join(SYNTHETIC_BENCHMARKS) if not a.checkpoint else None)
    if benchmarks is None:
        raise SystemExit("--benchmarks is required with --checkpoint")
    return evaluate(a.checkpoint, benchmarks, a.data_root, run_id=a.run_id, flip=a.flip,
                    batch_size=a.batch_size, on_bad_image=a.on_bad_image, faceness=a.faceness,
                    pool_size=a.pool_size, tracking=not a.no_tracking, experiment=a.experiment,
                    runs_root=a.runs_root, out_dir=a.out)


if __name__ == "__main__":
    from magface.evaluation.ijb import BadImageError, ProtocolError

    try:
        main()
    except (ProtocolError, BadImageError, FileNotFoundError) as e:  # bad input: the message says where
        raise SystemExit(f"evaluate: {e}") from None
