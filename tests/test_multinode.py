"""Elastic training on a real multi-node Ray cluster on this machine (no mocks): worker nodes are separate
`ray start` processes with one `trainer_slot` each, so every training worker lands on its own node. A node is
killed mid-epoch and the run continues on one worker from the last checkpoint; a node is added and the group
grows back to two; the run ends with its step count intact."""

import json

import pytest

from magface.train.state import load_train_state
from tests.ray_nodes import (REPO, TRAINER_RESOURCE, Driver, cluster_resource, fake_node_raylets,
                             kill_process_tree, registered_steps, start_autoscaling_head, start_head, start_worker,
                             wait_for)
from tests.test_train import tiny_config

pytestmark = pytest.mark.slow


def test_node_lost_and_added_back_mid_run(tmp_path):
    nodes = []
    try:
        head, address = start_head(tmp_path, num_cpus=2)
        nodes.append(head)
        workers = [start_worker(tmp_path, address, f"worker{i}") for i in (1, 2)]
        nodes += workers
        wait_for(lambda: cluster_resource(address, TRAINER_RESOURCE) == 2, 120, "two worker nodes", poll=2)

        # 64 rows, global batch 4 -> 16 steps/epoch at 1 or 2 workers; 6 epochs; a checkpoint every 4 steps.
        cfg = tiny_config(tmp_path, "elastic", data={"num_images": 64},
                          train={"epochs": 6, "global_batch_size": 4, "checkpoint_every_steps": 4,
                                 "max_failures": 4, "num_to_keep": 3, "channels_last": True},
                          scaling={"num_workers": [1, 2], "cpus_per_worker": 1,
                                   "resources_per_worker": {TRAINER_RESOURCE: 1}, "elastic_resize_interval_s": 2})
        gate = tmp_path / "full_speed"
        driver = Driver({"config": cfg.to_dict(), "rows": 64, "gate": str(gate), "gate_seconds": 0.5,
                         "gate_batch": 2}, tmp_path, address)
        job_dir = tmp_path / "runs" / "elastic"

        wait_for(lambda: driver.attempts() == [2], 240, "training on 2 workers")
        wait_for(lambda: any(s >= 8 for s in registered_steps(job_dir)), 240, "a registered checkpoint, step >= 8")
        registered_at_kill = max(registered_steps(job_dir))
        workers[1].kill()  # a spot node disappears: its raylet and workers die with their process group

        wait_for(lambda: 1 in driver.attempts(), 240, "the group shrinking to 1")
        nodes.append(start_worker(tmp_path, address, "worker3"))  # a replacement node joins
        wait_for(lambda: driver.attempts()[-1] == 2 and 1 in driver.attempts(), 240, "the group growing back to 2")
        gate.touch()
        driver.proc.wait(timeout=300)
        log = driver.text()
        assert driver.proc.returncode == 0, log[-4000:]
    finally:
        for node in reversed(nodes):
            node.stop()
        if "driver" in locals():
            driver.stop()

    result = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
    assert result["metrics"]["step"] == 6 * 16 and result["metrics"]["epoch"] == 6
    assert result["metrics"]["world_size"] == 2
    sizes = driver.attempts()
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    # Each restart began from the latest registered checkpoint, on the checkpoint grid; the steps run after it
    # and before the node loss are run again (fewer than checkpoint_every_steps + the steps in flight while the
    # restart was decided); the counter itself never skips or repeats: the run ends at exactly 6 x 16.
    resumed = driver.resumed_steps()
    assert len(resumed) == len(sizes) - 1 and all(s % 4 == 0 for s in resumed) and resumed == sorted(resumed)
    assert resumed[0] >= registered_at_kill, (resumed, registered_at_kill)
    # num_to_keep bounds storage; the last checkpoint (written by 2 workers) loads at any worker count.
    kept = sorted(job_dir.glob("checkpoint_epoch*"))
    assert len(kept) == 3 and kept[-1].name == "checkpoint_epoch006_step00000096", kept
    last = kept[-1]
    for world in (1, 3):
        states = [load_train_state(last, rank=r, world_size=world) for r in range(world)]
        assert sum(s["classifier"]["weight"].shape[0] for s in states) == cfg.data.num_classes
        assert {s["step"] for s in states} == {96}


