"""Measured quality of a trained toy generator on held-out toy people (issue: PCDMs training, point 8).

For N ordered test pairs evenly spaced over ``market-pairs-test.csv`` (test identities:
never seen in training) of a toy Market made by ``make-toy-market``, scores
against the real target image:

- ``copy-source``: the source image itself (no generation), the floor;
- the generator's ablations ``B1`` (inpaint), ``B2`` (prior + inpaint),
  ``B3`` (inpaint + refine), ``full`` (Sec. 4.2), one sample per pair;
- ``toy-oracle``: the toy renderer's person in the target's exact pose, seen by
  the *source's* camera (what a perfect generator keeping the source's
  background would draw), the ceiling.

Metrics (reid_aug.quality): SSIM (sigma 1.5, community protocol), L1 over the
whole image, and L1 over the target person (the renderer's exact figure mask;
the background of another camera cannot be known from the source). A second
table splits the pairs into same-camera and cross-camera ones: copying the
source is nearly exact on the background of a same-camera pair, and no method
can know the background of a cross-camera one.

    python benchmarks/toy_generator_quality.py --generator GEN --data TOY_ROOT [--pairs 1000] [--steps 20]

Prints a markdown table and writes it (with settings) as JSON next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pcdms.pipeline import PCDMsPipeline
from pcdms.pose import read_annotation_csv, read_pairs_csv
from pcdms.encoders import load_image
from reid_aug.data.toy import plan_dataset, read_toy_manifest, ToyConfig
from reid_aug.data.toy_render import figure_mask
from reid_aug.data.toy import identity_for
from reid_aug.quality import l1, ssim
from reid_aug.quality.job import read_test_pairs, toy_oracle_images
from reid_aug.synthesis import parse_guidance

VARIANTS = ("copy-source", "B1", "B2", "B3", "full", "toy-oracle")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="toy Market root (make-toy-market)")
    ap.add_argument("--pairs", type=int, default=1000, help="test pairs, evenly spaced over the file (fewer: noisier)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=parse_guidance, default=2.0,
                    help="guidance scale w for all stages, or three comma-separated: prior,inpaint,refine")
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--refine-strength", type=float, default=1.0,
                    help="refining stage: 1 = from noise (paper); below 1 from the noised coarse latent (SDEdit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, ...; the noise is drawn on the CPU either way")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="pipeline dtype (bfloat16: about 2x faster on CPUs with native bf16)")
    ap.add_argument("--variants", default="B1,B2,B3,full", help="comma-separated generator variants to run")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the table and settings")
    ap.add_argument("--grid", type=Path, default=None,
                    help="PNG, one pair of each of 8 people: source | target skeleton | coarse | final | real target "
                         "(of 'full', else the most complete variant run)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - {"B1", "B2", "B3", "full"})
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from B1,B2,B3,full")
    torch.set_num_threads(args.threads)

    manifest = read_toy_manifest(args.data)
    if manifest is None:
        sys.exit(f"{args.data}: not a toy Market (no toy manifest)")
    toy_seed = int(manifest["seed"])
    shots = {s.name: s for s in plan_dataset(ToyConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                             for k, v in manifest["config"].items()}), toy_seed)}
    poses = read_annotation_csv(args.data / "market-annotation-test.csv")
    pairs = [(a, b) for a, b in read_pairs_csv(args.data / "market-pairs-test.csv") if a in poses and b in poses]
    # Evenly spaced over the file (it is sorted by person), so every test identity is represented.
    pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, min(args.pairs, len(pairs))).round().astype(int)]
    folders = {s.name: s.folder for s in shots.values()}
    path = lambda n: args.data / folders[n] / n  # noqa: E731

    pipe = PCDMsPipeline.from_pretrained(args.generator, device=args.device, dtype=getattr(torch, args.dtype))
    h, w = pipe.preset.image_size
    outputs = {v: [] for v in VARIANTS}
    coarse_by: dict[str, list] = {}
    t0 = time.time()
    for start in range(0, len(pairs), args.batch_size):
        chunk = pairs[start:start + args.batch_size]
        src = torch.stack([load_image(path(a), (h, w)) for a, _ in chunk])
        kp_s = torch.tensor(np.stack([poses[a] for a, _ in chunk]))
        kp_t = torch.tensor(np.stack([poses[b] for _, b in chunk]))
        for stages in args.variants.split(","):
            if stages in ("B2", "full") and pipe.prior is None or stages in ("B3", "full") and pipe.refine is None:
                continue
            gens = [torch.Generator().manual_seed(args.seed * 100_003 + start + i) for i in range(len(chunk))]
            res = pipe(src, kp_s, kp_t, num_inference_steps=args.steps, guidance_scale=args.guidance,
                       generator=gens, stages=stages, scheduler=args.scheduler, output_type="pil",
                       refine_strength=args.refine_strength)
            outputs[stages] += res.images
            coarse_by[stages] = coarse_by.get(stages, []) + list(res.coarse_images)
        for a, _ in chunk:
            outputs["copy-source"].append(Image.open(path(a)).convert("RGB"))
    seconds = time.time() - t0
    test_pairs = read_test_pairs(args.data)
    index = {(s.name, t.name): i for i, (s, t) in enumerate(zip(test_pairs.sources, test_pairs.targets))}
    oracle = toy_oracle_images(test_pairs)
    outputs["toy-oracle"] = [Image.fromarray(oracle[index[pair]]) for pair in pairs]

    targets = [Image.open(path(b)).convert("RGB") for _, b in pairs]
    masks = [figure_mask(identity_for(toy_seed, shots[b].pid), shots[b].pose, h, w)[0] for _, b in pairs]
    same_camera = np.array([shots[a].camid == shots[b].camid for a, b in pairs])
    rows, split = {}, {}
    for v, images in outputs.items():
        if not images:
            continue
        scores = {"ssim": np.array([ssim(p, t) for p, t in zip(images, targets)]),
                  "l1": np.array([l1(p, t) for p, t in zip(images, targets)]),
                  "person_l1": np.array([l1(p, t, m) for p, t, m in zip(images, targets, masks)])}
        rows[v] = {k: float(x.mean()) for k, x in scores.items()}
        split[v] = {part: {k: float(x[sel].mean()) for k, x in scores.items()}
                    for part, sel in (("same_camera", same_camera), ("cross_camera", ~same_camera)) if sel.any()}
    lines = ["| images | SSIM (sigma 1.5) | L1 (0-255) | person L1 (0-255) |", "|---|---|---|---|"]
    lines += [f"| {v} | {r['ssim']:.3f} | {r['l1']:.1f} | {r['person_l1']:.1f} |" for v, r in rows.items()]
    table = "\n".join(lines)
    print(table)
    fmt = lambda r: f"{r['ssim']:.3f} / {r['l1']:.1f} / {r['person_l1']:.1f}" if r else "-"  # noqa: E731
    split_lines = [f"| images | same camera ({int(same_camera.sum())} pairs) | cross camera "
                   f"({int((~same_camera).sum())} pairs) |", "|---|---|---|"]
    split_lines += [f"| {v} | {fmt(s.get('same_camera'))} | {fmt(s.get('cross_camera'))} |" for v, s in split.items()]
    split_table = "\n".join(split_lines)
    print("\nSSIM / L1 / person L1 by camera pair:\n" + split_table)
    settings = {"generator": str(args.generator), "data": str(args.data), "pairs": len(pairs), "steps": args.steps,
                "guidance": args.guidance, "refine_strength": args.refine_strength, "scheduler": args.scheduler,
                "seed": args.seed, "dtype": args.dtype,
                "device": args.device, "generation_seconds": round(seconds, 1)}
    print(json.dumps(settings))
    if args.out:
        args.out.write_text(json.dumps({"settings": settings, "rows": rows, "table": table, "by_camera": split,
                                            "by_camera_table": split_table}, indent=2) + "\n")
    shown = next((v for v in ("full", "B3", "B2", "B1") if outputs[v]), None)
    if args.grid and shown:
        from pcdms.pose import draw_skeleton
        from reid_aug.visualize import image_grid

        coarse_full, final = coarse_by[shown], outputs[shown]
        rows, seen = [], set()  # the first pair of each of the first 8 source people
        for i, (a, _) in enumerate(pairs):
            if shots[a].pid not in seen and len(rows) < 8:
                seen.add(shots[a].pid)
                rows.append(i)
        grid = image_grid([[Image.open(path(pairs[i][0])).convert("RGB"), draw_skeleton(poses[pairs[i][1]], (h, w), (h, w)),
                            coarse_full[i], final[i], targets[i]] for i in rows], cell=(h, w), gap=0)
        grid.save(args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
