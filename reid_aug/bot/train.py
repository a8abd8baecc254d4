"""Train a BoT re-ID model: the reid-strong-baseline Market recipe in one visible loop.

Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person
Re-identification" (CVPRW 2019); recipe of its reference code
(michuanhaohao/reid-strong-baseline, ``softmax_triplet_with_center.yml``):
ResNet-50 from ImageNet, last stride 1, BNNeck, 256x128, flip + pad 10 + crop +
random erasing 0.5, P x K = 16 x 4, Adam lr 3.5e-4 / wd 5e-4, linear warmup
over 10 epochs from factor 0.01, x0.1 at epochs 40 and 70, 120 epochs,
label-smoothed CE + batch-hard triplet (0.3) + 5e-4 x center loss (centers by
their own SGD, lr 0.5). Published on Market-1501: 94.5 Rank-1 / 85.9 mAP
(94.1 / 85.7 without center loss, ``center_loss_weight: 0``).

Real and synthetic images: synthetic images keep their source identity and get
the same class label as the real images of that pid. ``synthetic_share=None``
pools them with the real images in one P x K sampler; ``synthetic_share=s``
builds every batch from ``round(s * P)`` synthetic identities (K images each)
and the rest real, with the real images setting the epoch length. Pooled with
``epoch_steps="real"``, an epoch stops after as many batches as the real subset
alone gives, so augmented and standard runs make the same optimizer steps.

Resuming: ``out_dir/checkpoint.pt`` is rewritten (atomically) after every epoch.
Everything random inside an epoch (batches, augmentation) derives from
``(seed, epoch, rank)``, so a run killed at any point and resumed from the last
checkpoint repeats the interrupted epoch exactly, and on CPU ends bit-for-bit
where an uninterrupted run ends.

Several GPUs: launch the same command with ``torchrun --nproc_per_node N``;
``batch_size`` stays the global batch (each rank gets whole identities of it),
the triplet and center losses see the whole global batch (features gathered
across ranks, as fast-reid does), and rank 0 writes every file.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pcdms.devices import has_native_bf16, resolve_device
from pcdms.io import atomic_path, launcher_rank, locked_output, sha256_file, write_text_atomic
from reid_aug.bot.config import BotConfig, lr_factor
from reid_aug.bot.data import augment_batch, default_num_workers, load_images
from reid_aug.bot.losses import CenterLoss, CrossEntropyLabelSmooth, TripletLoss, gather_batch
from reid_aug.bot.model import WEIGHTS_NAME, build_bot, load_bot, save_bot
from reid_aug.bot.sampler import RandomIdentitySampler, mixed_epoch_batches
from reid_aug.data.market import ImageRecord
from reid_aug.evaluate import METRICS_NAME
from reid_aug.manifest import read_manifest, write_manifest

__all__ = ["BotConfig", "train_bot", "load_bot", "lr_factor", "label_map"]

STEP = "train-bot"
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.csv"
MODEL_DIRNAME = "model"
LOG_COLUMNS = ("epoch", "iteration", "loss", "loss_id", "loss_triplet", "loss_center", "acc", "lr", "seconds", "images_per_s")
ITER_LOG_NAME = "log_iterations.csv"  # one row per optimizer step (written with each epoch's checkpoint)
ITER_LOG_COLUMNS = ("epoch", "iteration", "loss", "loss_id", "loss_triplet", "loss_center", "acc", "lr")
# Fields that may change between a run and its resume without changing what is computed.
_RESUMABLE_FIELDS = ("epochs", "log_every", "num_workers", "keep_checkpoint")


def label_map(train_records: Sequence[ImageRecord]) -> dict[int, int]:
    """Original pid -> class label ``0..N-1`` in sorted pid order (the classifier's classes)."""
    if not train_records:
        raise ValueError("no training images")
    # Junk (-1) only: pid 0 is a distractor in Market/Duke, which their reader already keeps out of
    # bounding_box_train, but a real person in MSMT17.
    bad = next((r for r in train_records if r.pid < 0), None)
    if bad is not None:
        raise ValueError(f"{bad.path}: person id {bad.pid} (junk) cannot be a training identity")
    return {pid: i for i, pid in enumerate(sorted({r.pid for r in train_records}))}


def _synthetic_labels(records: Sequence[ImageRecord], pid2label: Mapping[int, int]) -> list[int]:
    labels = []
    for r in records:
        if r.pid not in pid2label:
            raise ValueError(
                f"synthetic image {r.path}: person id {r.pid} is not among the {len(pid2label)} real training "
                "identities; synthetic images must keep their source image's identity and never introduce "
                "other (e.g. query/gallery) identities"
            )
        labels.append(pid2label[r.pid])
    return labels


def _fingerprint(cfg: BotConfig, real: Sequence[ImageRecord], synthetic: Sequence[ImageRecord]) -> str:
    """Hash of what determines the result: the config (bar ``_RESUMABLE_FIELDS``) and the image lists."""
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE_FIELDS}
    data = {
        "config": conf,
        "real": [f"{r.name}:{r.pid}" for r in real],
        "synthetic": [f"{r.path.parent.name}/{r.name}:{r.pid}" for r in synthetic],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()


def _finished(out_dir: Path, fingerprint: str, epochs: int) -> bool:
    """True if ``out_dir`` holds the final model of exactly this training run."""
    try:
        manifest = read_manifest(out_dir)
    except (OSError, ValueError):
        return False
    if manifest is None:
        return False
    model_dir = out_dir / MODEL_DIRNAME
    return (
        manifest.get("step") == STEP
        and manifest.get("fingerprint") == fingerprint
        and manifest.get("epochs_done") == epochs
        and (model_dir / WEIGHTS_NAME).is_file()
        and (model_dir / "config.json").is_file()
    )


def _setup_distributed(device: str | torch.device | None) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, whether we created the process group). torchrun sets WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)
    if world <= 1:
        return 0, 1, device, False
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, created


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), *rest))


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, 0xB07]).generate_state(1, np.uint64)[0] >> 1)


