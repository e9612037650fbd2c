"""Training-step throughput through the real job (TorchTrainer, Ray Data, DDP, sharded classifier).

    python benchmarks/train_step.py                       # CPU: 1 vs 2 workers, the small CNN at 56x56
    python benchmarks/train_step.py --gpu --backbone iresnet100 --image-size 112 --batch-size 128 --amp bf16

Samples/s are counted by rank 0 from the end of the first step (warm-up excluded) to the end of the epoch,
over all workers. Results go to benchmarks/results/train_step.json.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from magface.config import Config  # noqa: E402
from magface.train.trainer import connect, run  # noqa: E402


def measure(args, workers: int, storage: str) -> float:
    import ray

    n = workers * args.batch_size * (args.steps + 1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, args.image_size, args.image_size, 3), dtype=np.uint8)
    ds = ray.data.from_items([{"key": i, "label": i % args.num_classes, "image": images[i]} for i in range(n)])
    cfg = Config.from_dict({
        "data": {"num_classes": args.num_classes, "image_size": args.image_size, "shuffle": "none"},
        "model": {"backbone": args.backbone, "embedding_size": args.embedding_size},
        "train": {"name": f"bench_{workers}w_{time.time_ns()}", "storage_path": storage, "epochs": 1,
                  "batch_size": args.batch_size, "amp": args.amp, "max_failures": 0},
        "scaling": {"num_workers": workers, "use_gpu": args.gpu, "cpus_per_worker": args.cpus_per_worker},
        "tracking": {"enabled": False, "log_every": 10},
    })
    result = run(cfg, ds)
    if result.error is not None:
        raise RuntimeError(result.error)
    return float(result.metrics["samples_per_s"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="small")
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--embedding-size", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.json"))
    args = p.parse_args()

    counts = [int(w) for w in args.workers.split(",")]
    connect(Config.from_dict({"data": {"num_classes": 2},
                              "scaling": {"num_workers": max(counts), "cpus_per_worker": args.cpus_per_worker}}))
    with tempfile.TemporaryDirectory(prefix="magface_bench_") as storage:
        results = {w: measure(args, w, storage) for w in counts}
    base = results[counts[0]]
    print(f"\n{args.backbone} {args.image_size}x{args.image_size}, batch {args.batch_size}/worker, amp {args.amp}, "
          f"{'GPU' if args.gpu else 'CPU'} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    print(f"{'workers':>8} {'samples/s':>12} {'vs ' + str(counts[0]) + ' worker':>14}")
    for w, sps in results.items():
        print(f"{w:>8} {sps:>12.1f} {sps / base:>13.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    record = {"args": vars(args), "samples_per_s": results, "cpu_count": os.cpu_count(),
              "machine": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(args.out + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
