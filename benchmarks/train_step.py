"""Training-step throughput through the real job (TorchTrainer, Ray Data, DDP, sharded classifier).

    python benchmarks/train_step.py          # CPU: 1 vs 2 workers, the small CNN at 56x56
    python benchmarks/train_step.py --gpu    # every visible GPU: iResNet100 112x112, batch 128/GPU, fp16,
                                             # channels_last; 1 GPU and all GPUs, next to published figures

Samples/s are counted by rank 0 from the end of the first step (warm-up excluded) to the end of the epoch,
over all workers, and printed per worker (per GPU). Images are random uint8 made by Ray Data tasks, so the
figure is the training step plus the ingest hand-off, not JPEG decoding. The reference, measured in the same
run: the same step in one bare process with the batch already on the device (no Ray, no data path); the job's
one-worker rate is printed as a ratio of it. Results go to benchmarks/results/train_step.json.
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
from magface.console import quiet_ray  # noqa: E402
from magface.train.trainer import connect, run  # noqa: E402

# Published training throughput of an iResNet100 at 112x112, for comparison (images/s per GPU).
# The README's "published anchors": official MagFace ~2014 img/s on 8 V100 with fp16; arcface_torch r100
# ~3000-3400 samples/s on 8 GPUs (midpoint / 8).
ANCHORS = [
    ("official MagFace repository, iResNet100, fp16, 8x V100", 252.0),
    ("insightface arcface_torch, r100, fp16, 8 GPUs", 325.0),
]
GPU_DEFAULTS = {"backbone": "iresnet100", "image_size": 112, "embedding_size": 512, "batch_size": 128,
                "amp": "fp16", "num_classes": 10000, "steps": 40, "channels_last": True}
CPU_DEFAULTS = {"backbone": "small", "image_size": 56, "embedding_size": 128, "batch_size": 32, "amp": "none",
                "num_classes": 1000, "steps": 20, "channels_last": False}


class RandomImages:
    """Ray Data batch function: `id` rows -> key, label and a random uint8 image (seeded by the first id)."""

    def __init__(self, image_size: int, num_classes: int):
        self.image_size, self.num_classes = image_size, num_classes

    def __call__(self, batch):
        ids = batch["id"]
        rng = np.random.default_rng(int(ids[0]))
        s = self.image_size
        return {"key": ids, "label": ids % self.num_classes,
                "image": rng.integers(0, 256, (len(ids), s, s, 3), dtype=np.uint8)}


def measure(args, workers: int, storage: str) -> float:
    import ray

    n = workers * args.batch_size * (args.steps + 1)
    ds = ray.data.range(n).map_batches(RandomImages(args.image_size, args.num_classes), batch_size=256)
    cfg = Config.from_dict(job_config(args, workers, n, storage))
    result = run(cfg, ds)
    if result.error is not None:
        raise RuntimeError(result.error)
    return float(result.metrics["samples_per_s"])


def job_config(args, workers: int, n: int, storage: str) -> dict:
    return {
        "data": {"num_classes": args.num_classes, "image_size": args.image_size, "shuffle": "none",
                 "num_images": n},
        "model": {"backbone": args.backbone, "embedding_size": args.embedding_size},
        "train": {"name": f"bench_{workers}w_{time.time_ns()}", "storage_path": storage, "epochs": 1,
                  "batch_size": args.batch_size, "amp": args.amp, "max_failures": 0,
                  "channels_last": args.channels_last, "compile": args.compile},
        "scaling": {"num_workers": workers, "use_gpu": args.gpu, "cpus_per_worker": args.cpus_per_worker},
        "tracking": {"enabled": False, "log_every": 10},
    }


def bare_rate(args, cfg_dict: dict) -> float:
    """Reference measured in the same run: the job's backbone, head, optimizer, precision and gradient clip in
    one process on one device, with one batch already on the device (no Ray, no data path, no DDP). The job's
    per-worker rate over this is what Ray Train, Ray Data and the loop's bookkeeping leave of the compute."""
    import torch

    from magface.models import get_backbone
    from magface.sharded_fc import ShardedClassifier
    from magface.train.loop import apply_gradients

    cfg = Config.from_dict(cfg_dict)
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.manual_seed(0)
    if not args.gpu:  # as many threads as a job worker gets (Ray sets OMP_NUM_THREADS to its CPUs)
        torch.set_num_threads(max(1, int(args.cpus_per_worker)))
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    backbone = get_backbone(args.backbone, embedding_size=args.embedding_size, input_size=args.image_size)
    backbone.to(device).to(memory_format=fmt)
    model = torch.compile(backbone) if args.compile else backbone
    classifier = ShardedClassifier(args.embedding_size, args.num_classes, cfg.loss).to(device)
    optimizer = torch.optim.SGD([{"params": backbone.parameters()}, {"params": classifier.parameters()}],
                                lr=0.01, momentum=0.9, weight_decay=5e-4)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device) \
        .contiguous(memory_format=fmt)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def step():
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            features = model(images)
        loss, _ = classifier(features.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        apply_gradients(loss, optimizer, scaler, backbone.parameters(), cfg.optim.grad_clip)

    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator, compilation
        step()
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    return args.steps * args.batch_size / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="train on GPUs (defaults switch to the iResNet100 setup)")
    p.add_argument("--backbone")
    p.add_argument("--image-size", type=int)
    p.add_argument("--embedding-size", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--batch-size", type=int, help="per worker")
    p.add_argument("--steps", type=int)
    p.add_argument("--workers", help="comma-separated worker counts (default: 1,2 on CPU; 1,<all GPUs> on GPU)")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.json"))
    args = p.parse_args()
    for key, value in (GPU_DEFAULTS if args.gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    if args.gpu:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise SystemExit("--gpu: no CUDA device visible to torch on this node")
        device = f"{gpus} x {torch.cuda.get_device_name(0)}"
        args.workers = args.workers or ",".join(str(w) for w in sorted({1, gpus}))
        args.cpus_per_worker = args.cpus_per_worker or max(1.0, (os.cpu_count() or 2) // (2 * gpus))
    args.workers = args.workers or "1,2"
    args.cpus_per_worker = args.cpus_per_worker or 1.0
    counts = [int(w) for w in args.workers.split(",")]
    quiet_ray()
    connect(Config.from_dict({"data": {"num_classes": 2},
                              "scaling": {"num_workers": max(counts), "cpus_per_worker": args.cpus_per_worker}}))
    with tempfile.TemporaryDirectory(prefix="magface_bench_") as storage:
        results = {w: measure(args, w, storage) for w in counts}
        bare = bare_rate(args, job_config(args, 1, args.batch_size, storage))
    base = results[counts[0]] / counts[0]
    unit = "GPU" if args.gpu else "worker"
    print(f"\n{args.backbone} {args.image_size}x{args.image_size}, batch {args.batch_size}/{unit}, amp {args.amp}, "
          f"channels_last {args.channels_last}, compile {args.compile}, on {device}")
    print(f"{'workers':>8} {'samples/s':>12} {'per ' + unit:>12} {'scaling':>8}")
    for w, sps in results.items():
        print(f"{w:>8} {sps:>12.1f} {sps / w:>12.1f} {sps / w / base:>7.2f}x")
    print(f"reference, same run: the same step in one bare process (no Ray, batch on the device) {bare:.1f} "
          f"samples/s; the job's 1-worker rate is {results.get(1, float('nan')) / bare:.2f}x of it")
    if args.gpu:
        print("published, per GPU (other GPUs and stacks: a reference point, not a like-for-like comparison):")
        for name, value in ANCHORS:
            print(f"  {value:>7.0f}  {name}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    record = {"args": vars(args), "device": device, "samples_per_s": results, "bare_samples_per_s": bare,
              "samples_per_s_per_worker": {w: s / w for w, s in results.items()},
              "anchors_per_gpu": dict((n, v) for n, v in ANCHORS) if args.gpu else None,
              "cpu_count": os.cpu_count(), "machine": platform.platform(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(args.out + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
