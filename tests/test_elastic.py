"""Elastic training without Ray: the worker-count-independent train state, safe loading, the batch policy,
and a W=2 checkpoint resumed by 1 and 3 gloo processes giving the same losses as continuing with 2."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from magface.config import Config, ConfigError
from magface.losses import LossConfig
from magface.sharded_fc import ShardedClassifier, shard_range
from magface.train.schedule import batch_split, epoch_steps
from magface.train.state import (SHARED_FILE, legacy_state_file, load_train_state, restore_train_state,
                                 rows_file, save_train_state)

EMB, CLASSES = 8, 11


def _rank_state(rank, world, seed=0):
    """A classifier shard with an SGD momentum buffer after two fake steps, plus a 'backbone' parameter."""
    torch.manual_seed(seed + rank)
    clf = ShardedClassifier(EMB, CLASSES, LossConfig(s=16.0), rank=rank, world_size=world)
    backbone = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": clf.parameters()}], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    g = torch.Generator().manual_seed(99)  # the same backbone gradient on every rank, as under DDP
    for _ in range(2):
        for p in backbone.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        clf.weight.grad = torch.randn_like(clf.weight)
        opt.step()
        sched.step()
    return clf, backbone, opt, sched


def _write_world(tmp_path, world):
    parts = [_rank_state(r, world) for r in range(world)]
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    for r, (clf, _, opt, sched) in enumerate(parts):
        save_train_state(tmp_path, rank=r, world_size=world, classifier=clf, optimizer=opt, scheduler=sched,
                         scaler=scaler, epoch=3, step=17, extra={"epoch_step": 5})
    weight = torch.cat([p[0].weight.detach() for p in parts])
    momentum = torch.cat([p[2].state[p[0].weight]["momentum_buffer"] for p in parts])
    return parts, weight, momentum


@pytest.mark.parametrize("new_world", [1, 2, 3, 4])
def test_state_written_by_two_ranks_loads_at_any_world_size(tmp_path, new_world):
    parts, weight, momentum = _write_world(tmp_path, 2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [rows_file(tmp_path, 0, 6).name, rows_file(tmp_path, 6, 11).name, SHARED_FILE]
    for r in range(new_world):
        clf, backbone, opt, sched = _rank_state(r, new_world, seed=123)  # different values, to be overwritten
        scaler = torch.amp.GradScaler("cpu")
        state = load_train_state(tmp_path, rank=r, world_size=new_world)
        assert restore_train_state(state, classifier=clf, optimizer=opt, scheduler=sched, scaler=scaler) == (3, 17)
        start, end = shard_range(CLASSES, r, new_world)
        assert torch.equal(clf.weight.detach(), weight[start:end])
        assert torch.equal(opt.state[clf.weight]["momentum_buffer"], momentum[start:end])
        ref_backbone, ref_opt = parts[0][1], parts[0][2]
        for p, q in zip(backbone.parameters(), ref_backbone.parameters()):
            assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])
        assert sched.last_epoch == 2 and sched.get_last_lr() == parts[0][3].get_last_lr()
        assert scaler.get_scale() == 512.0 and state["extra"] == {"epoch_step": 5} and state["world_size"] == 2


def test_missing_or_overlapping_rows_are_refused_by_name(tmp_path):
    _write_world(tmp_path, 2)
    rows_file(tmp_path, 6, 11).rename(rows_file(tmp_path, 7, 11))
    with pytest.raises(ValueError, match=r"classifier rows missing at class 6 \(classifier_rows_000000007"):
        load_train_state(tmp_path, rank=0, world_size=1)
    rows_file(tmp_path, 7, 11).unlink()
    with pytest.raises(ValueError, match=r"cover classes \[0, 6\) of 11; the checkpoint is incomplete"):
        load_train_state(tmp_path, rank=0, world_size=1)


def test_legacy_per_rank_state_loads_at_its_world_size_only(tmp_path):
    clf, _, opt, sched = _rank_state(1, 2)
    legacy = {"format": "magface-train-state/1", "rank": 1, "world_size": 2, "classifier": clf.state_dict(),
              "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": None, "epoch": 1, "step": 4}
    torch.save(legacy, legacy_state_file(tmp_path, 1))
    clf2, _, opt2, sched2 = _rank_state(1, 2, seed=5)
    state = load_train_state(tmp_path, rank=1, world_size=2)
    assert restore_train_state(state, classifier=clf2, optimizer=opt2, scheduler=sched2) == (1, 4)
    assert torch.equal(clf2.weight, clf.weight)
    assert torch.equal(opt2.state[clf2.weight]["momentum_buffer"], opt.state[clf.weight]["momentum_buffer"])
    with pytest.raises(ValueError, match="older per-rank format, saved with world_size=2, resuming with 3"):
        load_train_state(tmp_path, rank=1, world_size=3)


class _Pwn:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("layout", ["shared", "rows", "legacy"])
def test_hostile_train_state_is_refused_and_runs_nothing(tmp_path, layout):
    """A train state holding an object whose unpickling runs a shell command is refused; the command never
    runs (torch.load with weights_only=True)."""
    ckpt, pwned = tmp_path / "ckpt", tmp_path / "PWNED"
    _write_world(ckpt, 2)
    if layout == "legacy":
        for f in ckpt.iterdir():
            f.unlink()
        target, payload = legacy_state_file(ckpt, 0), {"format": "magface-train-state/1", "world_size": 1}
    elif layout == "shared":
        target = ckpt / SHARED_FILE
        payload = torch.load(target, weights_only=True)
    else:
        target = rows_file(ckpt, 0, 6)
        payload = torch.load(target, weights_only=True)
    payload["evil"] = _Pwn(pwned)
    torch.save(payload, target)
    with open(target, "rb") as f:  # the payload really is there: plain unpickling would run it
        assert b"system" in f.read()
    with pytest.raises(ValueError, match=rf"{target.name}: refused to load"):
        load_train_state(ckpt, rank=0, world_size=1)
    assert not pwned.exists()


def test_batch_policy_split_and_epoch_length():
    assert batch_split(64, 3) == [22, 21, 21] and batch_split(8, 2) == [4, 4] and sum(batch_split(7, 7)) == 7
    with pytest.raises(ValueError):
        batch_split(2, 3)
    # fixed W: the old rule floor(floor(N / W) / b); elastic: the tightest worker count in the range
    assert epoch_steps(16, 4, 2, 2) == 4 and epoch_steps(1000, 64, 1, 3) == 15
    assert epoch_steps(960, 64, 1, 3) == 14 == min((960 // w) // -(-64 // w) for w in (1, 2, 3))
    cfg = Config.from_dict({"data": {"num_classes": 5}, "train": {"batch_size": 8},
                            "scaling": {"num_workers": [1, 3]}})
    assert cfg.scaling.elastic and (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 3)
    assert cfg.global_batch_size == 24
    with pytest.raises(ConfigError, match="global batch of 2 cannot give each of 3 workers a sample"):
        Config.from_dict({"data": {"num_classes": 5}, "train": {"global_batch_size": 2},
                          "scaling": {"num_workers": [1, 3]}})
    for bad in ([3, 1], [0, 2], [1, 2, 3], "two", 1.5):
        with pytest.raises(ConfigError, match="scaling.num_workers must be an int or"):
            Config.from_dict({"data": {"num_classes": 5}, "scaling": {"num_workers": bad}})


# ------------------------------------------------------------------- resume at another world size (gloo)
GLOBAL_BATCH, IMAGE, NET_EMB = 12, 16, 16


def _setup(rank, world, port):
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    from magface.models import get_backbone
    from magface.train.loop import _init_classifier_shard

    backbone = get_backbone("small", embedding_size=NET_EMB, input_size=IMAGE, width=4)
    backbone.eval()  # BatchNorm on running statistics: the step does not depend on how the batch is split
    model = torch.nn.parallel.DistributedDataParallel(backbone) if world > 1 else backbone
    clf = ShardedClassifier(NET_EMB, CLASSES, LossConfig(s=16.0, lambda_g=35.0), rank=rank, world_size=world)
    _init_classifier_shard(clf, 0)
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": clf.parameters()}], lr=0.05,
                          momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return backbone, model, clf, opt, sched


def _step(rank, world, step, model, clf, opt, sched):
    g = torch.Generator().manual_seed(1000 + step)  # the global batch of this step, whatever the split
    images = torch.rand(GLOBAL_BATCH, 3, IMAGE, IMAGE, generator=g)
    labels = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)
    counts = batch_split(GLOBAL_BATCH, world)
    lo = sum(counts[:rank])
    loss, _ = clf(model(images[lo:lo + counts[rank]]), labels[lo:lo + counts[rank]], counts)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def _worker(rank, world, port, ckpt, mode, out):
    backbone, model, clf, opt, sched = _setup(rank, world, port)
    losses = []
    if mode == "write":  # two steps at W=2, checkpoint, then the reference continuation
        for s in range(2):
            _step(rank, world, s, model, clf, opt, sched)
        save_train_state(ckpt, rank=rank, world_size=world, classifier=clf, optimizer=opt, scheduler=sched,
                         epoch=0, step=2)
        if rank == 0:
            torch.save(backbone.state_dict(), os.path.join(ckpt, "backbone.pt"))
        if world > 1:
            torch.distributed.barrier()
    else:
        backbone.load_state_dict(torch.load(os.path.join(ckpt, "backbone.pt"), weights_only=True))
        state = load_train_state(ckpt, rank=rank, world_size=world)
        assert restore_train_state(state, classifier=clf, optimizer=opt, scheduler=sched) == (0, 2)
    for s in (2, 3):  # the momentum buffers and the schedule position must survive the resize
        losses.append(_step(rank, world, s, model, clf, opt, sched))
    if rank == 0:
        torch.save(losses, out)
    _teardown(world)


def _teardown(world):
    """Leave the group together: a rank exiting while gloo still talks to the other aborts (SIGABRT)."""
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _run(world, ckpt, mode, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"losses_{mode}_{world}.pt")
    mp.start_processes(_worker, args=(world, port, str(ckpt), mode, out), nprocs=world, start_method="spawn")
    return torch.load(out)


@pytest.mark.slow
def test_two_worker_checkpoint_resumed_by_one_and_three_workers_gives_the_same_losses(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    reference = _run(2, ckpt, "write", tmp_path)  # W=2 continuing from its own step 2
    assert sorted(p.name for p in ckpt.iterdir())[:2] == ["backbone.pt", rows_file(ckpt, 0, 6).name]
    for world in (1, 3):
        resumed = _run(world, ckpt, "read", tmp_path)
        assert resumed == pytest.approx(reference, rel=1e-5, abs=1e-6), world
    assert reference[1] != pytest.approx(reference[0], rel=1e-3)  # the second step really moved the weights


def _overflow_worker(rank, world, port, out):
    import torch.distributed as dist

    from magface.train.loop import _agree_on_overflow

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    grads = []
    for bad_rank in (None, 1):  # a finite step, then rank 1's shard overflows
        g = torch.ones(3, 2) * (rank + 1)
        if rank == bad_rank:
            g[0, 1] = float("inf")
        _agree_on_overflow(g)
        grads.append(g)
    torch.save(grads, f"{out}_{rank}.pt")
    _teardown(world)


def test_fp16_overflow_in_one_shard_makes_every_rank_skip(tmp_path):
    """GradScaler skips a step when its rank's gradients overflow; with the classifier sharded, every rank
    must see the overflow of any shard, or the ranks would take different steps."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads")
    mp.start_processes(_overflow_worker, args=(2, port, out), nprocs=2, start_method="spawn")
    for rank in range(2):
        finite, overflowed = torch.load(f"{out}_{rank}.pt")
        assert torch.equal(finite, torch.ones(3, 2) * (rank + 1))  # untouched when every shard is finite
        assert torch.isinf(overflowed).all()


