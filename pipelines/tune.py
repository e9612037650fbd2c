"""Sweep MagFace's l_a, u_a, l_m, u_m, lambda_g with Ray Tune (feasible region only, ASHA, one MLflow child run
per trial under a parent run for the sweep).

    python pipelines/tune.py --config configs/demo.yaml --num-samples 4
    python pipelines/tune.py --config configs/demo.yaml --search optuna --metric val_spearman
    ray job submit --working-dir . -- python pipelines/tune.py --config configs/X.yaml --num-samples 32

A `tune:` section in the YAML (or `--set tune.key=value`, `--set tune.space.l_a=[5,20]`) holds the sweep
settings; see magface/sweep.py. With an empty data.train the demo's synthetic faces are generated and used,
and trials are scored on a synthetic validation .bin of other identities (unless tune.heldout names one).
Rerunning with the same --name resumes the sweep without repeating finished trials.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from magface.sweep import OBJECTIVES, load_sweep_config, run_sweep  # noqa: E402
from magface.train.demo import DEMO_CONFIG  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEMO_CONFIG), help="YAML run configuration, optionally with a tune: section")
    p.add_argument("--num-samples", type=int, help="trials to sample (tune.num_samples)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config or tune value (repeatable), e.g. --set train.epochs=2")
    p.add_argument("--name", help="sweep name (default tune_<train.name>); the same name resumes")
    p.add_argument("--search", choices=("random", "optuna"), help="search algorithm (tune.search)")
    p.add_argument("--metric", choices=OBJECTIVES, help="objective to maximise (tune.metric)")
    p.add_argument("--storage-path", help="where the sweep lives (default train.storage_path)")
    p.add_argument("--output-dir", help="where trials.csv, the plot and best_config.yaml go "
                                        "(default: the sweep folder when local)")
    p.add_argument("--num-cpus", type=int, help="local Ray only: logical CPUs to start it with")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    for flag, key in ((args.num_samples, "num_samples"), (args.search, "search"), (args.metric, "metric")):
        if flag is not None:
            overrides.append(f"tune.{key}={flag}")
    from magface.config import ConfigError

    try:
        cfg, settings = load_sweep_config(args.config, overrides)
    except ConfigError as e:  # the message names file, key and allowed values; no traceback
        raise SystemExit(f"tune: {e}") from None
    if not cfg.data.train:  # the demo's synthetic faces, generated once into the cache
        from magface.train.demo import cache_dir, prepare_data, prepare_validation

        data = prepare_data(cache_dir(), cfg)
        if not settings.heldout:  # score trials on other faces than the test sets the demo reports
            settings.heldout = str(prepare_validation(cache_dir(), cfg))
        cfg.data.train = [str(data.train_rec)]
        cfg.eval.data_root = cfg.eval.data_root or str(data.root)
        if cfg.train.storage_path == "~/ray_results":
            cfg.train.storage_path = str(cache_dir() / "runs")

    from magface.cluster import ClusterError, connect
    from magface.console import filter_ray_lines, quiet_ray

    quiet_ray()
    try:  # the one rule: RAY_ADDRESS joins that cluster, else a private local Ray
        connect(cfg, num_cpus=args.num_cpus)
    except ClusterError as e:
        raise SystemExit(f"tune: {e}") from None
    filter_ray_lines()
    t0 = time.perf_counter()
    result = run_sweep(cfg, settings, name=args.name, storage=args.storage_path, output_dir=args.output_dir,
                       where=args.config)
    from magface.console import closing_block
    from magface.train.trainer import tracking_uri

    print(f"\nsweep {result.experiment_path} in {(time.perf_counter() - t0) / 60:.1f} min\n"
          f"table: {result.csv_path}\nplot: {result.plot_path}\nbest config: {result.best_config_path}")
    print(closing_block("sweep: what was produced", tracking_uri=tracking_uri(cfg),
                        runs={"sweep (parent)": result.parent_run_id}, plots=[p for p in [result.plot_path] if p],
                        next_steps=[f"python pipelines/train.py --config {result.best_config_path}   # train the best"]
                        if result.best_config_path else []), flush=True)
    return 0 if result.best_config_path is not None else 1


if __name__ == "__main__":
    sys.exit(main())
