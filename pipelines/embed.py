"""Embed a set of face images with a trained checkpoint and score their quality (MagFace's magnitude), on Ray.

    python pipelines/embed.py --checkpoint RUN/checkpoint_epoch006_step00000672 --input faces/ --output emb/
    python pipelines/embed.py --checkpoint s3://bucket/runs/job/checkpoint_x --input s3://bucket/shards \
        --output s3://bucket/embeddings --threshold 18

--input: a folder (or s3:// prefix) of aligned face crops (subfolders are identity labels), or RecordIO
shards (.rec with .idx, a folder/prefix holding them, as pipelines/convert.py writes). Images must have the
model's input size (--resize otherwise). --output gets Parquet parts (path or shard+key, label, embedding
(unit, float32 list), magnitude, error), _summary.json and _quality_histogram.png. Submit to a cluster with
`ray job submit --working-dir . -- python pipelines/embed.py ...`; GPUs are used when the cluster has them.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from magface.batch_embed import EmbedInputError, embed, format_summary  # noqa: E402
from magface.cluster import ClusterError, connect  # noqa: E402
from magface.console import quiet_ray  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or s3:// prefix) holding model.pt")
    p.add_argument("--input", required=True, help="image folder or RecordIO shards, local or s3://")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for the Parquet parts and summary")
    p.add_argument("--threshold", type=float, default=None,
                   help="report (and list in _summary.json) the images whose magnitude is below this value")
    p.add_argument("--resize", action="store_true", help="resize images of another size to the model's input")
    p.add_argument("--on-bad-image", choices=("skip", "raise"), default="skip",
                   help="an undecodable image: keep its row with the error and go on (skip), or stop (raise)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call")
    p.add_argument("--actors", type=int, default=None,
                   help="model replicas (default: one per GPU, else one per CPU but one)")
    p.add_argument("--cpus-per-actor", type=int, default=1, help="CPU threads per model replica (CPU only)")
    p.add_argument("--overwrite", action="store_true", help="replace the Parquet parts of an earlier run in --output")
    p.add_argument("--address", help="join the Ray cluster at this address (default: RAY_ADDRESS if set, else a "
                                     "private local Ray)")
    p.add_argument("--verbose", action="store_true", help="Ray Data's own progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.batch_size < 1 or (args.actors is not None and args.actors < 1) or args.cpus_per_actor < 1:
        raise SystemExit("embed: --batch-size, --actors and --cpus-per-actor must be >= 1")
    quiet_ray(args.verbose)
    connect(address=args.address, dashboard=False)
    result = embed(args.checkpoint, args.input, args.output, batch_size=args.batch_size, actors=args.actors,
                   cpus_per_actor=args.cpus_per_actor, resize=args.resize, on_bad_image=args.on_bad_image,
                   threshold=args.threshold, overwrite=args.overwrite)
    print(format_summary(result), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (EmbedInputError, ClusterError, FileNotFoundError) as e:  # the message says what to do
        raise SystemExit(f"embed: {e}") from None