def _write_log(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = LOG_COLUMNS) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _read_log(path: Path, upto_epoch: int) -> list[dict[str, str]]:
    """Rows of an earlier run's log for epochs ``<= upto_epoch`` (rows past the checkpoint are redone)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["epoch"]) <= upto_epoch]

def _class_labels(cfg: BotConfig, real: Sequence[ImageRecord], synthetic: Sequence[ImageRecord]):
    """``(pid2label, labels)``: the class of every real then synthetic image, (N,) int64;
    ValueError for a synthetic identity outside the real set or a share without synthetic images."""
    pid2label = label_map(real)
    labels = torch.tensor([pid2label[r.pid] for r in real] + _synthetic_labels(synthetic, pid2label))
    if cfg.synthetic_share is not None and not synthetic:
        raise ValueError(f"synthetic_share is {cfg.synthetic_share} but no synthetic images were given")
    return pid2label, labels


def make_samplers(cfg: BotConfig, labels: torch.Tensor, num_real: int, rank: int = 0, world: int = 1):
    """``(sampler, synthetic_sampler, real_only)`` for ``labels`` (N,) of the real images (first
    ``num_real``) then the synthetic ones. Pooled (``synthetic_share`` None): one P x K sampler over
    all images, and with ``epoch_steps == "real"`` a real-only sampler whose epoch length caps the
    pooled epoch. Fixed share: a real and a synthetic sampler whose batches are joined."""
    k = cfg.num_instances
    if cfg.synthetic_share is None:
        sampler = RandomIdentitySampler(labels.tolist(), cfg.batch_size, k, cfg.seed, rank, world)
        real_only = None
        if len(labels) > num_real and cfg.epoch_steps == "real":
            real_only = RandomIdentitySampler(labels[:num_real].tolist(), cfg.batch_size, k, cfg.seed, rank, world)
        return sampler, None, real_only
    p_syn = round(cfg.synthetic_share * cfg.num_pids_per_batch)
    sampler = RandomIdentitySampler(labels[:num_real].tolist(), cfg.batch_size - p_syn * k, k, cfg.seed, rank, world)
    syn_sampler = RandomIdentitySampler(labels[num_real:].tolist(), p_syn * k, k, cfg.seed, rank, world, stream=1)
    return sampler, syn_sampler, None


def epoch_batches(sampler, syn_sampler, real_only, epoch: int, num_real: int) -> list[list[int]]:
    """This rank's batches (image indices) of ``epoch`` for the samplers of :func:`make_samplers`."""
    sampler.set_epoch(epoch)
    if syn_sampler is not None:
        syn_sampler.set_epoch(epoch)
        return mixed_epoch_batches(sampler, syn_sampler, epoch, synthetic_offset=num_real)
    batches = list(sampler)
    if real_only is not None:
        batches = batches[: len(real_only.global_batches(epoch))]
    return batches


