"""Train MagFace on Ray.

    python pipelines/train.py                      # the demo: synthetic faces, CPU, a few minutes
    python pipelines/train.py --config configs/ms1mv2_r100_magface.yaml --set train.epochs=1
    ray job submit --working-dir . -- python pipelines/train.py --config configs/ms1mv2_r100_magface.yaml

Rerunning with the same train.name and train.storage_path resumes the job from its latest checkpoint.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from magface.config import Config  # noqa: E402
from magface.preflight import PreflightError, preflight  # noqa: E402
from magface.train.demo import DEMO_CONFIG, run_demo  # noqa: E402
from magface.train.trainer import connect, run  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run configuration (configs/*.yaml); none: the demo")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set optim.lr=0.05")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--no-baseline", action="store_true", help="demo only: skip the ArcFace baseline")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.config is None:
        connect(Config.load(DEMO_CONFIG, args.set))
        run_demo(overrides=args.set, baseline=not args.no_baseline)
        return 0

    cfg = Config.load(args.config, args.set)
    if not cfg.data.train:
        raise SystemExit(f"{args.config}: data.train is empty; give the .rec shards (--set data.train=[...])")
    try:  # S3 buckets for shards and checkpoints: fail now, not after the first epoch
        for warning in preflight(cfg):
            print(f"warning: {warning}", file=sys.stderr)
    except PreflightError as e:
        raise SystemExit(f"{args.config}: {e}") from None
    connect(cfg)
    result = run(cfg)
    if result.error is not None:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    print(f"checkpoint: {result.checkpoint_path}\nMLflow run: {result.run_id}\nfinal metrics: {result.metrics}")
    if cfg.eval.at_end and cfg.eval.benchmarks and not args.no_eval:
        from magface.evaluation.runner import evaluate

        evaluate(result.checkpoint_path, benchmarks=cfg.eval.benchmarks, data_root=cfg.eval.data_root,
                 run_id=result.run_id, experiment=cfg.tracking.experiment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
