"""Convert face data to MXNet RecordIO shards (insightface's MS1MV2 layout), in parallel on Ray.

    python pipelines/convert.py folder IMAGES_DIR OUT_DIR --shards 8          # one subfolder per identity
    python pipelines/convert.py split faces_emore/train.rec OUT_DIR --shards 64   # local or s3:// source
    python pipelines/convert.py folder IMAGES_DIR OUT_DIR --shards 8 --upload s3://bucket/ms1m

Rerunning the same command skips shards already finished (each has a `.done` marker written last) and
files already uploaded.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from magface.data.convert import convert_folder, split_rec, upload_shards  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    folder = sub.add_parser("folder", help="image folder (one subfolder per identity) -> shards")
    folder.add_argument("src", help="folder of identity subfolders")
    folder.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="require every image to be H x W (default: any; property takes the first image's)")
    split = sub.add_parser("split", help="one big .rec in insightface's layout -> shards")
    split.add_argument("src", help=".rec file (its .idx and property beside it), local or s3://")
    for sp in (folder, split):
        sp.add_argument("out", help="output folder for the shards and 'property'")
        sp.add_argument("--shards", type=int, required=True, help="number of shards")
        sp.add_argument("--prefix", default="train", help="shard file name prefix (default: train)")
        sp.add_argument("--upload", metavar="S3_PREFIX", help="upload the finished shards to s3://bucket/prefix")
        sp.add_argument("--part-size-mb", type=int, default=64, help="multipart upload part size")
        sp.add_argument("--address", default=None, help="Ray address (default: start or join a local Ray)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.shards < 1:
        raise SystemExit("--shards must be >= 1")
    if args.upload and not args.upload.startswith("s3://"):
        raise SystemExit(f"--upload must be an s3:// prefix, got {args.upload!r}")
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address=args.address, include_dashboard=False)
    if args.command == "folder":
        size = tuple(args.image_size) if args.image_size else None
        result = convert_folder(args.src, args.out, args.shards, image_size=size, prefix=args.prefix)
    else:
        result = split_rec(args.src, args.out, args.shards, prefix=args.prefix)
    print(f"{len(result['written'])} shard(s) written, {len(result['skipped'])} already complete, "
          f"{result['num_classes']} classes -> {args.out}")
    if args.upload:
        report = upload_shards(args.out, args.upload, part_size_mb=args.part_size_mb)
        print(f"uploaded {len(report.uploaded)} file(s), {len(report.skipped)} already there -> {args.upload}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
