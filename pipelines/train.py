"""Train MagFace on Ray.

    python pipelines/train.py                      # the demo: synthetic faces, CPU, a few minutes
    python pipelines/train.py --config configs/ms1mv2_r100_magface.yaml --set train.epochs=1
    ray job submit --working-dir . -- python pipelines/train.py --config configs/ms1mv2_r100_magface.yaml

Rerunning with the same train.name and train.storage_path resumes the job from its newest complete checkpoint
and continues its MLflow run. Ctrl-C (or SIGTERM) stops within seconds and prints the command that resumes.
Ray: --address or RAY_ADDRESS joins that cluster, else a private local Ray (magface/cluster.py).
"""

import argparse
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from magface.cluster import ClusterError, connect, job_tracking_default, plan_resources, under_ray_job  # noqa: E402
from magface.config import Config, ConfigError  # noqa: E402
from magface.console import artifact_files, closing_block, filter_ray_lines, quiet_ray  # noqa: E402
from magface.preflight import PreflightError, preflight  # noqa: E402
from magface.train.demo import DEMO_CONFIG, run_demo  # noqa: E402
from magface.train.interrupt import TrainingInterrupted  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run configuration (configs/*.yaml); none: the demo")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set optim.lr=0.05")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--no-baseline", action="store_true", help="demo only: skip the ArcFace baseline")
    p.add_argument("--demo-stamp", metavar="STAMP",
                   help="demo only: resume the interrupted demo whose jobs are named demo_<kind>_STAMP")
    p.add_argument("--address", help="join the Ray cluster at this GCS address (default: RAY_ADDRESS if set, "
                                     "else a private local Ray)")
    p.add_argument("--verbose", action="store_true", help="Ray Data progress bars and all of Ray's log lines")
    return p.parse_args(argv)


def resume_command(argv, stamp: str | None = None) -> str:
    """The command that continues an interrupted run: the same one (the job name and storage path say where
    it stands), with the demo's stamp added when it was the demo."""
    args = list(argv)
    if stamp and "--demo-stamp" not in args:
        args += ["--demo-stamp", stamp]
    cmd = shlex.join(["python", *args])
    return f"ray job submit --working-dir . -- {cmd}" if under_ray_job() else cmd


def start_ray(cfg: Config, args) -> list[str]:
    """Connect (the one rule of magface.cluster) and check the job against the cluster's resources; returns the
    `--set` overrides the check made, after printing why."""
    connect(cfg, address=args.address)
    filter_ray_lines(args.verbose)
    plan = plan_resources(cfg)
    for message in plan.messages:
        print(f"[magface] {message}", flush=True)
    return plan.overrides


def demo(args, argv) -> int:
    from magface.train.trainer import tracking_uri

    base = Config.load(DEMO_CONFIG, args.set)
    overrides = args.set + start_ray(base, args)
    stamp = args.demo_stamp or time.strftime("%Y%m%d-%H%M%S")
    try:
        out = run_demo(overrides=overrides, baseline=not args.no_baseline, stamp=stamp)
    except TrainingInterrupted as e:
        return interrupted(e, resume_command(argv, stamp))
    uri = tracking_uri(base)
    runs = {"demo (parent)": out.get("parent_run_id")}
    checkpoints, plots = {}, []
    for label, r in out["results"].items():
        runs[f"{label} training"] = r.get("train_run_id")
        runs[f"{label} evaluation"] = r.get("eval_run_id")
        checkpoints[label] = r.get("checkpoint")
        plots += artifact_files(r.get("eval_run_id"), uri) + artifact_files(r.get("train_run_id"), uri)[-1:]
    print(closing_block("demo: what was produced", tracking_uri=uri, runs=runs, checkpoints=checkpoints,
                        plots=plots, next_steps=[
                            "python pipelines/evaluate.py --run demo_magface   # evaluate again, other options",
                            "python pipelines/tune.py --num-samples 4           # sweep the MagFace bounds",
                            "python pipelines/train.py --config configs/ms1mv2_r100_magface.yaml  # real data "
                            "(a template: fill in its YOUR-BUCKET fields)"]), flush=True)
    return 0


def interrupted(e: TrainingInterrupted, command: str) -> int:
    print(f"\n[magface] stopped by {e.signame}. Finished checkpoints are kept"
          + (f"; the newest is {e.checkpoint}" if e.checkpoint else " (none was finished yet)")
          + (f"; MLflow run {e.run_id} is marked KILLED" if e.run_id else "") + ".\n"
          f"[magface] resume with: {command}\n"
          "[magface] (the re-run continues from the newest complete checkpoint and logs into the same MLflow run)",
          file=sys.stderr, flush=True)
    return e.exit_code


def train(args, argv) -> int:
    cfg = Config.load(args.config, args.set)
    from magface.train.trainer import run, tracking_uri  # torch and Ray Data: after the config is known good
    if not cfg.data.train:
        raise ConfigError(f"{args.config}: data.train is empty; give the .rec shards (--set data.train=[...])")
    for warning in preflight(cfg):  # placeholders, local shards, S3 buckets: before Ray starts
        print(f"warning: {warning}", file=sys.stderr)
    start_ray(cfg, args)  # may lower scaling.cpus_per_worker in cfg
    try:
        result = run(cfg)
    except TrainingInterrupted as e:
        return interrupted(e, resume_command(argv))
    if result.error is not None:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    print(f"final metrics: {result.metrics}")
    uri = tracking_uri(cfg)
    runs = {"training": result.run_id}
    if cfg.eval.at_end and cfg.eval.benchmarks and not args.no_eval:
        from magface.evaluation.runner import evaluate

        ev = evaluate(result.checkpoint_path, benchmarks=cfg.eval.benchmarks, data_root=cfg.eval.data_root,
                      run_id=result.run_id, experiment=cfg.tracking.experiment)
        runs["evaluation"] = ev.get("mlflow_run_id")
    checkpoints = {"latest": result.checkpoint_path}
    if result.best_checkpoint_path and result.best_checkpoint_path != result.checkpoint_path:
        checkpoints["best"] = result.best_checkpoint_path
    plots = artifact_files(runs.get("evaluation"), uri) + artifact_files(result.run_id, uri)[-1:]
    print(closing_block(f"job {cfg.train.name!r}: what was produced", tracking_uri=uri, runs=runs,
                        checkpoints=checkpoints, plots=plots, next_steps=[
                            f"python pipelines/evaluate.py --checkpoint {result.checkpoint_path} --benchmarks ...",
                            f"magface export --onnx --checkpoint {result.checkpoint_path} --out model.onnx"]),
          flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv if argv is None else ["pipelines/train.py", *argv]
    args = parse_args(argv[1:])
    quiet_ray(args.verbose)
    try:
        cfg_for_uri = Config.load(args.config or DEMO_CONFIG, args.set)
        job_uri = job_tracking_default(cfg_for_uri.tracking.experiment)
        if job_uri:
            print(f"[magface] under `ray job submit` without MLFLOW_TRACKING_URI: MLflow logs to {job_uri} on "
                  f"this node ({os.uname().nodename}); pass --runtime-env-json "
                  "'{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"...\"}}' to choose", flush=True)
        # configs/demo.yaml names no shards: it is the demo's config, so `--config configs/demo.yaml --set ...`
        # runs the demo with those overrides, unless the overrides give shards (then it is a training config)
        is_demo = args.config is None or (os.path.realpath(args.config) == os.path.realpath(DEMO_CONFIG)
                                          and not cfg_for_uri.data.train)
        return demo(args, argv) if is_demo else train(args, argv)
    except (ConfigError, PreflightError, ClusterError) as e:  # the message says what to do; no traceback
        print(f"train: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
