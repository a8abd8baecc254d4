"""Time PCDMs stage training (Shen et al., ICLR 2024, Sec. 3.3-3.4, App. B): optimizer steps/s, random weights.

Each step is the real one of ``reid-aug train-pcdms`` (:func:`pcdms.training.loop.train` with the
stage's task from :mod:`pcdms.training.tasks`: forward, loss, backward, clipping, AdamW, EMA),
on cached encoder outputs as training uses them; only the cache is replaced by random tensors
of the same shapes (a step's speed does not depend on their values), so no image, VAE, CLIP or
DINOv2 weight is needed. On one GPU (the issue's figure: the paper-size stage 2 at batch 32 on
128x64 Market images, i.e. 128x128 canvases, in bf16):

    python benchmarks/bench_train_pcdms.py --device cuda --preset paper --stage inpaint --batch 32 \
        --mixed-precision bf16 --steps 40

On CPU (the toy and tiny presets; the paper's 865 M-parameter UNet would take minutes per step):

    python benchmarks/bench_train_pcdms.py --device cpu --preset toy --stage inpaint --batch 16 --threads 2

The first ``--warmup`` steps (kernel selection, allocator, lazy CUDA init) are left out: steps/s is
measured over the rest, from the wall clock around them. With ``--market-steps`` the row also
projects the GPU-hours of a training of that many steps at ``--market-batch`` (App. B: stage 2
200k iterations, stage 3 100k, batch 128), assuming time per step grows linearly with the batch
(a GPU saturated at ``--batch``; an estimate, not a measurement).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _results import append_row, device_name
from pcdms.encoders import dino_token_shape
from pcdms.models import build_stage
from pcdms.presets import get_preset
from pcdms.training.cache import Indexed
from pcdms.training.loop import TrainConfig, train
from pcdms.training.pairs import TrainingPair
from pcdms.training.tasks import InpaintTask, LossConfig, RefineTask


class RandomCache:
    """Stands in for :class:`pcdms.training.cache.EncoderCache`: one random row per distinct image,
    with the shape the preset's real encoders give (VAE latents, masked canvas latents, DINOv2
    tokens, CLIP embeddings)."""

    def __init__(self, preset, seed: int = 0):
        h, w = preset.latent_size
        c = preset.latent_channels
        self.shapes = {"latent": (c, h, w), "masked_latent": (c, h, 2 * w), "canvas_latent": (c, h, 2 * w),
                       "dino": dino_token_shape(preset), "clip": (preset.clip_embed_dim,)}
        self.gen = torch.Generator().manual_seed(seed)

    def get_indexed(self, kind: str, paths, progress: bool = False) -> Indexed:
        distinct = list(dict.fromkeys(paths))
        row = {p: i for i, p in enumerate(distinct)}
        table = torch.randn((len(distinct), *self.shapes[kind]), generator=self.gen)
        return Indexed(table, torch.tensor([row[p] for p in paths]))

    def get_pairs(self, sources, targets, progress: bool = False) -> torch.Tensor:
        return torch.randn((len(sources), *self.shapes["canvas_latent"]), generator=self.gen)


def random_pairs(n: int, image_size: tuple[int, int], seed: int = 0) -> list[TrainingPair]:
    """``n`` pairs of made-up image names with random in-frame keypoints (they draw the pose canvas)."""
    rng = np.random.default_rng(seed)
    h, w = image_size
    kp = lambda: np.stack([rng.integers(0, w, 18), rng.integers(0, h, 18)], 1)  # noqa: E731
    return [TrainingPair.make(f"s{i}.jpg", kp(), f"t{i}.jpg", kp()) for i in range(n)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=["paper", "toy", "tiny"], default="tiny")
    ap.add_argument("--stage", choices=["inpaint", "refine"], default="inpaint")
    ap.add_argument("--batch", type=int, default=32, help="global batch per optimizer step (default 32)")
    ap.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--ema", type=float, default=0.9999, help="EMA decay (default 0.9999; its update is timed too)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--market-steps", type=int, default=None,
                    help="project the GPU-hours of this many steps (App. B: 200000 for stage 2, 100000 for stage 3)")
    ap.add_argument("--market-batch", type=int, default=128, help="their batch (App. B: 128)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        ap.error("--steps and --batch must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.preset == "paper":
        ap.error("the paper preset is a GPU benchmark (an 865 M-parameter UNet per stage): use --device cuda")

    preset = get_preset(args.preset)
    pairs = random_pairs(4 * args.batch, preset.image_size)
    cache = RandomCache(preset)
    loss = LossConfig()
    if args.stage == "inpaint":
        task = InpaintTask(pairs, cache, preset, loss)
    else:
        task = RefineTask(pairs, [f"c{i}.png" for i in range(len(pairs))], cache, preset, loss)
    torch.manual_seed(0)
    model = build_stage(args.stage, getattr(preset, args.stage), preset.name)
    params = sum(p.numel() for p in model.parameters())

    def run(steps: int, run_dir: Path) -> float:
        cfg = TrainConfig(max_steps=steps, batch_size=args.batch, lr=1e-4, ema_decay=args.ema,
                          mixed_precision=args.mixed_precision, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train(model, task, cfg, run_dir, identity={"stage": args.stage, "preset": preset.name}, device=device,
              progress=False, checkpoints=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        if args.warmup:
            run(args.warmup, Path(tmp) / "warmup")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = run(args.steps, Path(tmp) / "timed")
    rate = args.steps / seconds
    figure = f"{rate:.3f} steps/s ({args.batch * rate:.1f} pairs/s)"
    if device.type == "cuda":
        figure += f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    if args.market_steps:
        hours = args.market_steps * (args.market_batch / args.batch) / rate / 3600
        unit = "GPU-h" if device.type == "cuda" else "h of this CPU"
        figure += f"; {args.market_steps:,} steps at batch {args.market_batch}: ~{hours:.1f} {unit} (projected)"
    h, w = preset.image_size
    size = f"canvas {h}x{2 * w}" if args.stage == "inpaint" else f"image {h}x{w}"
    settings = (f"preset {args.preset}, stage {args.stage} ({params / 1e6:.1f} M params), batch {args.batch}, {size}, "
                f"mixed precision {args.mixed_precision}, EMA {args.ema}, AdamW, {args.steps} timed steps after "
                f"{args.warmup} warm-up (no checkpoint writes)")
    if args.no_write:
        print(f"{figure} | {settings} | {device_name(device)}")
    else:
        append_row("bench_train_pcdms.py", figure, settings, device_name(device))


if __name__ == "__main__":
    main()
