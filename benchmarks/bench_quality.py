"""Time the image-quality metrics of ``reid-aug quality`` on N random 128x64 pairs (Market test set: 12,000).

Random images and random network weights (the cost does not depend on either): SSIM (both
sigmas, scikit-image, CPU), LPIPS + masked LPIPS (AlexNet, on --device), and the two FIDs'
feature passes (torchvision Inception and TF-Inception at 299x299, on --device) over the
predictions plus a reference set of --reference images, then their distance. Appends one
row per metric to benchmarks/RESULTS.md.

    python benchmarks/bench_quality.py --pairs 12000 --reference 12936 --device cuda   # the Market sizes
    python benchmarks/bench_quality.py --pairs 300 --reference 300 --threads 2         # a CPU sample
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _results import device_name, print_json, record, resolve_device
from reid_aug.quality.fid import add_images, build_fid, compute_fid
from reid_aug.quality.job import score_pairs
from reid_aug.quality.perceptual import load_lpips
from reid_aug.quality.pixel import pose_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--reference", type=int, default=300, help="FID reference images (Market train: 12,936)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    device = resolve_device(parser, args.device, args.threads)
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 256, (args.pairs, 128, 64, 3), dtype=np.uint8)
    targets = rng.integers(0, 256, (args.pairs, 128, 64, 3), dtype=np.uint8)
    reference = torch.from_numpy(rng.integers(0, 256, (args.reference, 3, 128, 64), dtype=np.uint8))
    kp = np.full((18, 2), -1)
    kp[[1, 2, 5, 8, 11]] = [(32, 20), (22, 22), (42, 22), (26, 64), (38, 64)]
    masks = [pose_mask(kp, (128, 64))] * args.pairs
    lpips_model = load_lpips(None, allow_random_weights=True, device=device)

    timings = {}
    t = time.perf_counter()
    score_pairs(preds, targets, masks, lpips_model, args.batch_size)  # SSIM x2, L1 x2, LPIPS x2
    timings["score_pairs (SSIM x2, L1 x2, LPIPS + masked LPIPS)"] = time.perf_counter() - t
    fake = torch.from_numpy(preds).permute(0, 3, 1, 2).contiguous()
    for variant in ("community", "standard"):
        metric = build_fid(variant, None, allow_random_weights=True, device=device)
        t = time.perf_counter()
        add_images(metric, reference, real=True, batch_size=args.batch_size)
        add_images(metric, fake, real=False, batch_size=args.batch_size)
        compute_fid(metric)
        timings[f"FID {variant} (features of both sets + distance)"] = time.perf_counter() - t
    dev = device_name(device)
    settings = (f"{args.pairs:,} pairs of random 128x64 images, {args.reference:,} FID reference images, "
                f"batch {args.batch_size}, random weights")
    rows = []
    for name, seconds in timings.items():
        images = args.pairs + (args.reference if name.startswith("FID") else 0)
        rows.append((f"bench_quality {name}", f"{seconds:.1f} s ({images / seconds:.0f} img/s)", settings))
    record(rows, dev, args.no_write)
    print_json({"device": dev, "pairs": args.pairs, "reference": args.reference, "seconds": timings})


if __name__ == "__main__":
    main()