def training_plan(cfg: BotConfig, train_records: Sequence[ImageRecord],
                  synthetic_records: Sequence[ImageRecord] = ()) -> dict[str, Any]:
    """What :func:`train_bot` would do, without training: image and identity counts and the
    iterations of every epoch (the samplers' exact epoch lengths). Raises ValueError as it would."""
    real, synthetic = list(train_records), list(synthetic_records)
    pid2label, labels = _class_labels(cfg, real, synthetic)
    samplers = make_samplers(cfg, labels, len(real))
    per_epoch = [len(epoch_batches(*samplers, epoch, len(real))) for epoch in range(cfg.epochs)]
    return {"real_images": len(real), "identities": len(pid2label), "synthetic_images": len(synthetic),
            "iterations_per_epoch": per_epoch, "iterations": sum(per_epoch),
            "images_per_iteration": cfg.batch_size}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype BoT's ``amp`` trains under on ``device``; None where mixed precision would not pay.

    CUDA: bfloat16, or float16 (with loss scaling) on GPUs without bf16. CPU: bfloat16 only
    where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where oneDNN convolutions
    run ~1.5x faster than float32 (measured on 2 EPYC cores, ResNet-18 at 128x64); elsewhere
    bf16 is emulated and slower, so the run stays float32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if has_native_bf16(device) else None
    return None


