"""The training loop shared by every PCDMs stage (and the toy VAE): one loop, visible in one sitting.

Release recipe (PCDMs App. B, ``tencent-ailab/PCDMs`` stage scripts): AdamW
(weight decay 1e-2), constant learning rate, gradient clipping, fp16/bf16 on
GPU, several GPUs. Here, per step:

1. the global micro-batch ``k`` takes sample positions ``[k*B, (k+1)*B)`` of an
   endless sequence of seeded epoch permutations (so the data order is a
   function of the step: resume needs no sampler state);
2. its random numbers (noise, timesteps, drop masks) come from a generator
   seeded by ``(seed, k)`` for the whole global batch, and each process takes
   its slice: N processes at global batch B compute what one process does;
3. loss, backward (DDP averages gradients across processes), gradient
   accumulation, clipping, AdamW step, optional EMA update;
4. every ``checkpoint_every`` steps and at the end, a checkpoint folder
   (weights, optimizer, scaler, EMA, lr schedule, step) is written to a temp
   folder and renamed; ``resume`` continues bit-identically on CPU.

Multi-process: start with ``torchrun --nproc_per_node N`` (gloo on CPU, NCCL
on GPU); :func:`init_distributed` reads torchrun's environment.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pcdms.io import read_json_object, write_json_atomic

STATE_NAME = "training_state.json"
CHECKPOINTS = "checkpoints"
LOG_NAME = "log.csv"
LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "steps_per_s", "elapsed_s")
# Settings a resumed run may change without changing what the finished weights are.
RESUMABLE_KEYS = ("max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "mixed_precision")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one stage run (stored in every checkpoint; see :data:`RESUMABLE_KEYS`).

    ``batch_size`` is the global batch per optimizer step = micro-batch x ``grad_accum`` (split
    across processes). ``mixed_precision``: "no" | "bf16" | "fp16" (autocast; fp16 adds a grad
    scaler). ``ema_decay`` None = no EMA; with EMA the exported weights are the EMA weights.
    """

    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    ema_decay: float | None = None
    mixed_precision: str = "no"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("max_steps, batch_size and grad_accum must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.lr <= 0 or self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError("lr, checkpoint_every, keep_checkpoints and log_every must be positive")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


class ResumeError(ValueError):
    """A checkpoint cannot continue this run (other stage, preset, data or settings)."""


def init_distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun, starts the process group (NCCL with CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sample_indices(k: int, batch: int, num_samples: int, seed: int) -> torch.Tensor:
    """Dataset indices of global micro-batch ``k``: positions ``[k*batch, (k+1)*batch)`` of the endless
    sequence of epoch permutations, epoch ``e`` shuffled by a generator seeded ``(seed, e)``."""
    out, pos, end = [], k * batch, (k + 1) * batch
    while pos < end:
        epoch, offset = divmod(pos, num_samples)
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(end - pos, num_samples - offset)
        out.append(perm[offset:offset + take])
        pos += take
    return torch.cat(out)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder (those with a state file), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / STATE_NAME).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _as_json(value):
    """``value`` as it reads back from JSON (tuples become lists), so stored and live values compare."""
    return json.loads(json.dumps(value, default=str))


def _first_difference(old, new, where: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return _first_difference(old.get(k), new.get(k), f"{where}.{k}" if where else k)
    return f"{where}: {str(old)[:60]!r} in the checkpoint, {str(new)[:60]!r} now"


def _check_resume(state: dict, identity: dict, config: dict, path: Path) -> None:
    stored, live = state.get("identity", {}), _as_json(identity)
    first = ("stage", "preset")
    for key in [*first, *sorted((set(stored) | set(live)) - set(first))]:
        old, new = stored.get(key), live.get(key)
        if old == new:
            continue
        what = (f"checkpoint is for {key} {old!r}, this run is {new!r}" if not isinstance(old, dict)
                else f"checkpoint belongs to another run: {_first_difference(old, new, key)}")
        raise ResumeError(f"{path}: {what}; resume only the same stage, preset, data, loss and encoders")
    old = state.get("config", {})
    changed = sorted(k for k in set(old) | set(config) if k not in RESUMABLE_KEYS and old.get(k) != config.get(k))
    if changed:
        raise ResumeError(f"{path}: checkpoint was trained with other settings ({', '.join(changed)}); "
                          "resume with the same ones or start a new run")


def train(
    model: torch.nn.Module,
    task: Any,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    identity: dict,
    resume: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_checkpoint: Callable[[torch.nn.Module, int], None] | None = None,
    checkpoints: bool = True,
) -> torch.nn.Module:
    """Train ``model`` on ``task`` (see :mod:`pcdms.training.tasks`) for ``cfg.max_steps`` steps.

    Args:
        identity: what the weights are for: ``stage``, ``preset``, ``model_config``, ``data_sha256``
            (hash of the training pairs); a resumed checkpoint must match it exactly.
        resume: a checkpoint folder, or ``"latest"`` (the newest in ``run_dir``), or None.
        on_checkpoint: called on rank 0 with the weights to export (EMA if enabled) and the step,
            after each checkpoint and at the end.
        checkpoints: False writes no checkpoint and calls no ``on_checkpoint`` (speed benchmarks:
            a paper-size checkpoint with its optimizer state is about 14 GB).

    Returns the trained model (EMA weights copied in when EMA is on). Raises :class:`ResumeError`.
    """
    run_dir = Path(run_dir)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if cfg.micro_batch % world:
        raise ValueError(f"micro-batch {cfg.micro_batch} (batch_size / grad_accum) is not divisible by the "
                         f"{world} processes")
    device = torch.device(device)
    config = dataclasses.asdict(cfg)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    use_scaler = cfg.mixed_precision == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ema = None
    if cfg.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay, foreach=False)
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if world > 1 else model)

    step = 0
    if resume is not None:
        ckpts = checkpoint_dirs(run_dir)
        path = Path(resume) if str(resume) != "latest" else (ckpts[-1] if ckpts else None)
        if path is None:
            raise ResumeError(f"{run_dir / CHECKPOINTS}: no checkpoint to resume from")
        if not (path / STATE_NAME).is_file():
            raise ResumeError(f"{path}: not a training checkpoint (no {STATE_NAME})")
        state = read_json_object(path / STATE_NAME)
        _check_resume(state, identity, config, path)
        try:
            model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
            extra = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        except Exception as exc:  # safetensors and pickle raise their own types for damaged files
            raise ResumeError(f"{path}: damaged checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
        optimizer.load_state_dict(extra["optimizer"])
        schedule.load_state_dict(extra["schedule"])
        scaler.load_state_dict(extra["scaler"])
        if ema is not None:
            ema.load_state_dict(extra["ema"])
        step = int(state["step"])
        if rank == 0 and progress:
            tqdm.write(f"resuming from step {step} ({path})")

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    n = len(task)
    local = cfg.micro_batch // world
    log_rows = read_log(run_dir, step) if rank == 0 else []
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {identity.get('stage')}",
               disable=not progress or rank != 0)
    t0, steps_done, elapsed0 = time.time(), 0, float(log_rows[-1]["elapsed_s"]) if log_rows else 0.0
    while step < cfg.max_steps:
        loss_sum = 0.0
        for a in range(cfg.grad_accum):
            k = step * cfg.grad_accum + a
            idx = sample_indices(k, cfg.micro_batch, n, cfg.seed)[rank * local:(rank + 1) * local]
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k + 7_919)
            draws = {key: v[rank * local:(rank + 1) * local] for key, v in task.draws(gen, cfg.micro_batch).items()}
            batch = {key: v.to(device) for key, v in task.batch(idx).items()}
            sync = a == cfg.grad_accum - 1 or world == 1
            ctx = ddp.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = task.loss(ddp, batch, draws) / cfg.grad_accum
                scaler.scale(loss).backward()
            loss_sum += loss.item()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if ema is not None:
            ema.step(params)
        step += 1
        steps_done += 1
        if world > 1:  # report the mean loss over processes
            t = torch.tensor([loss_sum], device=device)
            dist.all_reduce(t)
            loss_sum = t.item() / world
        rate = steps_done / max(time.time() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", it_s=f"{rate:.2f}")
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.max_steps):
            log_rows.append({"step": step, "loss": f"{loss_sum:.6f}", "lr": f"{schedule.get_last_lr()[0]:.3g}",
                             "grad_norm": f"{float(grad_norm):.4f}", "steps_per_s": f"{rate:.3f}",
                             "elapsed_s": f"{elapsed0 + time.time() - t0:.1f}"})
            _write_log(run_dir, log_rows)
        if checkpoints and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
            if rank == 0:
                _save_checkpoint(run_dir, step, model, optimizer, schedule, scaler, ema, identity, config,
                                 cfg.keep_checkpoints)
                if on_checkpoint is not None:
                    on_checkpoint(_export_weights(model, ema), step)
            barrier()
    bar.close()
    if steps_done == 0 and rank == 0:
        # Resumed at (or past) max_steps, e.g. to end a run early at a checkpoint: that checkpoint is
        # final; the log loses rows a killed run wrote after it, and the weights are exported.
        _write_log(run_dir, log_rows)
        if on_checkpoint is not None:
            on_checkpoint(_export_weights(model, ema), step)
    if ema is not None:
        ema.copy_to(params)
    return model


def _export_weights(model: torch.nn.Module, ema) -> torch.nn.Module:
    if ema is None:
        return model
    import copy

    clone = copy.deepcopy(model)
    ema.copy_to([p for p in clone.parameters() if p.requires_grad])
    return clone


def _save_checkpoint(run_dir: Path, step: int, model, optimizer, schedule, scaler, ema, identity, config,
                     keep: int) -> Path:
    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None}, tmp / "optimizer.pt")
    write_json_atomic(tmp / STATE_NAME, {"step": step, "identity": _as_json(identity), "config": config})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_log(run_dir: str | os.PathLike, step: int | None = None) -> list[dict]:
    """Rows of a run's ``log.csv`` (:data:`LOG_COLUMNS`, as strings), those up to ``step`` if given
    (a resumed run rewrites the rows after its checkpoint); [] without a log."""
    path = Path(run_dir) / LOG_NAME
    if step == 0 or not path.is_file():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if step is None or int(row["step"]) <= step]


def _write_log(run_dir: Path, rows: list[dict]) -> None:
    from pcdms.io import atomic_path

    with atomic_path(run_dir / LOG_NAME) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
