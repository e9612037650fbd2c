"""Head benchmark: forward+backward time of the MagFace head vs the ArcFace head (same shapes, CPU), and of
the sharded head on 2 gloo workers vs 1 process, in one run.

    python benchmarks/heads.py [--classes 10000 50000 100000] [--batch 512] [--dim 512] [--iters 7] [--threads 1]

Prints ratios and writes benchmarks/results/heads.json. Every process uses --threads intra-op threads (1 by
default: one core per worker, and no idle-spinning threads inflating CPU time on a shared machine). MagFace and
ArcFace steps alternate in ABBA order so that drifting load hits both alike; figures are median steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magface.losses import LossConfig  # noqa: E402
from magface.sharded_fc import ShardedClassifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "heads.json"


def make_inputs(batch, dim, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, dim, generator=g) * 3  # magnitudes ~ 3*sqrt(dim): inside [l_a, u_a] for d=512
    labels = torch.randint(0, classes, (batch,), generator=g)
    return feats, labels


def step(head, feats, labels):
    """(wall seconds, process CPU seconds) of one forward+backward. CPU time is the robust figure on a shared
    machine: it does not grow when other processes take the cores."""
    f = feats.clone().requires_grad_(True)
    wall, cpu = time.perf_counter(), time.process_time()
    loss, _ = head(f, labels)
    loss.backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    head.weight.grad = None
    return wall, cpu


def medians(samples):
    return {"wall_s": statistics.median(s[0] for s in samples), "cpu_s": statistics.median(s[1] for s in samples)}


def compare_magface_arcface(batch, dim, classes, iters):
    feats, labels = make_inputs(batch, dim, classes)
    heads = {kind: ShardedClassifier(dim, classes, LossConfig(kind=kind)) for kind in ("magface", "arcface")}
    times = {kind: [] for kind in heads}
    for i in range(iters + 1):
        for kind in ("magface", "arcface") if i % 2 else ("arcface", "magface"):
            t = step(heads[kind], feats, labels)
            if i:  # the first step warms up allocators and kernels
                times[kind].append(t)
    return {kind: medians(ts) for kind, ts in times.items()}


def _sharded_worker(rank, world, port, batch, dim, classes, iters, threads, out):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        feats, labels = make_inputs(batch, dim, classes, seed=rank)  # each worker: its own local batch
        head = ShardedClassifier(dim, classes, LossConfig(), rank, world)
        times = []
        for i in range(iters + 1):
            dist.barrier()
            t = step(head, feats, labels)
            if i:
                times.append(t)
        shard_bytes = head.weight.numel() * head.weight.element_size()
        if rank == 0:
            Path(out).write_text(json.dumps({**medians(times), "shard_bytes": shard_bytes}))
    finally:
        dist.destroy_process_group()


def sharded_step_time(world, batch, dim, classes, iters, threads, tmp):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tmp) / f"sharded_{world}_{classes}.json"
    mp.spawn(_sharded_worker, args=(world, port, batch, dim, classes, iters, threads, str(out)), nprocs=world)
    return json.loads(out.read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    cores, threads = os.cpu_count(), args.threads
    torch.set_num_threads(threads)
    result = {
        "machine": f"{platform.machine()} CPU, {cores} cores, torch {torch.__version__}", "threads": threads,
        "load_average_at_start": os.getloadavg()[0],
        "batch": args.batch, "dim": args.dim, "iters": args.iters, "magface_vs_arcface": [], "sharded": [],
    }
    print(f"{result['machine']}, load average {os.getloadavg()[0]:.1f}; {threads} thread(s) per process; batch {args.batch}, d {args.dim}, median of {args.iters} fwd+bwd steps")
    print(f"{'classes':>8} {'magface wall/cpu s':>19} {'arcface wall/cpu s':>19} {'ratio wall/cpu':>15}")
    for c in args.classes:
        t = compare_magface_arcface(args.batch, args.dim, c, args.iters)
        row = {"classes": c, "magface": t["magface"], "arcface": t["arcface"],
               "ratio_wall": t["magface"]["wall_s"] / t["arcface"]["wall_s"],
               "ratio_cpu": t["magface"]["cpu_s"] / t["arcface"]["cpu_s"]}
        result["magface_vs_arcface"].append(row)
        print(f"{c:>8} {t['magface']['wall_s']:>9.3f}/{t['magface']['cpu_s']:<9.3f} "
              f"{t['arcface']['wall_s']:>9.3f}/{t['arcface']['cpu_s']:<9.3f} "
              f"{row['ratio_wall']:>7.3f}/{row['ratio_cpu']:<7.3f}")

    # Sharded: 1 process vs W=2 gloo workers (same threads each), for the same global batch (each worker's
    # local batch is batch/2) and for the same local batch (the global batch doubles).
    import tempfile

    print("\nsharded MagFace head, wall seconds per step (CPU seconds in the JSON)")
    print(f"{'classes':>8} {'1 proc s':>9} {'2w same global s':>17} {'ratio':>6} {'2w same local s':>16} "
          f"{'ratio':>6} {'shard MiB/worker (C*d*4/W)':>27}")
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.classes:
            one = sharded_step_time(1, args.batch, args.dim, c, args.iters, threads, tmp)
            same_global = sharded_step_time(2, args.batch // 2, args.dim, c, args.iters, threads, tmp)
            same_local = sharded_step_time(2, args.batch, args.dim, c, args.iters, threads, tmp)
            row = {
                "classes": c, "one_process_s": one["wall_s"],
                "two_workers_same_global_batch_s": same_global["wall_s"],
                "ratio_same_global_batch": same_global["wall_s"] / one["wall_s"],
                "two_workers_same_local_batch_s": same_local["wall_s"],
                "ratio_same_local_batch": same_local["wall_s"] / one["wall_s"],
                "cpu_s": {"one_process": one["cpu_s"], "two_workers_same_global_batch_per_worker": same_global["cpu_s"],
                          "two_workers_same_local_batch_per_worker": same_local["cpu_s"]},
                "shard_bytes_one": one["shard_bytes"], "shard_bytes_per_worker_two": same_local["shard_bytes"],
                "expected_bytes_per_worker_two": c * args.dim * 4 // 2,
            }
            result["sharded"].append(row)
            print(f"{c:>8} {row['one_process_s']:>9.3f} {row['two_workers_same_global_batch_s']:>17.3f} "
                  f"{row['ratio_same_global_batch']:>6.3f} {row['two_workers_same_local_batch_s']:>16.3f} "
                  f"{row['ratio_same_local_batch']:>6.3f} {row['shard_bytes_per_worker_two'] / 2**20:>13.1f} "
                  f"(1 proc: {row['shard_bytes_one'] / 2**20:.1f})")
    result["load_average_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    tmp_out.replace(args.out)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