@locked_output("out_dir")  # two runs into one folder at once: the second fails
def train_bot(
    cfg: BotConfig,
    train_records: Sequence[ImageRecord],
    out_dir: str | Path,
    synthetic_records: Sequence[ImageRecord] = (),
    resume: bool = True,
    device: str | torch.device | None = None,
    sources: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    tensorboard: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train BoT on ``train_records`` (+ ``synthetic_records``); return the final model folder.

    ``out_dir`` receives ``checkpoint.pt`` (every epoch), ``log.csv`` (one row per epoch),
    ``model/`` (``config.json`` + ``model.safetensors``, see :func:`load_bot`) and
    ``manifest.json``. ``resume``: continue from ``checkpoint.pt`` (an error if it was made
    with another config or other images) and return at once if ``out_dir`` already holds
    this run's final model; otherwise start over. ``sources``: inputs to record in the
    manifest (dataset root, subset file ...). ``cache_dir``: where decoded images are
    cached (:func:`reid_aug.bot.data.load_images`); None decodes without caching.
    ``device``: None picks CUDA when available. ``tensorboard``: also write the per-iteration
    and per-epoch values as TensorBoard events to ``out_dir/tensorboard`` (None: when the
    ``tensorboard`` package is installed, the ``reid-aug[tensorboard]`` extra; True: raise
    ImportError without it). A resumed run purges the events of the interrupted epoch.
    ``log`` receives status lines (e.g. that the run was already complete).
    """
    out_dir = Path(out_dir)
    real, synthetic = list(train_records), list(synthetic_records)
    pid2label, labels = _class_labels(cfg, real, synthetic)
    pids = sorted(pid2label)
    fingerprint = _fingerprint(cfg, real, synthetic)
    model_dir = out_dir / MODEL_DIRNAME
    if resume and _finished(out_dir, fingerprint, cfg.epochs):
        if log is not None and launcher_rank() == 0:
            log(f"{out_dir}: already trained ({cfg.epochs} epochs, same config and images); not trained again")
        return model_dir
    other = read_manifest(out_dir) if (out_dir / "manifest.json").is_file() else None
    if other is not None and other.get("step") != STEP:
        raise ValueError(f"{out_dir} holds the output of {other.get('step')!r}; train into another folder")
    # Whatever evaluated an earlier model here no longer describes the one this run makes.
    if launcher_rank() == 0:
        (out_dir / METRICS_NAME).unlink(missing_ok=True)

    rank, world, device, own_group = _setup_distributed(device)
    is_main, cuda = rank == 0, device.type == "cuda"
    show = progress and is_main
    writer = None
    try:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        model = build_bot(len(pids), cfg.backbone, cfg.last_stride, cfg.pretrained, cfg.neck_feat).to(device)
        center = CenterLoss(len(pids), model.feat_dim).to(device) if cfg.center_loss_weight > 0 else None
        pretrained_sha = sha256_file(cfg.pretrained) if cfg.pretrained is not None and is_main else None

        # Images: decoded once; on CUDA the whole uint8 tensor lives on the GPU.
        workers = cfg.num_workers or default_num_workers()
        wait_for_cache = world > 1 and cache_dir is not None
        if wait_for_cache and not is_main:
            dist.barrier()  # rank 0 decodes and writes the cache, the others then read it
        images = load_images([r.path for r in real], cfg.image_size, cache_dir, workers, show)
        if synthetic:
            images = torch.cat([images, load_images([r.path for r in synthetic], cfg.image_size, cache_dir, workers, show)])
        if wait_for_cache and is_main:
            dist.barrier()
        if cuda:
            images = images.to(device)
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels

        sampler, syn_sampler, real_only = make_samplers(cfg, labels, len(real), rank, world)

        amp_dtype = autocast_dtype(device) if cfg.amp else None
        use_amp = amp_dtype is not None
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        if cuda and cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg))
        optimizer_center = torch.optim.SGD(center.parameters(), lr=cfg.center_lr) if center is not None else None
        xent = CrossEntropyLabelSmooth(len(pids), cfg.label_smooth)
        triplet = TripletLoss(cfg.triplet_margin)

        ckpt_path, log_path = out_dir / CHECKPOINT_NAME, out_dir / LOG_NAME
        start_epoch, iteration = 0, 0
        if resume and ckpt_path.is_file():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            if ckpt.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{ckpt_path} was made with another config or other training images; "
                    "use --no-resume (resume=False) to start over, or another output folder"
                )
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            if center is not None:
                center.load_state_dict(ckpt["center"])
                optimizer_center.load_state_dict(ckpt["optimizer_center"])
            _set_rng_state(ckpt["rng"])
            start_epoch, iteration = ckpt["epoch"], ckpt["iteration"]
            if show:
                done = "epoch 1 done" if start_epoch == 1 else f"epochs 1-{start_epoch} done"
                tqdm.write(f"resuming from epoch {start_epoch + 1} of {cfg.epochs} ({done}: {ckpt_path})")
        log_rows = _read_log(log_path, start_epoch) if start_epoch else []
        iter_log_path = out_dir / ITER_LOG_NAME
        iter_rows = _read_log(iter_log_path, start_epoch) if start_epoch else []
        if is_main:
            writer = _tensorboard_writer(out_dir, tensorboard, purge_step=iteration + 1 if start_epoch else None)
        net = model
        if world > 1:
            net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        aug_gen = torch.Generator()

        for epoch in range(start_epoch, cfg.epochs):
            batches = epoch_batches(sampler, syn_sampler, real_only, epoch, len(real))
            aug_gen.manual_seed(_epoch_seed(cfg.seed, epoch, rank))
            lr = optimizer.param_groups[0]["lr"]
            net.train()
            sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, id, triplet, center, acc
            steps = []  # per iteration, the same five; read back once per epoch (no per-step GPU sync)
            start = time.perf_counter()
            bar = tqdm(batches, desc=f"BoT epoch {epoch + 1}/{cfg.epochs}", unit="it", disable=not show, leave=False)
            for it, batch in enumerate(bar):
                idx = torch.as_tensor(batch)
                x = augment_batch(
                    images[idx.to(images.device)].to(device, non_blocking=True), aug_gen,
                    flip_prob=cfg.flip_prob, padding=cfg.padding, erase_prob=cfg.erase_prob,
                )
                y = labels[idx].to(device, non_blocking=True)
                if cuda and cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=use_amp):
                    logits, feat = net(x)
                loss_id = xent(logits, y)  # DDP averages its gradient over ranks: the global mean
                feat_all, y_all = gather_batch(feat, y)  # triplets and centers over the global batch
                loss_tri = triplet(feat_all, y_all)
                loss_center = center(feat_all, y_all) if center is not None else torch.zeros((), device=device)
                loss = loss_id + loss_tri + cfg.center_loss_weight * loss_center

                optimizer.zero_grad(set_to_none=True)
                if optimizer_center is not None:
                    optimizer_center.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                if optimizer_center is not None:
                    scaler.unscale_(optimizer_center)
                    # The centers are outside DDP, but every rank computed the same global center loss,
                    # so their gradients already agree across ranks.
                    for p in center.parameters():
                        p.grad *= 1.0 / cfg.center_loss_weight  # BoT: the weight must not slow the centers
                    scaler.step(optimizer_center)
                scaler.update()

                acc = (logits.detach().argmax(1) == y).double().mean()
                step = torch.stack([loss.detach(), loss_id.detach(), loss_tri.detach(), loss_center.detach(), acc]).double()
                sums += step
                steps.append(step)
                if show and (it + 1) % cfg.log_every == 0:
                    mean = (sums / (it + 1)).tolist()
                    bar.set_postfix(loss=f"{mean[0]:.3f}", acc=f"{mean[4]:.3f}", lr=f"{lr:.2e}")
            scheduler.step()
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            if steps:  # this rank's values (rank 0 writes them)
                for i, values in enumerate(torch.stack(steps).cpu().tolist()):
                    iter_rows.append({"epoch": epoch + 1, "iteration": iteration + i + 1, "lr": f"{lr:.6g}",
                                      **{k: f"{v:.6f}" for k, v in zip(ITER_LOG_COLUMNS[2:7], values)}})
                    if writer is not None:
                        for key, value in zip(ITER_LOG_COLUMNS[2:7], values):
                            writer.add_scalar(f"train/{key}", value, iteration + i + 1)
                        writer.add_scalar("train/lr", lr, iteration + i + 1)
            iteration += len(batches)
            if world > 1:  # log the mean over all ranks, not rank 0's share
                dist.all_reduce(sums)
                sums /= world
            mean = (sums / max(1, len(batches))).tolist()
            log_rows.append({
                "epoch": epoch + 1, "iteration": iteration, "loss": f"{mean[0]:.6f}", "loss_id": f"{mean[1]:.6f}",
                "loss_triplet": f"{mean[2]:.6f}", "loss_center": f"{mean[3]:.6f}", "acc": f"{mean[4]:.6f}",
                "lr": f"{lr:.6g}", "seconds": f"{seconds:.3f}",
                "images_per_s": f"{len(batches) * cfg.batch_size / max(seconds, 1e-9):.1f}",
            })
            if is_main:
                state = {
                    "fingerprint": fingerprint,
                    "epoch": epoch + 1,
                    "iteration": iteration,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "center": center.state_dict() if center is not None else None,
                    "optimizer_center": optimizer_center.state_dict() if optimizer_center is not None else None,
                    "sampler": sampler.state_dict(),
                    "rng": _rng_state(),
                    "pids": pids,
                }
                with atomic_path(ckpt_path) as tmp:
                    torch.save(state, tmp)
                _write_log(log_path, log_rows)  # after the checkpoint: a row never outlives its epoch
                _write_log(iter_log_path, iter_rows, ITER_LOG_COLUMNS)
                if writer is not None:
                    writer.add_scalar("epoch/images_per_s", float(log_rows[-1]["images_per_s"]), iteration)
                    writer.flush()
                if show:
                    row = log_rows[-1]
                    tqdm.write(
                        f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']} (id {row['loss_id']}, triplet "
                        f"{row['loss_triplet']}, center {row['loss_center']}) acc {row['acc']} lr {row['lr']} "
                        f"{row['seconds']} s, {row['images_per_s']} img/s"
                    )
            if world > 1:
                dist.barrier()

        if is_main:
            save_bot(model_dir, model, {"image_size": list(cfg.image_size), "pids": pids})
            src = {k: str(v) for k, v in (sources or {}).items()}
            syn_folders = sorted({str(r.path.parent) for r in synthetic})
            for i, folder in enumerate(syn_folders):
                src.setdefault(f"synthetic_{i}", folder)
            write_manifest(
                out_dir, STEP, config=dataclasses.asdict(cfg), seed=cfg.seed, sources=src,
                checkpoints={"pretrained": pretrained_sha} if pretrained_sha else {},
                extra={
                    "fingerprint": fingerprint,
                    "epochs_done": cfg.epochs,
                    "num_classes": len(pids),
                    "num_real_images": len(real),
                    "num_synthetic_images": len(synthetic),
                    "model": MODEL_DIRNAME,
                    "model_sha256": sha256_file(model_dir / WEIGHTS_NAME),
                    "device": str(device),
                    "autocast_dtype": str(amp_dtype).removeprefix("torch.") if use_amp else "float32",
                    "world_size": world,
                    "tensorboard": writer is not None,
                },
            )
            if not cfg.keep_checkpoint and ckpt_path.is_file():
                ckpt_path.unlink()
        if world > 1:
            dist.barrier()
    finally:
        if writer is not None:
            writer.close()
        if own_group:
            dist.destroy_process_group()
    return model_dir


def _tensorboard_writer(out_dir: Path, wanted: bool | None, purge_step: int | None):
    """A SummaryWriter for ``out_dir/tensorboard``, or None (``wanted`` False, or None and not installed)."""
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the tensorboard package
        if wanted:
            raise ImportError("--tensorboard needs the tensorboard package: pip install 'reid-aug[tensorboard]'")
        return None
    return SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_step)
