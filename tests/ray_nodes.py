"""Real multi-node Ray on one machine for the elastic-training tests: a head and worker nodes started as
separate `ray start --block` processes on 127.0.0.1, each in its own session, stopped by process id (only
processes these helpers started, never `ray stop`), and a training driver run as its own process.

    python -m tests.ray_nodes driver SPEC.json     # the driver (RAY_ADDRESS names the cluster)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINER_RESOURCE = "trainer_slot"  # the custom resource every training worker asks for: one per worker node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(**extra) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_V2_ENABLED": "1", "PYTHONPATH": str(REPO),
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DEDUP_LOGS": "0",
           # a worker group asked for on a node that just died gives up after this long (default 60 s) and the
           # elastic policy retries with the workers that fit
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


class Node:
    """One `ray start --block` process and everything it spawns (raylet, workers; the head's GCS, monitor)."""

    def __init__(self, args: list[str], log: Path, env: dict):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args],
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=REPO)

    def wait_started(self, timeout: float = 180) -> "Node":
        """Block until `ray start` says the node is up; a node that failed to start is an error with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log.read_text(errors="replace"):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ray node did not start ({self.log}):\n{self.log.read_text(errors='replace')[-2000:]}")

    def session_pids(self) -> list[int]:
        """Every live process of this node: those of the session `ray start` began (Ray's workers take their
        own process groups but stay in it), all descendants, and anything working in this head's Ray session
        folder (`session_<time>_<pid of ray start>`: a fake autoscaler's nodes, wherever they were reparented)."""
        table = _process_table()
        folder = re.compile(rf"/session_[\d_-]+_{self.proc.pid}/")
        return sorted({pid for pid, (_, sid, args) in table.items() if sid == self.proc.pid or folder.search(args)}
                      | set(_descendants(table, self.proc.pid)))

    def kill(self, sig=signal.SIGKILL) -> None:
        """Kill this node's process group and every other process of its session (a node lost to preemption)."""
        pids = self.session_pids()
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        """Graceful first (SIGTERM lets `ray start --block` shut its processes down), then SIGKILL what is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def start_head(log_dir: Path, *, num_cpus: int, resources: dict | None = None, env: dict | None = None,
               extra: tuple = (), port: int | None = None) -> tuple[Node, str]:
    port = port or free_port()
    args = ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
            "--include-dashboard=false", "--disable-usage-stats", *extra]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    node = Node(args, log_dir / "head.log", env or ray_env()).wait_started()
    return node, f"127.0.0.1:{port}"


def start_worker(log_dir: Path, address: str, name: str, *, num_cpus: int = 1, resources: dict | None = None) -> Node:
    args = [f"--address={address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources or {TRAINER_RESOURCE: 1})}", "--disable-usage-stats"]
    return Node(args, log_dir / f"{name}.log", ray_env()).wait_started()


def fake_autoscaling_config(cluster_yaml: Path, gcs_address: str, training_type: str, other_type: str) -> dict:
    """An autoscaling config for Ray's fake multi-node provider (nodes are processes on this machine) with node
    types shaped like `cluster_yaml`'s: the same names, min/max workers and cluster-wide max_workers. A fake
    node cannot have GPUs, so the training type's GPUs become one TRAINER_RESOURCE (one worker per node), and
    the other type gets a resource no trainer asks for. The head has CPUs for Ray Data's tasks (the real GPU
    nodes bring their own; a fake training node's single CPU belongs to its worker)."""
    import yaml
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    real = yaml.safe_load(cluster_yaml.read_text())
    types = {"ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0}}
    for name, resource in ((training_type, TRAINER_RESOURCE), (other_type, "eval_slot")):
        t = real["available_node_types"][name]
        types[name] = {"resources": {"CPU": 1, resource: 1}, "node_config": {},
                       "min_workers": t["min_workers"], "max_workers": t["max_workers"]}
    return {
        "cluster_name": "fake_magface", "max_workers": real["max_workers"],
        "upscaling_speed": real["upscaling_speed"], "idle_timeout_minutes": real["idle_timeout_minutes"],
        # "external" names the same provider class: autoscaler v2 reads a "fake_multinode" provider's defaults
        # from an example.yaml that Ray's wheel does not ship.
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "gcs_address": gcs_address, "disable_launch_config_check": True,
                     "disable_node_updaters": True, "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID},
        "auth": {"ssh_user": "ubuntu"}, "available_node_types": types, "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def start_autoscaling_head(log_dir: Path, cluster_yaml: Path, training_type: str, other_type: str):
    """A head whose autoscaler launches and terminates fake nodes (processes of the head's session)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    config = log_dir / "autoscaling.json"
    config.write_text(json.dumps(fake_autoscaling_config(cluster_yaml, address, training_type, other_type)))
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    # Autoscaler v2, which terminates an instance whose Ray node died and so replaces it (v1 with this provider
    # never does: with node updaters off it re-marks a node active as soon as its heartbeats stop).
    env = ray_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_enable_autoscaler_v2="1",
                  RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID, RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID)
    head, _ = start_head(log_dir, num_cpus=2, env=env, extra=(f"--autoscaling-config={config}",), port=port)
    return head, address


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, sid, command line) of every process on this machine."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,sid=,args="], capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        pid, ppid, sid, *args = line.split(None, 3)
        table[int(pid)] = (int(ppid), int(sid), args[0] if args else "")
    return table


def _descendants(table: dict, root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo, found = list(children.get(root, [])), []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def fake_node_raylets(head: Node, node_type: str | None = None) -> dict[str, int]:
    """node id -> raylet pid of the nodes (of `node_type`, if given) the head's autoscaler launched with the fake
    provider: raylets of the head's session folder other than the head's own (socket `raylet`; theirs are
    `raylet.<n>`). A raylet takes its node id and type from the environment, so the id comes from the raylet's
    log in that folder and the type from its environment."""
    found = {}
    for pid, (_, _, args) in _process_table().items():
        m = re.search(rf"--raylet_socket_name=(\S+/session_[\d_-]+_{head.proc.pid})/sockets/raylet\.\d+ ", args)
        if not m or "raylet/raylet " not in args:
            continue
        if node_type is not None and f"RAY_NODE_TYPE_NAME={node_type}".encode() not in _environ(pid):
            continue
        for log in Path(m[1], "logs").glob("raylet*.out"):
            node = re.search(rf" I {pid} {pid}\] \(raylet\) main\.cc:\d+: Setting node ID node_id=(\w+)",
                             log.read_text(errors="replace"))
            if node:
                found[node[1]] = pid
    return found


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def kill_process_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (a fake node: its raylet and the workers it spawned)."""
    for p in [pid, *_descendants(_process_table(), pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def registered_steps(job_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its snapshot, written after each registration): a
    checkpoint folder appears in storage before that, and a restart resumes only from registered ones."""
    try:
        snap = json.loads((job_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(r["metrics"]["step"] for r in snap.get("checkpoint_results", []))


def cluster_resource(address: str, key: str) -> float:
    """Total of one resource over the alive nodes, asked from a separate process (this one may be attached to
    another Ray instance)."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False); "
            "print(ray.cluster_resources().get(sys.argv[2], 0.0))")
    out = subprocess.run([sys.executable, "-c", code, address, key], capture_output=True, text=True,
                         env=ray_env(), timeout=120, cwd=REPO)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else -1.0


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class Driver:
    """`python -m tests.ray_nodes driver SPEC` attached to `address`; its output goes to a file we poll."""

    def __init__(self, spec: dict, work: Path, address: str):
        self.out = work / "driver.log"
        (work / "spec.json").write_text(json.dumps(spec))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.ray_nodes", "driver", str(work / "spec.json")],
                                     stdout=open(self.out, "wb"), stderr=subprocess.STDOUT,
                                     env=ray_env(RAY_ADDRESS=address), start_new_session=True, cwd=REPO)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def per_attempt(self, pattern: str) -> list[str]:
        """`pattern`'s group from rank 0's first matching line of each worker-group attempt, in order. Rank 0
        is one process per attempt, and every node's log monitor forwards the same line, so lines are told
        apart by the worker's pid."""
        seen, found = set(), []
        for pid, value in re.findall(r"pid=(\d+)\)\S* \[magface\] " + pattern, self.text()):
            if pid not in seen:
                seen.add(pid)
                found.append(value)
        return found

    def attempts(self) -> list[int]:
        """The world size of each worker-group attempt so far."""
        return [int(w) for w in self.per_attempt(r"training on (\d+) worker")]

    def resumed_steps(self) -> list[int]:
        return [int(s) for s in self.per_attempt(r"resumed from checkpoint: epoch \d+, step (\d+)")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)


class Gate:
    """Paces the data (and so the training) until a file exists: the test opens it once the cluster events it
    wants to see during training have happened, and the rest of the run goes at full speed."""

    def __init__(self, path: str, seconds: float):
        self.path, self.seconds = path, seconds

    def __call__(self, batch):
        if not os.path.exists(self.path):
            time.sleep(self.seconds)
        return batch


def _drive(spec_path: str) -> int:
    import ray

    from magface.config import Config
    from magface.train.trainer import connect, run
    from tests.test_train import random_rows

    spec = json.loads(Path(spec_path).read_text())
    cfg = Config.from_dict(spec["config"])
    connect(cfg)
    ds = ray.data.from_items(random_rows(spec["rows"]))
    if spec.get("gate"):
        ds = ds.map_batches(Gate(spec["gate"], spec["gate_seconds"]), batch_size=spec["gate_batch"])
    result = run(cfg, ds)
    print("RESULT " + json.dumps({"error": repr(result.error) if result.error else None,
                                  "metrics": {k: v for k, v in result.metrics.items()
                                              if isinstance(v, (int, float, str))},
                                  "checkpoint": result.checkpoint_path}), flush=True)
    return 0 if result.error is None else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "driver":
        sys.exit(_drive(sys.argv[2]))
    sys.exit(__doc__)