def _raylet_lines(head):  # diagnostics for a failed assertion
    import subprocess

    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,sid=,args="], capture_output=True, text=True).stdout
    return [(head.proc.pid, line[:300]) for line in out.splitlines() if "raylet/raylet " in line]


def test_autoscaler_launches_nodes_for_an_elastic_job(tmp_path):
    """Ray's fake multi-node provider (the one Ray's autoscaler tests use) with node types shaped like
    ray_cluster.yaml's. No training node exists at first: the elastic job's resource request makes the
    autoscaler launch nodes of the training type and the group grows to its maximum; a training node is then
    killed under the job: autoscaler v2 sees its Ray node dead, terminates the instance and launches a
    replacement; the group restarts from the latest checkpoint on 2 workers and the run finishes."""
    head, training_type = None, "gpu_8x_a100"
    try:
        head, address = start_autoscaling_head(tmp_path, REPO / "ray_cluster.yaml", training_type, "gpu_1x_a10g")
        assert fake_node_raylets(head) == {}
        cfg = tiny_config(tmp_path, "autoscaled", data={"num_images": 64},
                          train={"epochs": 6, "global_batch_size": 4, "checkpoint_every_steps": 4,
                                 "max_failures": 6},
                          scaling={"num_workers": [1, 2], "cpus_per_worker": 1,
                                   "resources_per_worker": {TRAINER_RESOURCE: 1}, "elastic_resize_interval_s": 2})
        gate = tmp_path / "full_speed"
        driver = Driver({"config": cfg.to_dict(), "rows": 64, "gate": str(gate), "gate_seconds": 0.5,
                         "gate_batch": 2}, tmp_path, address)
        job_dir = tmp_path / "runs" / "autoscaled"
        wait_for(lambda: 2 in driver.attempts(), 420, "the autoscaler's nodes and a group of 2")
        launched = fake_node_raylets(head, training_type)
        # the training type's max_workers (2) bounds what the autoscaler launched for the trainers
        assert len(launched) == 2 and cluster_resource(address, TRAINER_RESOURCE) == 2, _raylet_lines(head)
        wait_for(lambda: any(s >= 4 for s in registered_steps(job_dir)), 240, "a registered checkpoint")
        registered_at_kill = max(registered_steps(job_dir))
        attempts_before = len(driver.attempts())
        kill_process_tree(launched[sorted(launched)[0]])  # the node is terminated under the job
        replacement = wait_for(lambda: set(fake_node_raylets(head, training_type)) - set(launched), 240,
                               "the autoscaler's replacement node")
        # The group restarts from the latest checkpoint: on 1 worker and then 2 again, or straight on 2 when the
        # replacement is up before the restart is decided (seconds apart here).
        wait_for(lambda: len(driver.attempts()) > attempts_before and driver.attempts()[-1] == 2, 240,
                 "a restarted group of 2")
        gate.touch()
        driver.proc.wait(timeout=300)
        log = driver.text()
        assert driver.proc.returncode == 0, log[-4000:]
    finally:
        if head is not None:
            head.stop()  # the fake nodes work in the head's session folder: they go with it
        if "driver" in locals():
            driver.stop()
    result = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
    assert result["metrics"]["step"] == 6 * 16 and result["metrics"]["world_size"] == 2
    assert len(replacement) == 1, replacement  # one node lost, one launched in its place
    sizes = driver.attempts()
    assert sizes[attempts_before - 1] == 2 and sizes[-1] == 2 and len(sizes) > attempts_before, sizes
    assert driver.resumed_steps()[-1] >= registered_at_kill
