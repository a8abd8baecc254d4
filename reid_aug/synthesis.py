"""Synthesis job: the people of a real training subset under other poses (PCDMs Sec. 4.3, Table 2).

For every image of a real subset and ``k`` in ``0..per_image-1``, one image of the
same person in a target pose drawn from the pose bank (:mod:`reid_aug.posebank`).
Synthetic images keep the source's identity (DESIGN §6): they are named
``<source stem>_syn<k:02d>.jpg`` (``0002_c1s1_000451_03.jpg``, k=1 ->
``0002_c1s1_000451_03_syn01.jpg``), which every Market reader parses to the
source's pid and camera and which never collides with a real name.

Two generators, chosen by ``SynthesisConfig.generator``:

- ``"pcdms"``: the three-stage PCDMs pipeline (prior -> inpaint -> refine) from a
  trained pipeline folder; one ``torch.Generator`` per output image, seeded by
  ``(seed, source name, k)``, so the images do not depend on batching or resume.
- ``"toy-oracle"``: NOT a generative model. On a toy Market made by
  ``make-toy-market`` it re-renders the source identity (the renderer's ground
  truth appearance) in a freshly sampled pose, seen by the source's camera: a
  "perfect pose-guided generator" upper bound that lets the toy demo run the
  augmented path without trained diffusion weights. It ignores the pose bank;
  its target keypoints are the renderer's.

Output folder: the images, ``manifest.csv`` (one row per image: source, pid,
camid, k, seed, target pose name, target keypoints, then the settings it was
made with: generator, pose strategy, scheduler, steps, guidance, stages, dtype,
pipeline hash), ``annotation.csv`` (target poses, community Market format),
``subset.csv`` (the real subset used), ``preview.png`` (source | target
skeleton | coarse | result for the first images, written when the first batch
is done), ``coarse/`` (stage-2 images, with ``keep_coarse``) and ``manifest.json``. The plan is deterministic, so a killed job is resumed by
running it again: existing images are kept and exactly the missing ones are made;
the CSVs and the manifest are (re)written from the full plan at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from pcdms.devices import has_native_bf16, resolve_device as _torch_device
from pcdms.images import to_rgb8
from pcdms.io import atomic_path, locked_output, read_json_object, sha256_file, write_text_atomic
from pcdms.pose import read_annotation_csv, write_annotation_csv
from reid_aug.data.market import DatasetError, ImageRecord, ReidDataset, is_image_file, parse_market_name
from reid_aug.data.subset import write_subset_csv
from reid_aug.data.toy import camera_for, identity_for, read_toy_manifest
from reid_aug.generators import resolve_pipeline
from reid_aug.data.toy_render import PoseParams, project_pose, render_person, sample_pose_params
from reid_aug.manifest import MANIFEST_NAME, read_manifest, write_manifest
from reid_aug.timings import TimingKey, estimate_seconds_per_image, record_timing
from reid_aug.posebank import (
    POSE_IDENTITIES, POSE_POOLS, STRATEGIES, STREAM_NOISE, STREAM_TOY_IMAGE, STREAM_TOY_POSE, build_pose_bank,
    canonical_poses, draw_canonical, draw_targets, is_usable_pose, item_rng, item_seed, num_candidates, pool_records,
)

STEP = "synthesize"
GENERATORS = ("pcdms", "toy-oracle")
MISSING_SOURCE_POSE = ("error", "skip")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTO_DTYPE = "auto"  # bfloat16 where the device computes it natively, float32 elsewhere (resolve_dtype)
SYNTHESIS_CSV, ANNOTATION_CSV, SUBSET_CSV = "manifest.csv", "annotation.csv", "subset.csv"
PREVIEW_NAME, COARSE_DIR, PREVIEW_ROWS = "preview.png", "coarse", 8
CANONICAL_CSV, CANONICAL_PNG = "canonical-poses.csv", "canonical-poses.png"
CANONICAL_K = 8  # default number of canonical poses
# What decides an image (the plan row), then the settings it was made with (the same on every row).
SYNTHESIS_COLUMNS = ("name", "source", "pid", "camid", "k", "seed", "target", "target_keypoints")
SETTINGS_COLUMNS = ("generator", "strategy", "scheduler", "num_inference_steps", "guidance_scale",
                    "refine_strength", "stages", "dtype", "pipeline_sha256")
JPEG_QUALITY = 95
DEFAULT_POSES_FILE = "market-annotation-train.csv"
# Settings a job may resume with other values of. (batch_size is not one: it can change the float
# rounding, see _pcdms_generate; the device is recorded in the manifest.)
EXECUTION_KEYS = ("device",)
RANDOM_WEIGHTS_WARNING = (
    "allow_random_weights: encoders without a checkpoint path ran with RANDOM weights; these images are not "
    "meaningful (tests and smoke runs only)"
)
TOY_ORACLE_NOTE = (
    "toy-oracle is NOT a generative model: it re-renders the toy dataset's ground-truth identity in a freshly "
    "sampled pose (an upper bound for a perfect pose-guided generator), for demos without diffusion weights"
)


class SynthesisError(ValueError):
    """A synthesis job cannot run as asked (output folder conflict, wrong generator for the data, ...)."""


@dataclass(frozen=True)
class SynthesisConfig:
    """What to synthesize and how. Pose-bank keys: see :mod:`reid_aug.posebank`.

    ``pose_identity``: ``"other"`` draws only poses of other identities, ``"any"`` any pose but the
    source's own. ``missing_source_pose``: a subset image without an annotation row is an
    ``"error"`` or is ``"skip"``-ped (counted in the manifest). PCDMs keys (generator ``"pcdms"``):
    ``pipeline`` (a ``PCDMsPipeline.save_pretrained`` folder), the three encoder paths,
    ``allow_random_weights`` (encoders without a path get random weights: tests only),
    ``strategy`` (target poses, :func:`plan_synthesis`), ``canonical_k``, ``target_poses``,
    sampler settings (paper: DDIM, 50 steps, guidance 2.0; ``guidance_scale`` is one number for all
    three stages or ``[prior, inpaint, refine]``; ``refine_strength`` 1 samples the refining stage from
    noise as the paper, below 1 from the noised coarse image, :class:`pcdms.pipeline.PCDMsPipeline`;
    1.0 wherever nothing is refined), ``batch_size``, ``device``
    (default: cuda if available), ``dtype`` (``"auto"``: :func:`resolve_dtype`), ``keep_coarse``
    (also write the stage-2 images to ``OUT/coarse/``).
    """

    generator: str = "pcdms"
    per_image: int = 1
    seed: int = 0
    pose_pool: str = "subset"
    pose_identity: str = "other"
    min_visible_joints: int = 8
    missing_source_pose: str = "error"
    pipeline: Path | None = None
    clip_checkpoint: Path | None = None
    dino_path: Path | None = None
    vae_path: Path | None = None
    allow_random_weights: bool = False
    num_inference_steps: int = 50
    guidance_scale: float | tuple[float, float, float] = 2.0
    refine_strength: float = 1.0
    scheduler: str = "ddim"
    stages: str = "full"
    batch_size: int = 16
    device: str | None = None
    dtype: str = "float32"
    keep_coarse: bool = False
    strategy: str = "random"
    canonical_k: int = CANONICAL_K
    target_poses: Path | None = None

    def __post_init__(self) -> None:
        choices = {"generator": GENERATORS, "pose_pool": POSE_POOLS, "pose_identity": POSE_IDENTITIES[:2],
                   "strategy": STRATEGIES,
                   "missing_source_pose": MISSING_SOURCE_POSE, "dtype": (*DTYPES, AUTO_DTYPE)}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if not 1 <= self.per_image <= 99:
            raise ValueError(f"per_image must be in 1..99 (names end in _synNN), got {self.per_image}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.min_visible_joints <= 18:
            raise ValueError(f"min_visible_joints must be in 0..18, got {self.min_visible_joints}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.canonical_k < 1:
            raise ValueError(f"canonical_k must be >= 1, got {self.canonical_k}")
        if self.strategy != "canonical" and self.canonical_k != CANONICAL_K:
            raise ValueError(f"canonical_k (--k) applies to strategy 'canonical' only, not {self.strategy!r}")
        if (self.strategy == "file") != (self.target_poses is not None):
            raise ValueError("strategy 'file' needs target_poses (an annotation csv or a from,to pairs csv), "
                             "and target_poses needs strategy 'file'")
        if self.strategy != "random" and self.generator != "pcdms":
            raise ValueError(f"strategy {self.strategy!r} needs generator 'pcdms' (toy-oracle samples its own poses)")
        if self.generator == "pcdms":
            from pcdms.pipeline import SCHEDULERS, STAGES, per_stage_guidance, sampler_start  # diffusers: PCDMs only

            scales = per_stage_guidance(self.guidance_scale)  # raises on a bad count or value
            if not isinstance(self.guidance_scale, (int, float)):  # a YAML list: hashable, compared as a tuple
                object.__setattr__(self, "guidance_scale", scales)
            if self.scheduler not in SCHEDULERS:
                raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {self.scheduler!r}")
            if self.stages not in STAGES:
                raise ValueError(f"stages must be one of {list(STAGES)}, got {self.stages!r}")
            if STAGES[self.stages][1]:
                sampler_start(self.num_inference_steps, self.refine_strength)
        if self.generator != "pcdms" or not STAGES[self.stages][1]:
            # Nothing is refined: the strength changes no image, so it must not split jobs, reuse or timings
            # (a workspace's --stages B2 keeps working with the demo's refine_strength).
            object.__setattr__(self, "refine_strength", 1.0)
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device {self.device!r} is not a torch device name (cpu, cuda, cuda:1, mps)") from None
        for key in ("pipeline", "clip_checkpoint", "dino_path", "vae_path", "target_poses"):
            if isinstance(getattr(self, key), str):
                object.__setattr__(self, key, Path(getattr(self, key)))
        # "builtin:toy" names the generator shipped in the package (reid_aug.generators).
        object.__setattr__(self, "pipeline", resolve_pipeline(self.pipeline))


@dataclass(frozen=True)
class SynthesisItem:
    """One synthetic image of the plan.

    ``seed``: the image's own seed (PCDMs: its noise generator; toy-oracle: its render rng).
    ``target``: the image whose annotated pose is the target (None for toy-oracle).
    Keypoints are 18 pixel ``(x, y)`` pairs, -1 missing; ``source_keypoints`` is None for toy-oracle.
    ``toy_pose``: the toy-oracle's sampled pose parameters.
    """

    name: str
    source: ImageRecord
    k: int
    seed: int
    target: str | None
    target_keypoints: tuple[tuple[int, int], ...]
    source_keypoints: tuple[tuple[int, int], ...] | None = None
    toy_pose: PoseParams | None = None


def synthetic_name(source: ImageRecord, k: int, suffix: str = ".jpg") -> str:
    """``<source stem>_syn<k:02d><suffix>``; names that are not Market-style get ``PPPP_cC_`` in front."""
    stem = Path(source.name).stem
    try:
        parsed = parse_market_name(source.name)
    except DatasetError:
        parsed = None
    if parsed != (source.pid, source.camid):  # e.g. MSMT17 names: make the labels readable from the name
        stem = f"{source.pid:04d}_c{source.camid + 1}_{stem}"
    name = f"{stem}_syn{k:02d}{suffix}"
    if parse_market_name(name) != (source.pid, source.camid):
        raise DatasetError(f"{source.path}: cannot name a synthetic image that parses to pid {source.pid}, "
                           f"camid {source.camid} (got {name!r})")
    return name


def _as_pairs(kp: np.ndarray) -> tuple[tuple[int, int], ...]:
    return tuple((int(x), int(y)) for x, y in np.asarray(kp, dtype=np.int64))


def plan_synthesis(
    cfg: SynthesisConfig,
    subset_records: Sequence[ImageRecord],
    poses: Mapping[str, np.ndarray] | None,
    *,
    pool: Sequence[ImageRecord] | None = None,
    toy_seed: int | None = None,
    image_size: tuple[int, int] = (128, 64),
    poses_file: str | Path | None = None,
    stats: dict | None = None,
) -> list[SynthesisItem]:
    """Every synthetic image of the job, sorted by source name then ``k``; pure function of its inputs.

    Target-pose strategies (``cfg.strategy``, PCDMs only), all drawn per ``(seed, source, k)``:

    - ``random``: a pose of the bank (the pool's usable poses) of another identity
      (``pose_identity: other``) or any image but the source (``any``).
    - ``same-id``: a pose of another image of the same person in the bank (the paper's text);
      sources whose person has no other usable pose are skipped and counted.
    - ``canonical``: one of ``canonical_k`` k-means centres of the bank's normalised poses
      (:func:`reid_aug.posebank.canonical_poses`), named ``canonical_NN``.
    - ``file``: ``target_poses`` is an annotation csv (its usable poses form the bank, any
      name but the source's) or a ``from,to`` pairs csv (a source's targets are the poses of
      its rows' ``to`` images, in file order, at most ``per_image``; sources without a row,
      or whose targets have no usable pose, are skipped and counted).

    Poses failing :func:`reid_aug.posebank.is_usable_pose` are never targets. A plan does not
    depend on the fraction (so a sweep reuses images across fractions) when the bank does
    not: ``pose_pool: train``, or ``file``.

    ``poses``: ``{name: (18, 2)}`` annotations (PCDMs: source poses and the pose bank; not used by
    toy-oracle). ``pool``: the images whose poses form the bank; default the subset, and required
    for ``pose_pool="train"`` (the whole training split). ``toy_seed``: the toy dataset's seed
    (toy-oracle only). ``image_size`` (H, W): toy-oracle render size. ``poses_file`` names the
    annotation file in errors. ``stats``: filled with the pose-bank counts (usable, unusable,
    unannotated), ``skipped_no_target_pose`` and, for ``canonical``, the ``canonical_poses``.
    """
    records = sorted(subset_records, key=lambda r: r.name)
    if not records:
        raise DatasetError("the subset is empty: nothing to synthesize")
    if cfg.generator == "toy-oracle":
        if toy_seed is None:
            raise SynthesisError("generator 'toy-oracle' needs the toy dataset's seed (toy_seed)")
        items = _plan_toy(cfg, records, toy_seed, image_size)
    else:
        if poses is None:
            raise SynthesisError("generator 'pcdms' needs pose annotations (source poses and the pose bank)")
        if pool is None:
            if cfg.pose_pool != "subset":
                raise SynthesisError(f"pose_pool {cfg.pose_pool!r} needs the training records (pool=dataset.train)")
            pool = records
        items = _plan_pcdms(cfg, records, poses, pool, poses_file or "the pose annotations",
                            stats if stats is not None else {})
    seen: dict[str, str] = {}
    for item in items:
        if item.name in seen and seen[item.name] != item.source.name:
            raise DatasetError(f"sources {seen[item.name]} and {item.source.name} give the same synthetic name "
                               f"{item.name}; rename one of them")
        seen[item.name] = item.source.name
    return items


def _plan_pcdms(cfg, records, poses, pool, poses_file, stats) -> list[SynthesisItem]:
    missing = [r.name for r in records if r.name not in poses]
    if missing and cfg.missing_source_pose == "error":
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DatasetError(f"{poses_file}: no pose row for {len(missing)} subset image(s): {shown}; add their "
                           "keypoints, or set missing_source_pose: skip to leave them out")
    pairs, bank_file = None, poses_file
    if cfg.strategy == "file":
        pairs, bank, bank_file = _file_targets(cfg, poses)
    else:
        bank = build_pose_bank(poses, pool, cfg.min_visible_joints)
    if bank is not None:
        if len(bank) == 0:
            raise DatasetError(f"{bank_file}: none of the {cfg.pose_pool} pool's images has a usable pose "
                               f"(>= {cfg.min_visible_joints} visible joints with neck and a hip)")
        stats.update(pose_bank_usable=len(bank), pose_bank_unusable=bank.num_unusable,
                     pose_bank_unannotated=bank.num_unannotated)
    centres = None
    if cfg.strategy == "canonical":
        try:
            centres = canonical_poses(bank, cfg.canonical_k, cfg.seed)
        except ValueError as exc:
            raise DatasetError(f"{poses_file}: {exc}") from None
        stats["canonical_poses"] = centres
    identity = "same" if cfg.strategy == "same-id" else "any" if cfg.strategy == "file" else cfg.pose_identity
    pid_counts = bank.pid_counts() if bank is not None else {}
    items, skipped = [], 0
    for rec in records:
        if rec.name not in poses:
            continue
        src = _as_pairs(poses[rec.name])
        if centres is not None:
            drawn = draw_canonical(len(centres), rec, cfg.per_image, cfg.seed)
            targets = [(f"canonical_{j:02d}", centres[j]) for j in drawn]
        elif pairs is not None:
            targets = [(t, poses[t]) for t in pairs.get(rec.name, [])[:cfg.per_image]]
        elif identity == "same" and num_candidates(bank, rec, identity, pid_counts) <= 0:
            targets = []
        else:
            drawn = draw_targets(bank, rec, cfg.per_image, cfg.seed, identity, pid_counts)
            targets = [(bank.names[j], bank.keypoints[j]) for j in drawn]
        skipped += not targets
        for k, (name, kp) in enumerate(targets):
            items.append(SynthesisItem(synthetic_name(rec, k), rec, k, item_seed(cfg.seed, STREAM_NOISE, rec.name, k),
                                       name, _as_pairs(kp), src))
    stats["skipped_no_target_pose"] = skipped
    return items


def _file_targets(cfg: SynthesisConfig, poses: Mapping[str, np.ndarray]):
    """``strategy: file``: ``(pairs, None, file)`` for a ``from,to`` pairs csv (source name -> its target
    names with a usable annotated pose, file order) or ``(None, bank, file)`` for an annotation csv."""
    from pcdms.pose import PAIRS_HEADER, read_pairs_csv

    path = cfg.target_poses
    if not path.is_file():
        raise DatasetError(f"target_poses file not found: {path}")
    with open(path, encoding="utf-8-sig") as f:
        header = tuple(c.strip() for c in f.readline().strip().split(","))
    if header[-2:] == PAIRS_HEADER:
        pairs: dict[str, list[str]] = {}
        unknown = set()
        for src, tgt in read_pairs_csv(path):
            if tgt not in poses:
                unknown.add(tgt)
            elif is_usable_pose(poses[tgt], cfg.min_visible_joints):
                pairs.setdefault(src, []).append(tgt)
        if unknown:
            raise DatasetError(f"{path}: {len(unknown)} target image(s) have no pose in the annotations "
                               f"(e.g. {min(unknown)}); a pairs file's targets must be annotated images")
        return pairs, None, path
    file_poses = read_annotation_csv(path)
    # The file's names need not be dataset images: every pose stands for its own identity.
    pool = [ImageRecord(path=Path(name), name=name, pid=-1 - i, camid=0, label=-1)
            for i, name in enumerate(sorted(file_poses))]
    return None, build_pose_bank(file_poses, pool, cfg.min_visible_joints), path


def _plan_toy(cfg, records, toy_seed, image_size) -> list[SynthesisItem]:
    h, w = image_size
    bodies: dict[int, Any] = {}
    items = []
    for rec in records:
        if rec.pid not in bodies:
            bodies[rec.pid] = identity_for(toy_seed, rec.pid).body
        for k in range(cfg.per_image):
            pose = sample_pose_params(item_rng(cfg.seed, STREAM_TOY_POSE, rec.name, k))
            kp = project_pose(bodies[rec.pid], pose, h, w)[0]
            items.append(SynthesisItem(
                synthetic_name(rec, k), rec, k, item_seed(cfg.seed, STREAM_TOY_IMAGE, rec.name, k),
                None, _as_pairs(kp), None, pose))
    return items


def config_dict(cfg: SynthesisConfig) -> dict[str, Any]:
    """``cfg`` as JSON-ready data, as the manifest stores it; paths made absolute, so a resume compares
    equal from any working directory."""
    # Tuples (per-stage guidance) as lists, as JSON reads them back: a resume must compare equal.
    return {k: str(v.absolute()) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(cfg).items()}


def plan_sha256(items: Iterable[SynthesisItem]) -> str:
    """Hash of everything that decides the images (names, sources, seeds, target poses)."""
    h = hashlib.sha256()
    for it in items:
        row = [it.name, it.source.name, it.source.pid, it.source.camid, it.k, it.seed, it.target,
               it.target_keypoints, it.source_keypoints, dataclasses.asdict(it.toy_pose) if it.toy_pose else None]
        h.update((json.dumps(row) + "\n").encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- generators


def toy_oracle_image(toy_seed: int, pid: int, camid: int, pose: PoseParams, rng: np.random.Generator,
                     height: int = 128, width: int = 64) -> tuple[Image.Image, np.ndarray]:
    """The toy renderer's person ``pid`` in ``pose`` seen by (0-based) camera ``camid``: (image, (18, 2) keypoints).

    The same call :func:`reid_aug.data.toy.render_shot` makes for a real toy image, so with a
    real image's pose and rng it reproduces that image exactly.
    """
    # Toy cameras are keyed by the 1-based number of the name (c1 -> 1); camids are 0-based.
    return render_person(identity_for(toy_seed, pid), pose, camera_for(toy_seed, camid + 1), rng, height, width)


def _toy_generate(items: Sequence[SynthesisItem], out: Path, toy_seed: int, image_size, bar,
                  preview: bool = True) -> None:
    h, w = image_size
    shown = []
    for item in items:
        img, kp = toy_oracle_image(toy_seed, item.source.pid, item.source.camid, item.toy_pose,
                                   np.random.default_rng(item.seed), h, w)
        if _as_pairs(kp) != item.target_keypoints:
            raise RuntimeError(f"{item.name}: rendered keypoints differ from the plan; the toy renderer changed "
                               "since this folder was planned (re-run with --overwrite)")
        save_image(img, out / item.name)
        bar.update(1)
        if preview and len(shown) < PREVIEW_ROWS:
            shown.append((item, None, np.asarray(img)))
            if len(shown) == min(PREVIEW_ROWS, len(items)):
                write_preview(out, shown, image_size)


def _open_rgb(path: Path) -> Image.Image | None:
    if not path.is_file():
        return None
    with Image.open(path) as im:
        return to_rgb8(im, str(path))


def write_preview(out: Path, shown: Sequence[tuple], image_size: tuple[int, int]) -> None:
    """``OUT/preview.png``: one row per ``(item, coarse or None, result)``: source | target skeleton | coarse |
    result, at ``image_size`` (H, W); kept if it exists (a resumed job does not redraw it)."""
    from pcdms.pose import draw_skeleton
    from reid_aug.visualize import image_grid

    path = out / PREVIEW_NAME
    if path.exists() or not shown:
        return
    rows = [[Image.open(it.source.path), draw_skeleton(np.array(it.target_keypoints), image_size, image_size),
             coarse, result] for it, coarse, result in shown]
    grid = image_grid(rows, cell=tuple(image_size), header=("source", "target", "coarse", "result"))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def encoder_paths(cfg: SynthesisConfig) -> dict[str, Path | None]:
    """Encoder paths of a job: the configured ones, else those the pipeline folder carries."""
    from pcdms.pipeline import PCDMsPipeline

    bundled = PCDMsPipeline.bundled_encoder_paths(cfg.pipeline) if cfg.pipeline is not None else {}
    return {"clip": cfg.clip_checkpoint or bundled.get("clip"), "dino": cfg.dino_path or bundled.get("dino"),
            "vae": cfg.vae_path or bundled.get("vae")}


def _missing_weights_message(cfg: SynthesisConfig) -> str | None:
    from pcdms.encoders import CLIP_SOURCE, DINO_SOURCE, VAE_SOURCE

    paths = encoder_paths(cfg)
    needed = [f"{key} ({flag}): {source}" for key, name, flag, source in (
        ("clip_checkpoint", "clip", "--clip-checkpoint", CLIP_SOURCE), ("dino_path", "dino", "--dino", DINO_SOURCE),
        ("vae_path", "vae", "--vae", VAE_SOURCE)) if paths[name] is None]
    if not needed or cfg.allow_random_weights:
        return None
    return ("generator 'pcdms' needs the frozen encoders' weights; missing: " + "; ".join(needed)
            + " (allow_random_weights: true builds random encoders, for tests and smoke runs only)")


def check_pcdms_weights(cfg: SynthesisConfig) -> Path:
    """Fail early, naming what is needed, if the PCDMs pipeline folder or an encoder path is missing."""
    from pcdms.encoders import WeightsNotFoundError

    if cfg.pipeline is None:
        raise WeightsNotFoundError(
            "generator 'pcdms' needs a trained PCDMs pipeline folder: set pipeline: DIR (--pipeline DIR), a folder "
            "written by train-pcdms or PCDMsPipeline.save_pretrained (model_index.json, prior/, inpaint/, refine/), "
            "or builtin:toy for the shipped toy generator; random stage weights are never used")
    folder = Path(cfg.pipeline)
    if not (folder / "model_index.json").is_file():
        what = "not found" if not folder.exists() else "has no model_index.json"
        raise WeightsNotFoundError(f"PCDMs pipeline folder {folder} {what}: expected a folder written by "
                                   "PCDMsPipeline.save_pretrained (model_index.json, prior/, inpaint/, refine/)")
    message = _missing_weights_message(cfg)
    if message:
        raise WeightsNotFoundError(message)
    from pcdms.pipeline import STAGES, check_sampler_steps

    have = set(read_json_object(folder / "model_index.json").get("stages", []))
    use_prior, use_refine = STAGES[cfg.stages]
    for sub, used in (("prior_scheduler", use_prior), ("latent_scheduler", True)):
        path = folder / sub / "scheduler_config.json"
        if used and path.is_file():
            try:
                check_sampler_steps(cfg.scheduler, read_json_object(path), cfg.num_inference_steps,
                                    f"{sub.removesuffix('_scheduler')} schedule ({path})")
            except ValueError as exc:
                raise SynthesisError(f"--steps {cfg.num_inference_steps}: {exc}") from None
    _check_weight_files(folder)
    lacking = [name for name, used in (("prior", use_prior), ("refine", use_refine)) if used and name not in have]
    if lacking:
        usable = [k for k, (p, r) in STAGES.items() if (not p or "prior" in have) and (not r or "refine" in have)]
        raise SynthesisError(f"{folder}: stages {cfg.stages!r} need the {' and '.join(lacking)} stage, which this "
                             f"pipeline lacks (it has {sorted(have)}); use --stages one of {usable}")
    return folder


def _check_weight_files(folder: Path) -> None:
    """Every ``*.safetensors`` of the pipeline folder opens (its header is read, not the tensors): a
    truncated or half-copied file is named here, before anything loads or is written."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*/*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as exc:
            raise SynthesisError(f"{path}: unreadable weights ({exc}); a truncated or partly copied file? "
                                 "copy it again") from None


def resolve_device(cfg: SynthesisConfig) -> torch.device:
    """``cfg.device``, default cuda when available, else cpu; an unavailable cuda device is an error."""
    try:
        return _torch_device(cfg.device)
    except ValueError as exc:
        raise SynthesisError(str(exc)) from None


def resolve_dtype(cfg: SynthesisConfig) -> str:
    """The pipeline dtype name of ``cfg``: ``cfg.dtype``, or for ``"auto"`` bfloat16 where the
    device computes it natively (:func:`pcdms.devices.has_native_bf16`) and float32 elsewhere.

    Manifests, timings and resume checks use this resolved name, so a job started in bf16 on one
    machine is not silently continued in float32 on another.
    """
    if cfg.dtype != AUTO_DTYPE:
        return cfg.dtype
    return "bfloat16" if has_native_bf16(resolve_device(cfg)) else "float32"


def load_pcdms(cfg: SynthesisConfig):
    """The :class:`pcdms.pipeline.PCDMsPipeline` of ``cfg`` on its device and dtype."""
    from pcdms.encoders import build_encoders
    from pcdms.pipeline import PCDMsPipeline
    from pcdms.presets import get_preset

    folder = check_pcdms_weights(cfg)
    try:
        preset = get_preset(json.loads((folder / "model_index.json").read_text())["preset"])
    except (json.JSONDecodeError, KeyError) as exc:
        raise SynthesisError(f"{folder / 'model_index.json'}: unreadable or without 'preset' ({exc})") from None
    device, dtype = resolve_device(cfg), DTYPES[resolve_dtype(cfg)]
    # Random encoders (tests) are seeded so that a resumed job rebuilds the same ones.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        paths = encoder_paths(cfg)
        encoders = build_encoders(preset, paths["clip"], paths["dino"], paths["vae"],
                                  allow_random=cfg.allow_random_weights, device=device, dtype=dtype)
    pipe = PCDMsPipeline.from_pretrained(folder, encoders=encoders, preset=preset, device=device, dtype=dtype)
    for model in (pipe.prior, pipe.inpaint, pipe.refine):
        if model is not None:
            model.eval()
    return pipe


def _load_source(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Source image -> (3, H, W) float in [0, 1], resized to ``size`` = (H, W) if needed
    (:func:`pcdms.encoders.load_image`); an unreadable file is a :class:`DatasetError`."""
    from pcdms.encoders import load_image

    try:
        return load_image(path, size)
    except ValueError as exc:
        raise DatasetError(f"unreadable source image {exc}") from None


def _pcdms_generate(todo: Sequence[SynthesisItem], out: Path, pipe, cfg: SynthesisConfig, bar,
                    preview: bool = True) -> list[float]:
    """Make the ``todo`` images, ``cfg.batch_size`` per pipeline call; return each call's seconds
    (generation and writing).

    Every call has exactly ``batch_size`` samples (a short last batch is padded with copies of
    its last item, whose outputs are dropped): each sample's noise comes from its own generator
    and no layer mixes samples, so with the batch size fixed an image's bytes do not depend on
    the other images of its batch (tested on CPU), hence not on resume points, shards or which
    other images the job holds. Another batch size can change the rounding (oneDNN picks other
    convolution kernels), which is why ``batch_size`` is part of a job's identity.
    """
    size = tuple(pipe.preset.image_size)
    seconds = []
    for start in range(0, len(todo), cfg.batch_size):
        t0 = time.perf_counter()
        real = list(todo[start:start + cfg.batch_size])
        batch = real + [real[-1]] * (cfg.batch_size - len(real))
        images = torch.stack([_load_source(it.source.path, size) for it in batch])
        src = np.array([it.source_keypoints for it in batch], dtype=np.int64)
        tgt = np.array([it.target_keypoints for it in batch], dtype=np.int64)
        # CPU generators: the initial noise is the same on any device and for any batch split.
        gens = [torch.Generator().manual_seed(it.seed) for it in batch]
        result = pipe(images, src, tgt, num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale, generator=gens, stages=cfg.stages,
                      scheduler=cfg.scheduler, output_type="pt", refine_strength=cfg.refine_strength)
        pixels, coarse = (_to_uint8(x) for x in (result.images, result.coarse_images))
        for it, px, cx in zip(real, pixels, coarse):
            if cfg.keep_coarse:  # before the image: a present image means its coarse one is there too
                save_image(Image.fromarray(cx), out / COARSE_DIR / it.name)
            save_image(Image.fromarray(px), out / it.name)
        # One update per batch: per-image updates would time the first image by the whole first batch
        # (warm-up included) and show an hours-long ETA.
        bar.update(len(real))
        if preview:
            write_preview(out, list(zip(real, coarse, pixels))[:PREVIEW_ROWS], size)
        seconds.append(time.perf_counter() - t0)
    return seconds


def timing_key(cfg: SynthesisConfig, pipeline_sha256: str) -> TimingKey:
    """What decides a PCDMs job's speed (:mod:`reid_aug.timings`)."""
    from pcdms.pipeline import STAGES, per_stage_guidance

    use_prior, use_refine = STAGES[cfg.stages]
    runs = (("prior", use_prior), ("inpaint", True), ("refine", use_refine))
    guided = ",".join(name for (name, used), w in zip(runs, per_stage_guidance(cfg.guidance_scale))
                      if used and w != 1.0) or "none"
    return TimingKey(pipeline_sha256, resolve_device(cfg).type, resolve_dtype(cfg), cfg.scheduler,
                     cfg.num_inference_steps, cfg.stages, cfg.batch_size, guided,
                     cfg.refine_strength if use_refine else 1.0)


def _record_speed(cfg: SynthesisConfig, pipeline_sha256: str, batch_seconds: Sequence[float]) -> None:
    """Store the steady-state seconds per image of a run (the first, warm-up batch left out when
    there are others) for later dry runs."""
    if not batch_seconds:
        return
    steady = list(batch_seconds[1:]) or list(batch_seconds)
    device = resolve_device(cfg)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    record_timing(timing_key(cfg, pipeline_sha256), sum(steady) / (len(steady) * cfg.batch_size),
                  len(steady) * cfg.batch_size, name)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_image(img: Image.Image, path: Path) -> None:
    """Write ``img`` atomically: PNG for a ``.png`` name (lossless, the image-quality protocol), else
    JPEG at :data:`JPEG_QUALITY` (Market's own format, for training folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.suffix.lower() == ".png"
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG" if png else "JPEG", **({} if png else {"quality": JPEG_QUALITY}))


# --------------------------------------------------------------------------- output folder


def _image_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if is_image_file(p)}


def _compared_config(config: Mapping[str, Any]) -> dict[str, Any]:
    # Keys a stored config lacks (written before the key existed) take their default: not a change.
    defaults = {f.name: f.default for f in dataclasses.fields(SynthesisConfig)}
    merged = {**defaults, **config}
    ignored = EXECUTION_KEYS + (("batch_size",) if merged["generator"] == "toy-oracle" else ())  # draws one by one
    return {k: v for k, v in merged.items() if k not in ignored}


def read_synthesis_manifest(out: Path) -> dict | None:
    """``out/manifest.json`` if this step wrote it, None if there is none; another step's is an error."""
    try:
        data = read_manifest(out)
    except ValueError as exc:
        raise SynthesisError(f"{exc}; remove the folder or choose another output") from None
    if data is None:
        return None
    if data.get("step") != STEP:
        raise SynthesisError(f"{out} holds the output of step {data.get('step')!r}, not {STEP!r}; choose another "
                             "output folder")
    return data


def check_synthetic_folder(folder: str | Path, real_names: Iterable[str]) -> dict[str, Any]:
    """Provenance of a folder of synthetic images about to be trained on with the real images ``real_names``.

    A ``synthesize`` folder must be complete and made only from those real images (a folder made from a
    larger subset would carry identities' views the training subset does not hold: leakage); a
    ``filter-identity`` folder is checked through the synthesis folder it filtered. Returns
    ``{"folder", "step", "plan_sha256", "complete"}`` for the training manifest; a folder without a
    manifest (images from elsewhere) returns ``step: None``. Raises SynthesisError naming the folder.
    """
    folder = Path(folder)
    stored = read_manifest(folder)
    if stored is None:
        return {"folder": str(folder.absolute()), "step": None, "plan_sha256": None, "complete": None}
    if stored.get("step") == "filter-identity":
        inner = check_synthetic_folder(stored.get("sources", {}).get("synthetic", ""), real_names)
        return {**inner, "folder": str(folder.absolute()), "step": "filter-identity", "filtered": inner["folder"]}
    if stored.get("step") != STEP:
        raise SynthesisError(f"{folder} holds the output of {stored.get('step')!r}, not synthetic images")
    if not stored.get("complete"):
        raise SynthesisError(f"{folder}: the synthesis is unfinished (manifest.json says complete: false); run "
                             "the same synthesize command again to finish it")
    real = set(real_names)
    table = folder / SYNTHESIS_CSV
    if not table.is_file():
        raise SynthesisError(f"{folder}: {SYNTHESIS_CSV} is missing; cannot tell which real images it was made from")
    with open(table, newline="", encoding="utf-8-sig") as f:
        outside = sorted({row["source"] for row in csv.DictReader(f)} - real)
    if outside:
        raise SynthesisError(f"{folder} was made from {len(outside)} real image(s) outside the training subset "
                             f"(e.g. {', '.join(outside[:3])}): training on it would leak them; synthesize from "
                             "this subset instead")
    return {"folder": str(folder.absolute()), "step": STEP, "plan_sha256": stored.get("plan_sha256"),
            "complete": True}


def config_differences(stored: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every setting (not ``device``) in which a folder's stored config differs
    from ``config`` (:func:`config_dict` form); keys the stored config lacks count as their default."""
    old, new = _compared_config(stored), _compared_config(config)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _conflicts(stored: Mapping[str, Any], config: Mapping[str, Any], plan_hash: str) -> list[str]:
    diffs = config_differences(stored.get("config", {}), config)
    if not diffs and stored.get("plan_sha256") != plan_hash:
        diffs.append("the plan (dataset, subset or pose file) differs")
    return diffs


def _clear_outputs(out: Path) -> None:
    """--overwrite on a folder of this step: remove its images, CSVs and manifest (nothing else)."""
    for name in _image_names(out):
        (out / name).unlink()
    for name in (SYNTHESIS_CSV, ANNOTATION_CSV, SUBSET_CSV, PREVIEW_NAME, CANONICAL_CSV, CANONICAL_PNG, MANIFEST_NAME):
        (out / name).unlink(missing_ok=True)
    if (out / COARSE_DIR).is_dir():
        shutil.rmtree(out / COARSE_DIR)


def _remove_stale_temps(out: Path) -> None:
    # What a kill during pcdms.io.atomic_path leaves behind: ".<name>.tmp.<random><suffix>".
    for p in [*out.glob(".*.tmp.*"), *out.glob(f"{COARSE_DIR}/.*.tmp.*")]:
        if p.is_file():
            p.unlink()


def _write_tables(out: Path, items: Sequence[SynthesisItem], subset_records: Sequence[ImageRecord],
                  settings: Mapping[str, Any]) -> dict[str, str]:
    import pandas as pd

    table = pd.DataFrame([_table_row(it) for it in items], columns=list(SYNTHESIS_COLUMNS), dtype=str)
    for key in SETTINGS_COLUMNS:
        table[key] = settings.get(key, "")
    write_text_atomic(out / SYNTHESIS_CSV, table.to_csv(index=False, lineterminator="\n"))
    write_annotation_csv(out / ANNOTATION_CSV, {it.name: np.array(it.target_keypoints) for it in items})
    write_subset_csv(out / SUBSET_CSV, subset_records)
    return {name: sha256_file(out / name) for name in (SYNTHESIS_CSV, ANNOTATION_CSV, SUBSET_CSV)}


def _table_row(it: SynthesisItem) -> tuple[str, ...]:
    """``manifest.csv`` plan columns of an item (:data:`SYNTHESIS_COLUMNS`), as the CSV reads it back."""
    return (it.name, it.source.name, str(it.source.pid), str(it.source.camid), str(it.k), str(it.seed),
            it.target or "", json.dumps([list(p) for p in it.target_keypoints]))


def _reusable(items: Sequence[SynthesisItem], out: Path, folders: Sequence[str | Path], config: Mapping[str, Any],
              checkpoints: Mapping[str, str]) -> dict[str, Path]:
    """Planned images that a complete folder of the same job (same config, pipeline weights and plan row)
    already holds: name -> that file."""
    wanted = {it.name: _table_row(it) for it in items}
    found: dict[str, Path] = {}
    for folder in map(Path, folders):
        if folder.absolute() == out or not (folder / SYNTHESIS_CSV).is_file():
            continue
        try:
            stored = read_synthesis_manifest(folder)
        except SynthesisError:
            continue
        if (stored is None or not stored.get("complete")
                or _compared_config(stored.get("config", {})) != _compared_config(config)
                or (checkpoints.get("pipeline") and stored.get("checkpoints", {}).get("pipeline")
                    != checkpoints.get("pipeline"))):
            continue
        with open(folder / SYNTHESIS_CSV, newline="") as f:
            rows = {r["name"]: tuple(r[c] for c in SYNTHESIS_COLUMNS) for r in csv.DictReader(f)}
        for name, row in wanted.items():
            if name not in found and rows.get(name) == row and (folder / name).is_file():
                found[name] = folder / name
    return found


def _link(src: Path, dst: Path) -> None:
    import os
    import shutil

    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _settings(cfg: SynthesisConfig, checkpoints: Mapping[str, str]) -> dict[str, Any]:
    """The ``manifest.csv`` settings columns (:data:`SETTINGS_COLUMNS`) of a job."""
    pcdms = cfg.generator == "pcdms"
    return {"generator": cfg.generator,
            "strategy": _strategy_label(cfg) if pcdms else "toy-oracle",
            "scheduler": cfg.scheduler if pcdms else "", "num_inference_steps": cfg.num_inference_steps if pcdms else "",
            "guidance_scale": guidance_text(cfg.guidance_scale) if pcdms else "",
            "refine_strength": cfg.refine_strength if pcdms else "", "stages": cfg.stages if pcdms else "",
            "dtype": resolve_dtype(cfg) if pcdms else "", "pipeline_sha256": checkpoints.get("pipeline", "")}


def guidance_text(guidance_scale: float | Sequence[float]) -> str:
    """``2.0`` or ``prior,inpaint,refine`` (``2.0,2.0,1.0``): how manifests, tables and ``--guidance`` write it."""
    if isinstance(guidance_scale, (int, float)):
        return str(float(guidance_scale))
    return ",".join(str(float(w)) for w in guidance_scale)


def parse_guidance(text: str) -> float | tuple[float, float, float]:
    """Read :func:`guidance_text`'s form back: one number, or three comma-separated (prior,inpaint,refine).
    Raises ``ValueError`` naming the text otherwise (the rule is :func:`pcdms.pipeline.per_stage_guidance`'s)."""
    from pcdms.pipeline import per_stage_guidance

    try:
        values = tuple(float(v) for v in str(text).split(","))
        guidance = values[0] if len(values) == 1 else values
        per_stage_guidance(guidance)
    except ValueError:
        raise ValueError(f"guidance {text!r}: give one scale >= 0, "
                         "or three comma-separated (prior,inpaint,refine)") from None
    return guidance


def _strategy_label(cfg: SynthesisConfig) -> str:
    if cfg.strategy == "random":
        return f"random ({cfg.pose_pool} pool, {cfg.pose_identity} identities)"
    if cfg.strategy == "canonical":
        return f"canonical (k={cfg.canonical_k}, {cfg.pose_pool} pool)"
    if cfg.strategy == "file":
        return f"file ({cfg.target_poses.name})"
    return f"same-id ({cfg.pose_pool} pool)"


def write_canonical_poses(out: Path, centres: np.ndarray, image_size: tuple[int, int]) -> dict[str, str]:
    """``OUT/canonical-poses.csv`` (community annotation format, names ``canonical_NN``) and
    ``OUT/canonical-poses.png`` (their skeletons in a row); returns their sha256 by name."""
    from pcdms.pose import draw_skeleton
    from reid_aug.visualize import image_grid

    names = [f"canonical_{j:02d}" for j in range(len(centres))]
    write_annotation_csv(out / CANONICAL_CSV, dict(zip(names, centres)))
    sheet = image_grid([[draw_skeleton(kp, image_size, image_size) for kp in centres]], cell=tuple(image_size),
                       header=[n.removeprefix("canonical_") for n in names])
    with atomic_path(out / CANONICAL_PNG) as tmp:
        sheet.save(tmp, format="PNG")
    return {name: sha256_file(out / name) for name in (CANONICAL_CSV, CANONICAL_PNG)}


def _check_identities(dataset: ReidDataset, records: Sequence[ImageRecord]) -> None:
    """Sources must be training images of ``dataset``; no pid may be a query/gallery identity (DESIGN §6)
    where the layout numbers persons across splits (MSMT17 does not: its ids are per split)."""
    train = {r.name: r for r in dataset.train}
    test_pids = {r.pid for r in dataset.query + dataset.gallery} if dataset.ids_shared_across_splits else set()
    for rec in records:
        real = train.get(rec.name)
        if real is None or (real.pid, real.camid) != (rec.pid, rec.camid):
            raise DatasetError(f"{rec.name} (pid {rec.pid}) is not a training image of {dataset.root}; "
                               "synthetic images are only made from the training split")
        if rec.pid in test_pids:
            raise DatasetError(f"{rec.name}: pid {rec.pid} is also a query/gallery identity of {dataset.root}; "
                               "synthetic images must never carry a test identity")


@locked_output("out_dir")  # two runs into one folder at once: the second fails
def synthesize(
    cfg: SynthesisConfig,
    dataset: ReidDataset,
    subset_records: Sequence[ImageRecord],
    out_dir: str | Path,
    poses_csv: str | Path | None = None,
    subset_file: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    sources_extra: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    reuse_from: Sequence[str | Path] = (),
    dry_run: bool = False,
) -> Path | dict[str, Any]:
    """Run (or resume) the synthesis job of ``cfg`` for ``subset_records`` into ``out_dir``; return it.

    ``dry_run``: plan only, write nothing and load no network; return the plan as a dict
    (images, already made, reusable, to make, batches, strategy, pose-bank counts, settings).

    Several processes (``torchrun --nproc_per_node N $(which reid-aug) synthesize ...`` or
    ``accelerate launch``; one GPU each): process ``r`` makes images ``r, r + N, ...`` of what is
    left, and process 0 writes the tables and the one manifest when all are done. The images are
    the same bytes as one process makes (each is independent of its batch company).

    ``reuse_from``: other complete synthesis folders (e.g. the same method at other fractions of
    a sweep). An image is a pure function of (source, k, seed, target pose, generator, settings),
    so a planned image that such a folder made with the same config, the same pipeline weights
    and the same plan row is hard-linked (or copied) instead of generated again.

    ``poses_csv``: annotation file of the training images (default
    ``<dataset root>/market-annotation-train.csv``; toy-oracle reads none). ``subset_file`` and
    ``sources_extra`` are recorded in the manifest. An ``out_dir`` of an earlier run with another
    config or plan is an error unless ``overwrite`` (then its images and tables are replaced);
    ``device`` may change between runs, ``batch_size`` only for the toy oracle (it draws one image
    at a time; a PCDMs image's rounding depends on its batch size). ``log`` receives status lines.
    """
    rank, world = _process_group()
    say = log if log is not None and rank == 0 else (lambda _msg: None)
    out = Path(out_dir).absolute()
    records = sorted(subset_records, key=lambda r: r.name)
    _check_identities(dataset, records)

    # 1. The plan: every image of the job, before anything is written.
    poses = None
    toy_seed, image_size, poses_path = None, (128, 64), None
    if cfg.generator == "toy-oracle":
        toy = read_toy_manifest(dataset.root)
        if toy is None:
            raise SynthesisError(f"generator 'toy-oracle' only works on a toy Market made by make-toy-market; "
                                 f"{dataset.root / MANIFEST_NAME} is missing or from another step")
        toy_seed, image_size = int(toy["seed"]), tuple(toy.get("image_size", image_size))
    else:
        check_pcdms_weights(cfg)
        poses_path = Path(poses_csv) if poses_csv is not None else dataset.root / DEFAULT_POSES_FILE
        if not poses_path.is_file():
            raise DatasetError(f"pose annotation file not found: {poses_path} (community Market format "
                               "'name:keypoints_y:keypoints_x'; pass --poses FILE)")
        poses = read_annotation_csv(poses_path)
    stats: dict[str, Any] = {}
    items = plan_synthesis(cfg, records, poses, pool=pool_records(cfg.pose_pool, records, dataset.train),
                           toy_seed=toy_seed, image_size=image_size, poses_file=poses_path, stats=stats)
    canonical = stats.pop("canonical_poses", None)
    if not items:
        raise DatasetError(f"strategy {cfg.strategy!r} found no target pose for any of the {len(records)} subset "
                           f"images ({stats.get('skipped_no_target_pose', 0)} skipped)")
    plan_hash, config = plan_sha256(items), config_dict(cfg)

    # 2. The output folder: new, ours with the same job (resume / done), or a conflict.
    if out.exists() and not out.is_dir():
        raise SynthesisError(f"{out} exists and is not a folder")
    stored = read_synthesis_manifest(out) if out.is_dir() else None
    if stored is None and out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise SynthesisError(f"{out} is not empty and has no {STEP} manifest.json; choose an empty or new folder")
    if stored is not None:
        diffs = _conflicts(stored, config, plan_hash)
        if diffs and not overwrite:
            raise SynthesisError(f"{out} was made with another synthesis job ({'; '.join(diffs)}); use --overwrite "
                                 "to replace it, or choose another output folder")
    if dry_run:
        existing = set() if overwrite or not out.is_dir() else _image_names(out) & {it.name for it in items}
        left = [it for it in items if it.name not in existing]
        reusable = _reusable(left, out, reuse_from, config, {}) if reuse_from else {}
        to_make = len(left) - len(reusable)
        estimate = None
        if cfg.generator == "pcdms" and to_make:
            from pcdms.pipeline import pipeline_sha256

            found = estimate_seconds_per_image(timing_key(cfg, pipeline_sha256(cfg.pipeline)))
            if found is not None:
                # Per process: its share, in whole batches (a short last batch is padded and costs a full one).
                per_shard = math.ceil(to_make / max(world, 1))
                padded = math.ceil(per_shard / cfg.batch_size) * cfg.batch_size
                estimate = {"seconds": found[0] * padded, "seconds_per_image": found[0], "source": found[1]}
        return {"out": str(out), "images": len(items), "sources": len(records), "existing": len(existing),
                "reusable": len(reusable), "to_make": to_make, "estimate": estimate,
                "batches": math.ceil((len(left) - len(reusable)) / cfg.batch_size) if cfg.generator == "pcdms" else 0,
                **_settings(cfg, {}), **{k: v for k, v in stats.items()}, "config": config}
    if stored is not None:
        if overwrite:
            if rank == 0:
                _clear_outputs(out)
            stored = None
        if rank == 0:
            _remove_stale_temps(out)
    # The generator loads before the folder is made: weights that fail to load must leave nothing behind.
    pipe = None
    if cfg.generator == "pcdms" and (stored is None or {it.name for it in items} - _image_names(out)):
        if world > 1 and resolve_device(cfg).type == "cuda":  # one GPU per process, as torchrun numbers them
            cfg = dataclasses.replace(cfg, device=f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")
        pipe = load_pcdms(cfg)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(world)
    planned = {it.name for it in items}
    existing = _image_names(out)
    unexpected = sorted(existing - planned)
    if unexpected:
        raise SynthesisError(f"{out} holds {len(unexpected)} image(s) this job does not make (e.g. {unexpected[0]}); "
                             "remove them or use --overwrite")
    todo = [it for it in items if it.name not in existing]
    tables = (SYNTHESIS_CSV, ANNOTATION_CSV, SUBSET_CSV)
    if stored is not None and stored.get("complete") and not todo and all((out / t).is_file() for t in tables):
        say(f"{out}: complete ({len(items)} images, same config); nothing to do")
        return out

    # 3. Generate what is missing, each image written atomically.
    checkpoints: dict[str, str] = {}
    if todo and cfg.generator == "pcdms":
        from pcdms.pipeline import pipeline_sha256

        checkpoints["pipeline"] = pipeline_sha256(cfg.pipeline)
        old = (stored or {}).get("checkpoints", {}).get("pipeline")
        if old is not None and old != checkpoints["pipeline"] and not overwrite:
            raise SynthesisError(f"{cfg.pipeline}: the pipeline weights changed since {out} was started "
                                 "(sha256 differs); use --overwrite to start again")
        image_size = tuple(pipe.preset.image_size)
    elif cfg.generator == "pcdms":  # every image exists (a kill before the tables): keep what the run recorded
        checkpoints = dict((stored or {}).get("checkpoints", {}))
        image_size = tuple((stored or {}).get("image_size", image_size))
    counts = {"sources": len(records), "sources_used": len({it.source.name for it in items}),
              "images": len(items), "existing": len(items) - len(todo)}
    if poses is not None:
        counts["skipped_missing_source_pose"] = sum(r.name not in poses for r in records)
        counts.update(stats)
    sources = {"dataset_root": dataset.root, "subset_file": subset_file, "poses_csv": poses_path,
               "target_poses": cfg.target_poses,
               **(sources_extra or {})}

    def manifest(complete: bool, outputs: Mapping[str, str] | None = None) -> None:
        # An unfinished run states what it set out to make, a finished one what it made.
        counts["generated_this_run" if complete else "to_generate_this_run"] = len(todo)
        counts.pop("to_generate_this_run" if complete else "generated_this_run", None)
        extra = {"complete": complete, "generator": cfg.generator, "allow_random_weights": cfg.allow_random_weights,
                 "plan_sha256": plan_hash, "image_size": list(image_size), "jpeg_quality": JPEG_QUALITY,
                 "counts": counts, "outputs": dict(outputs or {}), "world_size": world}
        if cfg.generator == "pcdms" and cfg.allow_random_weights and None in encoder_paths(cfg).values():
            extra["WARNING"] = RANDOM_WEIGHTS_WARNING
        if cfg.generator == "toy-oracle":
            extra["note"] = TOY_ORACLE_NOTE
        if cfg.generator == "pcdms" and cfg.pipeline is not None and (cfg.pipeline / "model_index.json").is_file():
            stand_in = read_json_object(cfg.pipeline / "model_index.json").get("stand_in")
            if stand_in:  # e.g. the toy generator: say so wherever its images go
                extra["stand_in_encoders"] = stand_in
        write_manifest(out, STEP, config=config, seed=cfg.seed, sources=sources, checkpoints=checkpoints,
                       extra=extra)

    # Reuse is counted over the whole plan (not just what is missing), so the manifest of a resumed job
    # says what an uninterrupted one says.
    reusable = _reusable(items, out, reuse_from, config, checkpoints) if reuse_from else {}
    if reusable:
        linked = [it for it in todo if it.name in reusable] if rank == 0 else []
        for it in linked:
            coarse = reusable[it.name].parent / COARSE_DIR / it.name
            if cfg.keep_coarse and coarse.is_file():  # (same config, so the other folder kept them too)
                (out / COARSE_DIR).mkdir(exist_ok=True)
                _link(coarse, out / COARSE_DIR / it.name)
            _link(reusable[it.name], out / it.name)
        counts["reused"] = len(reusable)
        todo = [it for it in todo if it.name not in reusable]
        say(f"{out}: {len(reusable)} images reused from other folders of the same job")
    if todo:
        say(f"{out}: {len(todo)} of {len(items)} images to make ({len(items) - len(todo)} already there)"
            + (f", shared by {world} processes" if world > 1 else ""))
        if rank == 0:
            manifest(complete=False)  # marks the folder as this job's before the first image lands
        _barrier(world)
        share = todo[rank::world]  # interleaved: every process gets sources from the whole plan
        with tqdm(total=len(items), initial=len(items) - len(todo), desc=f"synthesize ({cfg.generator})",
                  unit="img", disable=not progress or rank != 0) as bar:
            if cfg.generator == "toy-oracle":
                _toy_generate(share, out, toy_seed, image_size, bar, preview=rank == 0)
            else:
                batch_seconds = _pcdms_generate(share, out, pipe, cfg, bar, preview=rank == 0)
                if rank == 0:
                    _record_speed(cfg, checkpoints["pipeline"], batch_seconds)
    _barrier(world)  # every process's images are written
    if rank != 0:  # process 0 writes the tables and the manifest; the others wait for them
        _barrier(world)
        return out

    # 4. Tables and manifest from the full plan.
    missing = planned - _image_names(out)
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} planned images are missing after generation (e.g. {min(missing)})")
    if not (out / PREVIEW_NAME).exists():  # every image was reused or made by an earlier run: draw from the files
        write_preview(out, [(it, _open_rgb(out / COARSE_DIR / it.name), _open_rgb(out / it.name))
                            for it in items[:PREVIEW_ROWS]], image_size)
    outputs = _write_tables(out, items, records, _settings(cfg, checkpoints))
    if canonical is not None:
        outputs.update(write_canonical_poses(out, canonical, image_size))
    manifest(complete=True, outputs=outputs)
    say(f"{out}: complete ({len(items)} images)")
    _barrier(world)
    return out


def _process_group() -> tuple[int, int]:
    """(rank, world size) of this process. Started by torchrun or ``accelerate launch`` (WORLD_SIZE > 1),
    it joins their process group (gloo: synthesis only needs barriers), left at exit."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import atexit

    dist.init_process_group(backend="gloo")
    atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
