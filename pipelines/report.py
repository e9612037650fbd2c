"""Check MagFace's claims on the synthetic faces: train Softmax, ArcFace and MagFace with the demo recipe for
several seeds, evaluate them, and write a Markdown report with figures (also logged to MLflow).

    python pipelines/report.py                     # 3 seeds, into reports/<name>/report.md
    python pipelines/report.py --seeds 1 --set train.epochs=2 --out /tmp/quick_report

Every loss gets configs/demo.yaml with only loss.kind changed; `--set` overrides apply to all of them.
Rerunning with the same --name resumes the trainings from their checkpoints. See magface/report.py.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from magface.cluster import ClusterError, connect, plan_resources  # noqa: E402
from magface.config import Config, ConfigError  # noqa: E402
from magface.console import filter_ray_lines, quiet_ray  # noqa: E402
from magface.train.interrupt import TrainingInterrupted  # noqa: E402
from magface.train.demo import DEMO_CONFIG  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="training seeds per loss (train.seed = 0..N-1)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a demo config value for every loss (repeatable), e.g. --set train.epochs=4")
    p.add_argument("--out", help="report folder (default reports/<name>)")
    p.add_argument("--name", help="report name (default report_<time>); the same name resumes")
    p.add_argument("--mean-face-bins", type=int, default=8, help="magnitude bins of the mean-face figure")
    p.add_argument("--address", help="join the Ray cluster at this address (default: a private local Ray)")
    p.add_argument("--verbose", action="store_true", help="Ray Data progress bars and all of Ray's log lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_ray(args.verbose)
    try:
        if args.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
        cfg = Config.load(DEMO_CONFIG, args.set)
        connect(cfg, address=args.address)
        filter_ray_lines(args.verbose)
        plan = plan_resources(cfg)
        for message in plan.messages:
            print(f"[report] {message}", flush=True)
        from magface.report import run_report

        if not args.name:
            args.name = time.strftime("report_%Y%m%d-%H%M%S")
        print(f"[report] {args.name}: {args.seeds} seed(s) x Softmax, ArcFace, MagFace (rerun with --name "
              f"{args.name} to resume)", flush=True)

        res = run_report(seeds=args.seeds, overrides=[*args.set, *plan.overrides], out_dir=args.out,
                         name=args.name, mean_face_bins=args.mean_face_bins)
    except (ConfigError, ClusterError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    except (TrainingInterrupted, KeyboardInterrupt) as e:  # Ctrl-C in training, or between trainings
        again = list(argv if argv is not None else sys.argv[1:])
        if "--name" not in again and args.name:
            again += ["--name", args.name]
        print(f"\n[report] stopped by {getattr(e, 'signame', 'SIGINT')}; finished models are kept "
              f"(<out>/runs/*.json). Resume with: python pipelines/report.py {' '.join(again)}",
              file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 130)
    print(f"report: {res.report_path}\nfigures: {', '.join(str(p) for p in res.figures.values())}\n"
          f"MLflow parent run: {res.parent_run_id}")
    for c in res.claims:
        print(f"  [{c['verdict']:>12}] {c['claim']} ({c['wins']}/{c['n']} seeds, {c['diff']:+.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
