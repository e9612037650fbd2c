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
    p.add_argument("--num-eval-ids", type=int, default=150, help="identities of the .bin set and of the IJB set")
    p.add_argument("--eval-images-per-id", type=int, default=12)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--bin-pairs", type=int, default=6000, help="verification pairs, half genuine")
    p.add_argument("--ijb-templates-per-id", type=int, default=3)
    p.add_argument("--ijb-media-per-template", type=int, default=2)
    p.add_argument("--q-beta", type=float, nargs=2, default=(1.0, 1.0), metavar=("A", "B"),
                   help="training images: q ~ Beta(A, B)")
    p.add_argument("--eval-q-beta", type=float, nargs=2, default=None, metavar=("A", "B"),
                   help="evaluation images: q ~ Beta(A, B) (default: as --q-beta)")
    p.add_argument("--eval-identity-spread", type=float, default=1.0,
                   help="evaluation identities' shape/texture ranges, scaled (0, 1]: lower = look-alikes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all available cores)")
    a = p.parse_args(argv)
    started = time.perf_counter()
    ds = generate(a.out, num_train_ids=a.num_train_ids, images_per_id=a.images_per_id, num_eval_ids=a.num_eval_ids,
                  eval_images_per_id=a.eval_images_per_id, image_size=a.image_size, bin_pairs=a.bin_pairs,
                  ijb_templates_per_id=a.ijb_templates_per_id, ijb_media_per_template=a.ijb_media_per_template,
                  q_beta=tuple(a.q_beta), eval_q_beta=tuple(a.eval_q_beta) if a.eval_q_beta else None,
                  eval_identity_spread=a.eval_identity_spread, seed=a.seed, workers=a.workers)
    counts = load_manifest(ds.root)["counts"]
    print(json.dumps({"out": str(ds.root), "seconds": round(time.perf_counter() - started, 2), **counts}))


if __name__ == "__main__":
    main()
