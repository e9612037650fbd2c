"""Where a pipeline's Ray comes from, and whether the job fits it: checked before any work starts.

Connection rule, the same for every pipeline (train, tune, evaluate, convert, embed):
- an explicit address (`--address`, else RAY_ADDRESS, which `ray job submit` sets) joins that cluster; an
  address nobody answers at fails within seconds with a message, instead of Ray's endless GCS retries;
- otherwise a private local Ray is started for this process. Never `ray.init()`'s auto-discovery, which
  joins whatever cluster this machine last recorded (possibly one that has since been killed).

Resource check (`plan_resources`): every trainer worker must fit on some node, now or on a node type an
autoscaler can add, and the trainers must leave Ray Data at least one CPU to read and decode with. A request
that can never be met fails in seconds naming the resource; a CPU request that would starve Ray Data is
lowered with a message naming `scaling.cpus_per_worker` (or refused when lowering cannot help).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass, field

from magface import driver_guard

log = logging.getLogger(__name__)

# Ray Data needs this many CPUs beside the trainers for its read/decode tasks (and the streaming split).
DATA_CPUS = 1


class ClusterError(RuntimeError):
    """The cluster cannot run this job (unreachable, or a resource it will never have); says what to do."""


def under_ray_job() -> bool:
    """True inside the entrypoint of `ray job submit` (the job supervisor sets this variable for it)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve(address: str) -> str:
    """host:port of the GCS (or ray://host:port) to join; "auto" reads the address Ray recorded locally."""
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"Ray address {address!r} is a dashboard URL (for `ray job submit --address`); a pipeline joins "
            "a cluster by its GCS address, e.g. --address 10.0.0.1:6379 (or RAY_ADDRESS=10.0.0.1:6379)")
    if address.startswith("ray://"):
        return address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            resolved = canonicalize_bootstrap_address("auto")
        except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError when nothing is recorded
            raise ClusterError(f"RAY_ADDRESS=auto: no running Ray cluster found on this machine ({e}); start "
                               "one with `ray start --head`, or unset RAY_ADDRESS for a private local Ray") from None
        if not resolved:
            raise ClusterError("RAY_ADDRESS=auto: no running Ray cluster found on this machine; start one with "
                               "`ray start --head`, or unset RAY_ADDRESS for a private local Ray")
        return resolved
    return address


def _probe(address: str, timeout_s: float) -> str | None:
    """None when something accepts TCP connections at the address, else why not."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return "not a host:port address"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as e:
        return e.strerror or str(e)


def connect(cfg=None, *, address: str | None = None, num_cpus: int | None = None, dashboard: bool = True,
            timeout_s: float = 5.0) -> str:
    """Join the cluster at `address` (else RAY_ADDRESS), or start a private local Ray; a no-op when Ray is
    already initialised. Returns "local" or the address joined. Raises ClusterError for a dead address.

    A local Ray gets enough logical CPUs for the trainers (cfg.scaling) plus Ray Data's tasks (or `num_cpus`).
    `dashboard` starts its dashboard, whose state API Ray Train's placement-group cleaner needs: without it
    the CPUs of a trial that Tune stopped stay reserved and the next trial waits."""
    import ray

    if ray.is_initialized():
        return "existing"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    given = address or os.environ.get("RAY_ADDRESS") or None
    if given and given != "local":
        source = "--address" if address else "RAY_ADDRESS"
        target = _resolve(given)
        why = _probe(target, timeout_s)
        if why is not None:
            raise ClusterError(
                f"no Ray cluster answers at {target} ({source}={given}): {why}. Start it (`ray start --head`), "
                f"fix the address, or {'drop --address' if address else 'unset RAY_ADDRESS'} to run on a "
                "private local Ray")
        ray.init(address=target, log_to_driver=True)
        driver_guard.start(reap_local_ray=False)  # MLflow runs of a killed driver: marked KILLED
        return target
    need = 1
    if cfg is not None:
        s = cfg.scaling
        workers = getattr(s, "max_workers", s.num_workers)
        need = math.ceil(workers * s.cpus_per_worker) + DATA_CPUS
    env = {"RAY_AUTH_MODE": "disabled"}
    extra = {}
    missing = getattr(ray._private.utils, "get_dashboard_dependency_error", lambda: None)() if dashboard else None
    if missing:  # a minimal `pip install ray`: run without the dashboard rather than not at all
        print(f"[magface] starting Ray without its dashboard ({missing}); install ray[default] for it (a Tune "
              "sweep then frees the CPUs of the trials it stops)", flush=True)
        dashboard = False
    if dashboard:
        # Workers find the state API by scanning for Ray instances, which fails when this machine runs another
        # one (a test session, a second sweep); name this instance's dashboard to them explicitly.
        extra["dashboard_port"] = _free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{extra['dashboard_port']}"
    ray.init(address="local", num_cpus=num_cpus or max(os.cpu_count() or 1, need), include_dashboard=dashboard,
             runtime_env={"env_vars": env}, **extra)
    driver_guard.start(reap_local_ray=True)  # a killed driver's leftover Ray agents and RUNNING MLflow runs
    return "local"


# ---------------------------------------------------------------------------------------------- resources
@dataclass
class ResourcePlan:
    """What `plan_resources` decided: `overrides` (`section.key=value`, already applied to the config it
    was given) and one message per decision, for the console."""

    overrides: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def _fits(bundle: dict, capacity: dict) -> bool:
    return all(capacity.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v > 0)


def _node_types() -> list[dict]:
    """Resources of each node type an autoscaler can still add (max_count above min_count, or unbounded)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state on this cluster
        return []
    if not config or not config.node_group_configs:
        return []
    return [dict(g.resources) for g in config.node_group_configs
            if g.resources and g.max_count != 0 and (g.max_count == -1 or g.max_count > g.min_count)]


