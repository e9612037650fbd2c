"""`python -m magface.data.synthetic --out DIR [...]`: generate (or reuse) a synthetic dataset."""

import argparse
import json
import time

from magface.data.synthetic.writers import generate, load_manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m magface.data.synthetic", description=__doc__)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-train-ids", type=int, default=300)
    p.add_argument("--images-per-id", type=int, default=24)
    p.add_argument("--num-eval-ids", type=int, default=60)
    p.add_argument("--eval-images-per-id", type=int, default=12)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--bin-pairs", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all available cores)")
    a = p.parse_args(argv)
    started = time.perf_counter()
    ds = generate(a.out, num_train_ids=a.num_train_ids, images_per_id=a.images_per_id, num_eval_ids=a.num_eval_ids,
                  eval_images_per_id=a.eval_images_per_id, image_size=a.image_size, bin_pairs=a.bin_pairs,
                  seed=a.seed, workers=a.workers)
    counts = load_manifest(ds.root)["counts"]
    print(json.dumps({"out": str(ds.root), "seconds": round(time.perf_counter() - started, 2), **counts}))


if __name__ == "__main__":
    main()
