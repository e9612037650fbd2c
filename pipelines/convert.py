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
                        help="every image must be H x W (default: the first image's size; a different size "
                             "stops the conversion naming the file)")
    fix = folder.add_mutually_exclusive_group()
    fix.add_argument("--resize", action="store_true",
                     help="resize every image to --image-size instead (for crops that are already aligned faces)")
    fix.add_argument("--align", metavar="LANDMARKS",
                     help="align every image onto the 5-point face template at --image-size (default 112 112): "
                          "a file of lines '<image> x1 y1 ... x5 y5 [score]' (eyes, nose, mouth corners; "
                          "<image> relative to SRC), e.g. from any face detector; see docs/own_faces.md")
    split = sub.add_parser("split", help="one big .rec in insightface's layout -> shards")
    split.add_argument("src", help=".rec file (its .idx and property beside it), local or s3://")
    for sp in (folder, split):
        sp.add_argument("out", help="output folder for the shards and 'property'")
        sp.add_argument("--shards", type=int, required=True, help="number of shards")
        sp.add_argument("--prefix", default="train", help="shard file name prefix (default: train)")
        sp.add_argument("--upload", metavar="S3_PREFIX", help="upload the finished shards to s3://bucket/prefix")
        sp.add_argument("--part-size-mb", type=int, default=64, help="multipart upload part size")
        sp.add_argument("--address", default=None,
                        help="join the Ray cluster at this GCS address (default: RAY_ADDRESS if set, else a "
                             "private local Ray)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.shards < 1:
        raise SystemExit("--shards must be >= 1")
    if args.upload and not args.upload.startswith("s3://"):
        raise SystemExit(f"--upload must be an s3:// prefix, got {args.upload!r}")
    from magface.cluster import ClusterError, connect
    from magface.console import filter_ray_lines, quiet_ray

    quiet_ray()
    try:  # the one rule: --address / RAY_ADDRESS joins that cluster, else a private local Ray
        connect(address=args.address, dashboard=False)
    except ClusterError as e:
        raise SystemExit(f"convert: {e}") from None
    filter_ray_lines()
    if args.command == "folder":
        size = tuple(args.image_size) if args.image_size else None
        if args.resize and size is None:
            raise SystemExit("convert: --resize needs --image-size H W (the size to resize to)")
        result = convert_folder(args.src, args.out, args.shards, image_size=size, prefix=args.prefix,
                                resize=args.resize, landmarks=args.align)
    else:
        result = split_rec(args.src, args.out, args.shards, prefix=args.prefix)
    print(f"{len(result['written'])} shard(s) written, {len(result['skipped'])} already complete, "
          f"{result['num_classes']} classes -> {args.out}")
    if args.command == "folder":
        h, w = result["image_size"]
        print(f"images are {w}x{h}: train with data.image_size={h}"
              + ("" if (h, w) == (112, 112) else " (the standard face crop is 112x112, aligned on 5 landmarks: "
                 "see docs/own_faces.md)"))
    if args.upload:
        report = upload_shards(args.out, args.upload, part_size_mb=args.part_size_mb)
        print(f"uploaded {len(report.uploaded)} file(s), {len(report.skipped)} already there -> {args.upload}")
    return 0


if __name__ == "__main__":
    from magface.data.convert import ImageSizeError

    try:
        sys.exit(main())
    except (ImageSizeError, FileNotFoundError, ValueError) as e:  # bad input: the message says what to do
        raise SystemExit(f"convert: {getattr(e, 'cause', None) or e}") from None
