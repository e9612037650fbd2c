"""Fail-fast checks before a job starts: a template config must have its placeholders filled in, local
shards must exist, every `s3://` bucket a config names must be reachable with the credentials at hand, so a missing bucket or key fails in seconds on the driver, not after the cluster has
scaled up and the first epoch is half read. An unreachable MLflow server is only a warning: tracking never
stops training (see magface/tracking.py).

    python -m magface.preflight --config configs/ms1mv2_r100_magface.yaml --set train.storage_path=s3://b/runs
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import urllib.error
import urllib.request
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)


class PreflightError(RuntimeError):
    """Raised before training when a job's storage cannot work; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("preflight failed:\n  - " + "\n  - ".join(problems))


def _as_tree(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return config


def find_s3_uris(config: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(field, uri) for every `s3://` string in a nested config, e.g. ("data.paths[0]", "s3://b/x.rec")."""
    config = _as_tree(config)
    if isinstance(config, Mapping):
        for k, v in config.items():
            yield from find_s3_uris(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(config, (list, tuple)):
        for i, v in enumerate(config):
            yield from find_s3_uris(v, f"{prefix}[{i}]")
    elif isinstance(config, str) and config.startswith("s3://"):
        yield prefix, config


def buckets_by_field(config: Any) -> dict[str, list[str]]:
    """bucket -> the config fields that point into it."""
    from magface.data.storage import split_s3

    out: dict[str, list[str]] = {}
    for field, uri in find_s3_uris(config):
        bucket = split_s3(uri)[0]
        out.setdefault(bucket, []).append(field or "<value>")
    return out


def check_s3(buckets: Mapping[str, list[str]]) -> list[str]:
    """One HeadBucket per bucket, no retries (magface.data.storage.check_readable, which also turns botocore
    errors into what is missing). The endpoint and credentials come from boto3's usual chain. Returns the
    problems, each naming the bucket and the config fields that use it; empty when all is well."""
    from magface.data.storage import StorageError, check_readable

    problems = []
    for bucket, fields in buckets.items():
        try:
            check_readable(f"s3://{bucket}")
        except StorageError as e:
            problems.append(f"bucket '{bucket}' (used by {', '.join(fields)}): {e}")
    return problems


def check_mlflow(uri: str | None = None, *, timeout_s: float = 5.0) -> str | None:
    """A warning when an HTTP tracking server does not answer /health; None when it does or is not HTTP."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            if r.status == 200:
                return None
            why = f"HTTP {r.status}"
    except (urllib.error.URLError, OSError) as e:
        why = str(getattr(e, "reason", e))
    return (f"MLflow tracking server {uri} is not reachable ({why}); the job still runs, but logs nothing to "
            "MLflow if the server is still down when it starts")


PLACEHOLDER = "YOUR-"  # how the shipped templates mark values to fill in (s3://YOUR-BUCKET/...)


def find_placeholders(config: Any, prefix: str = "") -> list[str]:
    """Fields of a template config still holding a placeholder value, e.g. ["data.train[0]", ...]."""
    config = _as_tree(config)
    if isinstance(config, Mapping):
        return [f for k, v in config.items() for f in find_placeholders(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(config, (list, tuple)):
        return [f for i, v in enumerate(config) for f in find_placeholders(v, f"{prefix}[{i}]")]
    return [prefix] if isinstance(config, str) and PLACEHOLDER in config else []


def check_local_shards(config: Any) -> list[str]:
    """Each local data.train entry must be an existing .rec or a folder holding some: found on the driver in
    milliseconds rather than by Ray Data's first read task after Ray has started."""
    from magface.data import storage

    tree = _as_tree(config)
    paths = ((tree.get("data") or {}).get("train") or []) if isinstance(tree, Mapping) else []
    paths = [paths] if isinstance(paths, str) else paths
    problems = []
    for i, p in enumerate(paths):
        p = str(p)
        if storage.is_s3(p):
            continue
        local = os.path.expanduser(p)
        if p.endswith(".rec"):
            if not os.path.isfile(local):
                problems.append(f"data.train[{i}]: {p} does not exist")
        elif not os.path.isdir(local):
            problems.append(f"data.train[{i}]: {p} does not exist (give .rec shards or a folder holding them)")
        elif not storage.list_files(local, ".rec"):
            problems.append(f"data.train[{i}]: {p} holds no .rec shards")
    return problems


def preflight(config: Any, *, mlflow_uri: str | None = None, timeout_s: float = 5.0) -> list[str]:
    """Raise PreflightError naming each placeholder left in a template, each missing local shard and each
    bucket and what is missing; return warnings (MLflow) otherwise. The MLflow server checked is
    `mlflow_uri`, else the config's tracking.tracking_uri, else MLFLOW_TRACKING_URI."""
    tree = _as_tree(config)
    holes = find_placeholders(tree)
    if holes:
        raise PreflightError([f"this config is a template: fill in {', '.join(holes)} (they still hold "
                              f"'{PLACEHOLDER}...' placeholders), in the YAML or with --set KEY=VALUE"])
    problems = check_local_shards(tree) + check_s3(buckets_by_field(tree))
    if problems:
        raise PreflightError(problems)
    if mlflow_uri is None and isinstance(tree, Mapping):
        mlflow_uri = (tree.get("tracking") or {}).get("tracking_uri")
    warnings = [w for w in [check_mlflow(mlflow_uri, timeout_s=timeout_s)] if w]
    for w in warnings:
        log.warning(w)
    return warnings


def main(argv: list[str] | None = None) -> int:
    from magface.config import Config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="the same overrides the job gets, e.g. --set train.storage_path=s3://bucket/runs")
    args = p.parse_args(argv)
    cfg = Config.load(args.config, args.set)
    try:
        warnings = preflight(cfg)
    except PreflightError as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 1
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    n = len(buckets_by_field(cfg))
    print(f"{args.config}: preflight ok ({n} S3 bucket{'s' if n != 1 else ''} reachable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