def worker_bundle(cfg) -> dict:
    """One trainer worker's resource request, as `magface.train.trainer.build_trainer` makes it."""
    s = cfg.scaling
    bundle = {"CPU": float(s.cpus_per_worker), **{k: float(v) for k, v in s.resources_per_worker.items()}}
    if s.use_gpu:
        bundle["GPU"] = float(s.gpus_per_worker)
    return bundle


def plan_resources(cfg, *, nodes: list[dict] | None = None, node_types: list[dict] | None = None) -> ResourcePlan:
    """Check the job's trainer workers against the connected cluster (or the given `nodes`' total resources
    and autoscaler `node_types`, for tests). Raises ClusterError for what can never run; lowers
    scaling.cpus_per_worker in `cfg` when the trainers would take every CPU and Ray Data would wait forever."""
    if nodes is None:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        node_types = _node_types() if node_types is None else node_types
    node_types = node_types or []
    s = cfg.scaling
    workers = getattr(s, "min_workers", s.num_workers)
    plan = ResourcePlan()
    bundle = worker_bundle(cfg)
    if not any(_fits(bundle, n) for n in nodes) and not any(_fits(bundle, t) for t in node_types):
        have = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in bundle}
        short = [k for k, v in bundle.items() if have[k] + 1e-9 < v] or list(bundle)
        setting = {"GPU": "scaling.use_gpu / scaling.gpus_per_worker", "CPU": "scaling.cpus_per_worker"}
        names = ", ".join(f"{k} (asks {bundle[k]:g}, largest node has {have[k]:g}; "
                          f"{setting.get(k, 'scaling.resources_per_worker')})" for k in short)
        raise ClusterError(
            f"no node of this cluster can hold one training worker {bundle}, and no autoscaler can add one: "
            f"{names}. Lower the setting(s) named, or run on a cluster that has these resources")
    if any(_fits({"CPU": 1.0}, t) for t in node_types):
        return plan  # the autoscaler can add CPU nodes for Ray Data
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    if workers * bundle["CPU"] + DATA_CPUS <= total_cpu + 1e-9:
        return plan
    room = (total_cpu - DATA_CPUS) / workers
    lowered = math.floor(room * 4) / 4  # quarter CPUs: Ray's fractional resources
    if lowered <= 0 or not any(_fits({**bundle, "CPU": lowered}, n) for n in nodes):
        raise ClusterError(
            f"{workers} training worker(s) x {bundle['CPU']:g} CPU on a cluster with {total_cpu:g} CPUs leave Ray "
            f"Data no CPU to read and decode with, and the job would wait forever; lower scaling.num_workers "
            f"(or add CPUs to the cluster)")
    lowered = int(lowered) if lowered == int(lowered) else lowered
    s.cpus_per_worker = lowered
    plan.overrides.append(f"scaling.cpus_per_worker={lowered}")
    plan.messages.append(
        f"scaling.cpus_per_worker lowered from {bundle['CPU']:g} to {lowered:g}: {workers} worker(s) x "
        f"{bundle['CPU']:g} CPU would take all {total_cpu:g} CPUs of this cluster and leave Ray Data none "
        f"(the job would hang at its first read). Set --set scaling.cpus_per_worker={lowered:g} to keep this")
    return plan


def job_tracking_default(experiment: str = "magface") -> str | None:
    """Under `ray job submit` with no tracking URI, a store the user finds: MLflow's default would put
    `mlflow.db` (and the artifacts) in the job's unpacked working directory inside Ray's session folder, gone
    with the session. Uses `<magface cache>/mlflow.db` on the node running the job, with the experiment's
    artifacts beside it. Returns the URI chosen (also exported as MLFLOW_TRACKING_URI), or None when not needed."""
    if not under_ray_job() or os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    from magface.train.demo import cache_dir

    path = cache_dir() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{path}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:  # a new experiment's artifact root would otherwise be ./mlruns, i.e. inside the job's folder
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        if client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment, artifact_location=(path.parent / "mlartifacts").as_uri())
    except Exception as e:  # noqa: BLE001 - tracking never stops a job (magface.tracking)
        log.warning("could not prepare MLflow experiment %r at %s: %s", experiment, uri, e)
    return uri