def test_remote_checkpoint_downloads_only_the_rows_a_rank_needs(s3_env, tmp_path):
    """On S3 a resuming rank fetches the shared state and the row files overlapping its new class range, not
    the whole classifier (2M classes x 512 is 8 GiB with momentum)."""
    import boto3
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from magface.train.state import checkpoint_files
    from tests.s3_server import MOTO_CREDENTIALS, make_bucket

    make_bucket("ckpts")
    local = tmp_path / "written"
    _, weight, momentum = _write_world(local, 2)  # rows [0, 6) and [6, 11)
    s3 = boto3.client("s3")
    for f in local.iterdir():
        s3.upload_file(str(f), "ckpts", f"run/ckpt/{f.name}")
    fs = pafs.S3FileSystem(access_key=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                           secret_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], endpoint_override=s3_env,
                           region="us-east-1")
    with checkpoint_files(Checkpoint("ckpts/run/ckpt", filesystem=fs), rank=2, world_size=3) as d:
        sizes = {p.name: p.stat().st_size for p in Path(d).iterdir()}
        assert sizes[rows_file(d, 0, 6).name] == 0  # not downloaded: rank 2 of 3 owns classes [8, 11)
        assert sizes[rows_file(d, 6, 11).name] == rows_file(local, 6, 11).stat().st_size
        state = load_train_state(d, rank=2, world_size=3)
    assert torch.equal(state["classifier"]["weight"], weight[8:11])
    assert torch.equal(state["optimizer"]["state"][2]["momentum_buffer"], momentum[8:11])
