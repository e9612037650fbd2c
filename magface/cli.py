"""Console script `magface`: model utilities (export, weight import, model statistics)."""

from __future__ import annotations

import argparse
import sys


def _export(args) -> int:
    from magface.export import export_onnx

    if not args.onnx:
        print("magface export: only --onnx is supported; pass --onnx", file=sys.stderr)
        return 2
    path = export_onnx(args.checkpoint, args.out, opset=args.opset)
    print(f"wrote {path}")
    return 0


def _model_stats(args) -> int:
    import torch

    from magface.models import BACKBONES, get_backbone
    from magface.models.flops import count_macs, count_parameters

    names = [args.backbone] if args.backbone else list(BACKBONES)
    print(f"{'backbone':<12} {'input':>6} {'params (M)':>11} {'GMACs':>8}")
    for name in names:
        size = args.input_size or (64 if name == "small" else 112)
        with torch.device("meta"):  # counting needs shapes only
            model = get_backbone(name, embedding_size=args.embedding_size, input_size=size)
        print(f"{name:<12} {size:>6} {count_parameters(model) / 1e6:>11.2f} {count_macs(model, size) / 1e9:>8.3f}")
    return 0


def _import_weights(args) -> int:
    from magface.models.imported import WeightsImportError, import_weights

    try:
        path = import_weights(args.src, args.source, args.out, arch=args.arch)
    except (WeightsImportError, FileNotFoundError, ValueError) as e:
        print(f"magface import-weights: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (use it with Embedder.from_checkpoint, pipelines/evaluate.py --checkpoint "
          f"{args.out}, or model.init_from={args.out})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magface", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="export a checkpoint for inference")
    exp.add_argument("--onnx", action="store_true", help="write an ONNX model (uint8 NHWC RGB in)")
    exp.add_argument("--checkpoint", required=True, help="checkpoint directory or model.pt")
    exp.add_argument("--out", required=True, help="output file")
    exp.add_argument("--opset", type=int, default=17)
    exp.set_defaults(func=_export)
    imp = sub.add_parser("import-weights", help="convert official MagFace / arcface_torch iResNet weights into a "
                                                "project checkpoint")
    imp.add_argument("--from", dest="source", required=True, choices=("magface", "insightface"),
                     help="magface: an official MagFace checkpoint (magface_epoch_00025.pth); insightface: an "
                          "arcface_torch backbone.pth")
    imp.add_argument("src", help="the weights file")
    imp.add_argument("--arch", help="iresnet18/34/50/100/200 (default: read from the keys, checked when given)")
    imp.add_argument("--out", required=True, help="checkpoint directory to write (model.pt)")
    imp.set_defaults(func=_import_weights)
    stats = sub.add_parser("model-stats", help="parameters and multiply-accumulates per image")
    stats.add_argument("--backbone", help="one backbone (default: all)")
    stats.add_argument("--embedding-size", type=int, default=512)
    stats.add_argument("--input-size", type=int, help="default 112 (64 for small)")
    stats.set_defaults(func=_model_stats)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
