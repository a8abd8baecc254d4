"""Time BoT training throughput (Luo et al., CVPRW 2019) through the real loop, ``reid_aug.bot.train.train_bot``.

On one H100 (the published recipe: ResNet-50, last stride 1, 256x128, P x K = 16 x 4, bf16 autocast,
on a toy set the size of Market-1501's bounding_box_train, 12,936 images):

    python benchmarks/bench_bot.py --device cuda --backbone resnet50 --image-size 256x128 --batch 64 --amp --images 12936

On CPU the defaults shrink to a run of about a minute (ResNet-18, 128x64, 800 images):

    python benchmarks/bench_bot.py --device cpu --threads 2

What is timed: ``train_bot`` itself (augmentation on the device, forward, label-smoothed
CE + triplet + center loss, backward, both optimizers), for ``--epochs`` epochs
(default 2). The first epoch is the warm-up (cuDNN autotuning, allocator, lazy CUDA
init); images/s is taken from ``log.csv`` for the later epochs, which ``train_bot``
times between CUDA synchronisations and excluding its checkpoint writes. An epoch
is the unit because that is what the training code logs: its length is set by the
P x K sampler (about ``N / batch`` iterations, a few images per identity dropped),
so there is no separate ``--iters``. The projection for the 120-epoch recipe is
reported two ways: ``120 * N / images_per_s`` (N images per epoch) and ``120 *
seconds_per_epoch`` (the sampler's real epoch); the costs outside the epochs
(decoding images, building the model, per-epoch checkpoints, the manifest) are the
``overhead_s`` of the JSON line.

Data: ``--data ROOT`` uses the first ``--images`` training images of a Market /
Duke / MSMT layout (all of them by default); otherwise a toy Market
(``reid_aug.data.toy``) with just enough identities for ``--images`` training
images is rendered (about 350 images/s on one core; distractors and junk are
left out since only the training split is used), kept in ``--workdir`` if given
and reused on the next run. Weights start random (``pretrained=None``): speed does
not depend on them.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _results import device_name, print_json, record, resolve_device
from reid_aug.bot.config import BotConfig
from reid_aug.bot.model import BACKBONES
from reid_aug.bot.train import LOG_NAME, train_bot
from reid_aug.data.market import read_reid_dataset
from reid_aug.data.toy import ToyConfig, is_train_pid, make_toy_market, plan_identity, read_toy_manifest

MARKET_TRAIN_IMAGES = 12936
RECIPE_EPOCHS = 120


def parse_size(text: str) -> tuple[int, int]:
    """``"256x128"`` -> (256, 128) = (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be HxW, e.g. 256x128, got {text!r}") from None
    return h, w


def toy_num_ids(num_images: int, min_train_ids: int, seed: int, cfg: ToyConfig = ToyConfig()) -> int:
    """Smallest ``num_ids`` whose toy Market has >= ``num_images`` training images and >= ``min_train_ids``
    training identities. Counts come from the plan (no rendering); identities are independent of
    ``num_ids``, so the plan of pid p is the one that is rendered."""
    images = ids = pid = 0
    while images < num_images or ids < min_train_ids:
        pid += 1
        if is_train_pid(pid):
            images += len(plan_identity(cfg, seed, pid))
            ids += 1
    return max(2, pid)


def toy_train_records(workdir: Path, num_images: int, min_train_ids: int, seed: int):
    """The first ``num_images`` training records of a toy Market rendered (or reused) under ``workdir``."""
    num_ids = toy_num_ids(num_images, min_train_ids, seed)
    root = workdir / f"toy-market-{num_ids}ids-seed{seed}"
    if read_toy_manifest(root) is None:
        print(f"rendering a toy Market with {num_ids} identities into {root}", flush=True)
        make_toy_market(root, num_ids=num_ids, seed=seed, distractors_per_id=0.0, junk_per_id=0.0, progress=True)
    return read_reid_dataset(root).train[:num_images], root


def epoch_rows(out_dir: Path) -> list[dict[str, str]]:
    with open(out_dir / LOG_NAME, newline="") as f:
        return list(csv.DictReader(f))


def train_gflop_per_image(backbone: str, image_size: tuple[int, int], num_classes: int) -> float:
    """Forward + backward GFLOP of one image through the BoT network (torch's FLOP counter: convolutions
    and matrix products, the bulk of the work)."""
    from torch.utils.flop_counter import FlopCounterMode

    from reid_aug.bot.model import build_bot

    model = build_bot(num_classes, backbone, 1, None, "after").train()
    x = torch.randn(2, 3, *image_size)
    with FlopCounterMode(display=False) as counter:
        logits, feat = model(x)
        (logits.sum() + feat.sum()).backward()
    return counter.get_total_flops() / 2 / 1e9


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """float32 GFLOP/s of an n x n matrix product on ``device``: what the convolutions can at best reach."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=None,
                        help=f"training images N (default: {MARKET_TRAIN_IMAGES} on CUDA = Market train, 800 on CPU; "
                             "with --data: all of its training images)")
    parser.add_argument("--data", default=None, help="an existing Market/Duke/MSMT root instead of the toy set")
    parser.add_argument("--backbone", choices=BACKBONES, default=None, help="default: resnet50 on CUDA, resnet18 on CPU")
    parser.add_argument("--image-size", type=parse_size, default=None,
                        help="HxW the network sees (default: 256x128 on CUDA, 128x64 on CPU)")
    parser.add_argument("--batch", type=int, default=64, help="P x K images per iteration (default 64 = 16 x 4)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast (fp16 + loss scaling without bf16); CUDA only (default on)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs run; the first is warm-up (default 2)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--workdir", default=None,
                        help="keep the toy set, image cache and training output here and reuse them "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    device = resolve_device(parser, args.device, args.threads)
    cuda = device.type == "cuda"
    backbone = args.backbone or ("resnet50" if cuda else "resnet18")
    image_size = args.image_size or ((256, 128) if cuda else (128, 64))
    if args.epochs < 1 or args.batch < 1 or (args.images is not None and args.images < 1):
        parser.error("--epochs, --batch and --images must be >= 1")
    cfg = BotConfig(backbone=backbone, image_size=image_size, batch_size=args.batch, epochs=args.epochs,
                    amp=args.amp, seed=args.seed, pretrained=None, keep_checkpoint=False)

    tmp = None if args.workdir else tempfile.mkdtemp(prefix="bench_bot.")
    workdir = Path(args.workdir or tmp)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.data:
            records = read_reid_dataset(args.data).train
            if args.images is not None:
                if args.images > len(records):
                    parser.error(f"--images {args.images}: {args.data} has only {len(records)} training images")
                records = records[: args.images]
            source = str(Path(args.data).absolute())
        else:
            n = args.images or (MARKET_TRAIN_IMAGES if cuda else 800)
            records, root = toy_train_records(workdir, n, cfg.num_pids_per_batch, args.seed)
            source = f"toy Market ({root.name})"
        num_images, num_ids = len(records), len({r.pid for r in records})
        if num_ids < cfg.num_pids_per_batch:
            parser.error(f"{num_images} training images hold {num_ids} identities; a batch of {cfg.batch_size} "
                         f"needs {cfg.num_pids_per_batch} (more --images or a smaller --batch)")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        cache = workdir / "cache" if args.workdir else None  # a throw-away run gains nothing from caching
        train_bot(cfg, records, workdir / "bot", resume=False, device=device, cache_dir=cache)
        wall = time.perf_counter() - start
        rows = epoch_rows(workdir / "bot")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    # One epoch only: it includes the warm-up, which the settings say.
    first_timed = 1 if len(rows) > 1 else 0
    timed = rows[first_timed:]
    seconds = sum(float(r["seconds"]) for r in timed)
    iters_before = int(rows[first_timed - 1]["iteration"]) if first_timed else 0
    timed_iterations = int(rows[-1]["iteration"]) - iters_before  # the sampler's epochs vary by a batch or so
    iterations = round(timed_iterations / len(timed))
    ips = timed_iterations * cfg.batch_size / seconds
    epoch_s = seconds / len(timed)
    proj_n = RECIPE_EPOCHS * num_images / ips / 60
    proj_epoch = RECIPE_EPOCHS * epoch_s / 60
    overhead = wall - sum(float(r["seconds"]) for r in rows)
    amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if args.amp and cuda else "off"
    name = device_name(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    gflop = train_gflop_per_image(backbone, image_size, num_ids)
    achieved, matmul = gflop * ips, matmul_gflops(device)
    warm = "" if len(rows) > 1 else " (single epoch: includes warm-up)"
    settings = (f"{backbone}, {image_size[0]}x{image_size[1]}, batch {cfg.batch_size} (P{cfg.num_pids_per_batch} x "
                f"K{cfg.num_instances}), AMP {amp}, {num_images} images / {num_ids} ids ({source}), "
                f"{iterations} it/epoch, {len(timed)} timed epoch(s) after {len(rows) - len(timed)} warm-up{warm}")
    print_json({
        "benchmark": "bench_bot", "device": name, "backbone": backbone, "image_size": list(image_size),
        "batch": cfg.batch_size, "amp": amp, "num_images": num_images, "num_ids": num_ids, "source": source,
        "epochs": len(rows), "timed_epochs": len(timed), "iterations_per_epoch": iterations,
        "images_per_s": ips, "seconds_per_epoch": epoch_s, "per_epoch": rows,
        "projected_min_120_epochs_N_per_epoch": proj_n, "projected_min_120_epochs_sampler_epoch": proj_epoch,
        "wall_s": wall, "overhead_s": overhead, "peak_mem_gib": peak,
        "train_gflop_per_image": gflop, "achieved_gflops": achieved, "matmul_fp32_gflops": matmul,
    })
    results = [
        ("bench_bot training throughput", f"{ips:.1f} img/s",
         f"{gflop:.2f} GFLOP/image forward + backward = {achieved:.0f} GFLOP/s, against {matmul:.0f} GFLOP/s of a "
         f"float32 2048^2 matmul here; {settings}"),
        (f"bench_bot projected {RECIPE_EPOCHS} epochs", f"{proj_n:.1f} min",
         f"{RECIPE_EPOCHS} x N / img/s; {proj_epoch:.1f} min at the sampler's {epoch_s:.1f} s epochs; "
         f"+ {overhead:.0f} s outside the epochs (decoding, model build, checkpoints)"
         + (f"; peak GPU mem {peak:.1f} GiB" if cuda else "") + f"; {settings}"),
    ]
    record(results, name, args.no_write)


if __name__ == "__main__":
    main()
