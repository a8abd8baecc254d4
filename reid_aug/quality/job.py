"""The ``reid-aug quality`` job: score generated test-pair images as PCDMs Table 1 does (DESIGN.md §9).

For each ordered test pair (source -> target) of a pairs csv, a *variant* provides the predicted
target image: a folder of generated images, the source itself (``copy-source``, the floor every
generator must beat) or, on a toy Market, the renderer's exact person (``toy-oracle``, the
ceiling). Each prediction is scored against the real target at native size:

- per pair (``quality.csv``): SSIM (sigma 1.5, and the PIDM/PCDMs sigma-1.2 variant), LPIPS and
  masked LPIPS (:func:`reid_aug.quality.pixel.pose_mask` of the target keypoints), L1 and
  masked L1 (0-255);
- per variant (``quality.json``): the means, and FID against the training images in the
  ``community`` and ``standard`` variants (:mod:`reid_aug.quality.fid`).

With ``stages`` the generator runs on the pairs first, one folder per stage setting (B1 inpaint,
B2 prior + inpaint, B3 inpaint + refine, full; PCDMs Sec. 4.2), resumably, through the
``synthesize`` machinery: its batching, seeds and atomic writes, PNG output.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pcdms.encoders import load_image_uint8
from pcdms.io import atomic_path, locked_output, sha256_file, write_json_atomic, write_text_atomic
from pcdms.pose import read_annotation_csv, read_pairs_csv
from reid_aug.data.market import DatasetError, ImageRecord, read_reid_dataset
from reid_aug.manifest import read_manifest, write_manifest
from reid_aug.quality.fid import build_fid, add_images, compute_fid, VARIANTS as FID_VARIANTS
from reid_aug.quality.perceptual import load_lpips, lpips_distances
from reid_aug.quality.pixel import apply_mask, l1, pose_mask, ssim
from reid_aug.quality.table import generation_line, markdown_table

STEP = "quality"
GENERATE_STEP = "quality-generate"
BASELINES = ("copy-source", "toy-oracle")
MAPPING_CSV = "generated.csv"  # from,to,file: which file predicts which pair
PAIRS_FILE, POSES_FILE = "market-pairs-test.csv", "market-annotation-test.csv"
METRICS = ("ssim", "ssim_sigma1.2", "lpips", "masked_lpips", "l1", "masked_l1")
PROTOCOL = {
    "ssim": "skimage structural_similarity, gaussian_weights, sigma 1.5, use_sample_covariance=False, "
            "channel_axis=-1, data_range = prediction max - min, 0-255 arrays, mean over pairs "
            "(Pose-Transfer/GFLA/DPTN); ssim_sigma1.2: the same with sigma 1.2 (PIDM/PCDMs scripts)",
    "lpips": "lpips package, AlexNet, v0.1 linear layers, inputs in [-1, 1]; masked: both images black outside "
             "the target-keypoint mask (limb rectangles and joint discs, radius 4, closed by a 5x5 square)",
    "fid_community": "torchvision ImageNet Inception-v3 pool3 (2048), bilinear 299, inputs in [-1, 1]; reference "
                     "= the training images (GFLA/PIDM/PCDMs scripts)",
    "fid_standard": "TF-Inception (2015-12-05) pool3 via torchmetrics/torch-fidelity, no antialias; reference = "
                    "the training images",
    "l1": "mean |prediction - target| over pixels and channels, 0-255; masked: inside the target-keypoint mask",
    "size": "native size of the real target (Market: 128x64); a prediction of another size is an error",
    "samples": "one sample per pair (the PCDMs release keeps the best of 4 by SSIM to the ground truth)",
}


class QualityError(ValueError):
    """The quality job cannot run as asked (unknown pair image, missing prediction, size mismatch, ...)."""


@dataclass(frozen=True)
class QualitySettings:
    """How to score. Weight files: ``lpips_weights`` torchvision's AlexNet, ``fid_weights`` torchvision's
    Inception-v3 (community FID), ``fid_tf_weights`` torch-fidelity's TF-Inception (standard FID);
    ``allow_random_weights`` builds seeded random networks for those not given (smoke runs and tests:
    the numbers mean nothing and are labelled so). ``fid``: the FID variants to compute (``()``: none).
    ``max_pairs``: score that many pairs, evenly spaced over the file (None: all)."""

    lpips_weights: Path | None = None
    fid_weights: Path | None = None
    fid_tf_weights: Path | None = None
    allow_random_weights: bool = False
    fid: tuple[str, ...] = FID_VARIANTS
    max_pairs: int | None = None
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fid) - set(FID_VARIANTS))
        if unknown:
            raise ValueError(f"fid variants must be among {list(FID_VARIANTS)}, got {unknown}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1, got {self.max_pairs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def weight_files(self) -> dict[str, Path | None]:
        """The weight file of each network that runs: ``lpips`` and ``fid_<variant>`` (None: random)."""
        fid = {"community": self.fid_weights, "standard": self.fid_tf_weights}
        return {"lpips": self.lpips_weights, **{f"fid_{v}": fid[v] for v in self.fid}}

    def random_parts(self) -> list[str]:
        """The networks that run on random weights (empty when every metric has its file)."""
        return [k for k, path in self.weight_files().items() if path is None]


@dataclass(frozen=True)
class TestPairs:
    """The scored pairs: source and target records, and the target keypoints ((N, 18, 2), x y, -1 missing)."""

    sources: tuple[ImageRecord, ...]
    targets: tuple[ImageRecord, ...]
    target_keypoints: np.ndarray
    source_keypoints: np.ndarray | None
    pairs_file: Path
    poses_file: Path
    root: Path  # the dataset root
    train: tuple[ImageRecord, ...]  # the FID reference set


def read_test_pairs(data_root: str | Path, pairs_csv: str | Path | None = None, poses_csv: str | Path | None = None,
                    max_pairs: int | None = None) -> TestPairs:
    """The pairs of ``pairs_csv`` (default ``ROOT/market-pairs-test.csv``) with their images in the dataset's
    query/gallery (or train) folders and target keypoints from ``poses_csv`` (default
    ``ROOT/market-annotation-test.csv``). Raises :class:`QualityError` naming the file for a pair
    image that is not in the dataset or has no pose row, and for an empty file."""
    dataset = read_reid_dataset(data_root)
    root = dataset.root
    pairs_file = Path(pairs_csv) if pairs_csv is not None else root / PAIRS_FILE
    poses_file = Path(poses_csv) if poses_csv is not None else root / POSES_FILE
    for path, what in ((pairs_file, "pairs csv (from,to)"), (poses_file, "pose annotation csv")):
        if not path.is_file():
            raise QualityError(f"{what} not found: {path}")
    pairs = read_pairs_csv(pairs_file)
    if not pairs:
        raise QualityError(f"{pairs_file}: no pairs")
    if max_pairs is not None and max_pairs < len(pairs):
        # Evenly spaced: the files are sorted by person, so every part of the test set stays represented.
        pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int)]
    by_name: dict[str, ImageRecord] = {}
    for rec in dataset.train + dataset.gallery + dataset.query:  # test images win a name clash
        by_name[rec.name] = rec
    unknown = sorted({n for pair in pairs for n in pair if n not in by_name})
    if unknown:
        raise QualityError(f"{pairs_file}: {len(unknown)} image(s) are not in {root} (e.g. {unknown[0]})")
    poses = read_annotation_csv(poses_file)
    no_pose = sorted({t for _, t in pairs if t not in poses})
    if no_pose:
        raise QualityError(f"{poses_file}: no pose row for {len(no_pose)} target image(s) (e.g. {no_pose[0]})")
    has_sources = all(s in poses for s, _ in pairs)
    return TestPairs(tuple(by_name[s] for s, _ in pairs), tuple(by_name[t] for _, t in pairs),
                     np.stack([poses[t] for _, t in pairs]).astype(np.int64),
                     np.stack([poses[s] for s, _ in pairs]).astype(np.int64) if has_sources else None,
                     pairs_file, poses_file, root, dataset.train)


def pair_ks(pairs: TestPairs) -> list[int]:
    """For each pair, its index among the pairs of the same source in file order: the ``k`` of
    ``synthesize --strategy file``'s ``<source stem>_synKK`` names."""
    seen: dict[str, int] = {}
    ks = []
    for src in pairs.sources:
        ks.append(seen.get(src.name, 0))
        seen[src.name] = ks[-1] + 1
    return ks


def prediction_files(folder: str | Path, pairs: TestPairs, mapping_csv: str | Path | None = None) -> list[Path]:
    """The file that predicts each pair's target, found (first that applies) through ``mapping_csv``
    (columns ``from,to,file``), ``folder/generated.csv`` (what ``--generate`` writes),
    ``folder/synthesis.csv`` (a ``synthesize --strategy file`` folder: ``name,source,target``),
    else the naming scheme ``<source stem>_synKK.{png,jpg}`` of :func:`pair_ks`.
    Raises :class:`QualityError` naming the folder and a missing pair or file."""
    from reid_aug.synthesis import SYNTHESIS_CSV, synthetic_name

    folder = Path(folder)
    if not folder.is_dir():
        raise QualityError(f"generated-image folder not found: {folder}")
    if mapping_csv is not None and not Path(mapping_csv).is_file():
        raise QualityError(f"mapping csv not found: {mapping_csv}")
    table, where = None, None
    for path in (Path(mapping_csv) if mapping_csv else None, folder / MAPPING_CSV, folder / SYNTHESIS_CSV):
        if path is not None and path.is_file():
            df = pd.read_csv(path, dtype=str, encoding="utf-8-sig")
            cols = ("from", "to", "file") if {"from", "to", "file"} <= set(df.columns) else ("source", "target", "name")
            if not set(cols) <= set(df.columns):
                raise QualityError(f"{path}: needs columns from,to,file (or a synthesis table's source,target,name)")
            table, where = {(a, b): f for a, b, f in df[list(cols)].itertuples(index=False)}, path
            break
    files = []
    for src, tgt, k in zip(pairs.sources, pairs.targets, pair_ks(pairs)):
        if table is not None:
            name = table.get((src.name, tgt.name))
            if name is None:
                raise QualityError(f"{where}: no image for the pair {src.name} -> {tgt.name}")
            files.append(folder / name)
        else:
            stem = synthetic_name(src, k, "")
            found = [folder / f"{stem}{ext}" for ext in (".png", ".jpg") if (folder / f"{stem}{ext}").is_file()]
            files.append(found[0] if found else folder / f"{stem}.png")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise QualityError(f"{folder}: {len(missing)} of {len(files)} predicted images are missing "
                           f"(e.g. {missing[0].name}); generate them, or give a mapping csv (from,to,file)")
    return files


def _read_native(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W, 3) uint8; with ``size`` the image must already have it (quality compares at native size)."""
    from PIL import Image

    from pcdms.images import to_rgb8

    try:
        with Image.open(path) as im:
            arr = np.asarray(to_rgb8(im, str(path)), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise QualityError(f"{path}: cannot read image ({exc})") from None
    if size is not None and arr.shape[:2] != tuple(size):
        raise QualityError(f"{path}: {arr.shape[0]}x{arr.shape[1]} image, but its target is {size[0]}x{size[1]}; "
                           "predictions are scored at the target's native size (resize them first, or generate "
                           "at the dataset's size)")
    return arr


def toy_oracle_images(pairs: TestPairs) -> list[np.ndarray]:
    """``toy-oracle``: the toy renderer's target person in the target's exact pose, seen by the
    *source's* camera (what a perfect generator keeping the source's background draws)."""
    from reid_aug.data.toy import ToyConfig, plan_dataset, read_toy_manifest
    from reid_aug.synthesis import toy_oracle_image

    root = pairs.root
    manifest = read_toy_manifest(root)
    if manifest is None:
        raise QualityError(f"baseline toy-oracle needs a toy Market (make-toy-market); {root} is not one")
    seed = int(manifest["seed"])
    cfg = ToyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["config"].items()})
    shots = {s.name: s for s in plan_dataset(cfg, seed)}
    h, w = tuple(manifest.get("image_size", (128, 64)))
    out = []
    for src, tgt in zip(pairs.sources, pairs.targets):
        source, target = shots[src.name], shots[tgt.name]
        rng = np.random.default_rng([seed, 99, source.index, target.index])
        img, _ = toy_oracle_image(seed, target.pid, source.camid - 1, target.pose, rng, h, w)
        out.append(np.asarray(img, dtype=np.uint8))
    return out


def score_pairs(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                lpips_model, batch_size: int = 32) -> pd.DataFrame:
    """Per-pair metrics (:data:`METRICS` columns) of ``preds`` against ``targets`` ((H, W, 3) uint8 each)
    with the target masks ((H, W) bool)."""
    rows = {m: [] for m in METRICS}
    for p, t, m in zip(preds, targets, masks):
        rows["ssim"].append(ssim(p, t))
        rows["ssim_sigma1.2"].append(ssim(p, t, sigma=1.2))
        rows["l1"].append(l1(p, t))
        rows["masked_l1"].append(l1(p, t, m) if m.any() else math.nan)
    P, T = np.stack(preds), np.stack(targets)
    rows["lpips"] = list(lpips_distances(lpips_model, P, T, batch_size))
    PM = np.stack([apply_mask(p, m) for p, m in zip(preds, masks)])
    TM = np.stack([apply_mask(t, m) for t, m in zip(targets, masks)])
    rows["masked_lpips"] = list(lpips_distances(lpips_model, PM, TM, batch_size))
    return pd.DataFrame(rows)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "torchvision", "scikit-image", "lpips", "torchmetrics", "torch-fidelity", "reid-aug"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _weights_record(settings: QualitySettings) -> dict[str, str]:
    return {k: sha256_file(v) if v is not None else "random" for k, v in settings.weight_files().items()}


def _reference_images(records: Sequence[ImageRecord], size: tuple[int, int], progress: bool) -> torch.Tensor:
    return torch.stack([load_image_uint8(r.path, size) for r in tqdm(records, desc="FID reference (train)",
                                                                     unit="img", disable=not progress)])


def load_metrics(settings: QualitySettings) -> tuple:
    """``(lpips model, {fid variant: metric})``: every network the scores need, loaded (or refused)
    before anything slow runs."""
    files = settings.weight_files()
    lpips_model = load_lpips(files["lpips"], settings.allow_random_weights, device=settings.device)
    return lpips_model, {v: build_fid(v, files[f"fid_{v}"], settings.allow_random_weights, device=settings.device)
                         for v in settings.fid}


def check_output_folder(out: Path) -> None:
    """``out`` must be new, empty, or a quality folder: never the dataset or another step's output."""
    stored = read_manifest(out) if Path(out).is_dir() else None
    if stored is not None and stored.get("step") != STEP:
        raise QualityError(f"{out} holds the output of {stored.get('step')!r} (its manifest.json); choose another "
                           "--out for quality results")


def run_quality(
    data_root: str | Path,
    out_dir: str | Path,
    predictions: Mapping[str, str | Path],
    settings: QualitySettings,
    pairs_csv: str | Path | None = None,
    poses_csv: str | Path | None = None,
    mapping_csv: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    pairs: TestPairs | None = None,
    sources_extra: Mapping[str, Any] | None = None,
    metrics: tuple | None = None,
    generation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score every variant of ``predictions`` (label -> a folder of generated images, or a baseline
    name of :data:`BASELINES`) on the test pairs; write ``OUT/quality.csv`` (one row per variant and
    pair), ``OUT/quality.json`` (means, FIDs, counts, protocol, versions, weight hashes),
    ``OUT/quality.md`` (the table) and ``OUT/manifest.json``; return the ``quality.json`` record.

    Raises :class:`QualityError` for missing or mis-sized predictions and unknown pair images,
    :class:`pcdms.encoders.WeightsNotFoundError` when a metric's weights are neither given nor
    allowed to be random.
    """
    out = Path(out_dir)
    if not predictions:
        raise QualityError("nothing to score: give generated folders and/or a baseline")
    pairs = pairs or read_test_pairs(data_root, pairs_csv, poses_csv, settings.max_pairs)
    # Load every network first: a missing weight file fails before minutes of image reading.
    check_output_folder(out)
    lpips_model, fids = metrics if metrics is not None else load_metrics(settings)
    files = {label: prediction_files(src, pairs, mapping_csv) for label, src in predictions.items()
             if str(src) not in BASELINES}
    targets = [_read_native(r.path, None) for r in pairs.targets]
    size = targets[0].shape[:2]
    masks = [pose_mask(kp, t.shape[:2]) for kp, t in zip(pairs.target_keypoints, targets)]
    if fids:
        reference = _reference_images(pairs.train, size, progress)
        for v, metric in fids.items():
            log(f"FID ({v}): {len(reference):,} reference images")
            add_images(metric, reference, real=True, batch_size=settings.batch_size)
    frames, variants = [], {}
    for label, src in predictions.items():
        if str(src) == "copy-source":
            preds = [_read_native(r.path, t.shape[:2]) for r, t in zip(pairs.sources, targets)]
            names = [r.name for r in pairs.sources]
        elif str(src) == "toy-oracle":
            preds, names = toy_oracle_images(pairs), ["" for _ in pairs.sources]
        else:
            preds = [_read_native(f, t.shape[:2]) for f, t in zip(files[label], targets)]
            names = [str(f.relative_to(out)) if f.is_relative_to(out) else str(f) for f in files[label]]
        log(f"{label}: scoring {len(preds):,} pairs")
        df = score_pairs(preds, targets, masks, lpips_model, settings.batch_size)
        df.insert(0, "variant", label)
        df.insert(1, "from", [r.name for r in pairs.sources])
        df.insert(2, "to", [r.name for r in pairs.targets])
        df.insert(3, "file", names)
        frames.append(df)
        row = {"pairs": len(df), **{m: float(df[m].mean()) for m in METRICS}}
        for v, metric in fids.items():
            metric.reset()  # keeps the reference features
            add_images(metric, torch.from_numpy(np.stack(preds)).permute(0, 3, 1, 2).contiguous(), real=False,
                       batch_size=settings.batch_size)
            row[f"fid_{v}"] = compute_fid(metric)
        variants[label] = row
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "quality.csv") as tmp:
        pd.concat(frames, ignore_index=True).to_csv(tmp, index=False, float_format="%.6f")
    random_parts = settings.random_parts()
    table = markdown_table(variants, random_parts)
    record = {"variants": variants, "pairs": len(pairs.sources), "image_size": list(size),
              "pairs_file": str(pairs.pairs_file), "poses_file": str(pairs.poses_file),
              "fid_reference": "training images" if fids else None,
              "fid_reference_images": len(pairs.train) if fids else None,
              "generation": dict(generation) if generation else None,
              "random_weights": random_parts, "weights_sha256": _weights_record(settings),
              "protocol": PROTOCOL, "versions": _versions(),
              "sources": {k: str(v) for k, v in predictions.items()}}
    write_json_atomic(out / "quality.json", record)
    head = f"{generation_line(generation)}\n\n" if generation else ""
    write_text_atomic(out / "quality.md", head + table + "\n")
    config = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
              for k, v in dataclasses.asdict(settings).items()}
    write_manifest(out, STEP, config=config, seed=None,
                   sources={"dataset_root": data_root, "pairs_csv": pairs.pairs_file, "poses_csv": pairs.poses_file,
                            **{f"prediction:{k}": v for k, v in predictions.items()}, **(sources_extra or {})},
                   checkpoints=_weights_record(settings),
                   extra={"outputs": {"quality.csv": "one row per variant and pair", "quality.json": "means and FIDs",
                                      "quality.md": "the table"}})
    return record


# --------------------------------------------------------------------------- generation


def _pair_items(pairs: TestPairs, seed: int):
    from reid_aug.posebank import STREAM_NOISE, item_seed
    from reid_aug.synthesis import SynthesisItem, _as_pairs, synthetic_name

    if pairs.source_keypoints is None:
        raise QualityError(f"{pairs.poses_file}: generating needs the source images' poses too (some are missing)")
    items = []
    for src, tgt, k, kp_s, kp_t in zip(pairs.sources, pairs.targets, pair_ks(pairs), pairs.source_keypoints,
                                       pairs.target_keypoints):
        # The noise is drawn per (source, target): a pair gets the same sample whichever other pairs are scored.
        items.append(SynthesisItem(synthetic_name(src, k, ".png"), src, k,
                                   item_seed(seed, STREAM_NOISE, f"{src.name}>{tgt.name}", 0),
                                   tgt.name, _as_pairs(kp_t), _as_pairs(kp_s)))
    return items


def generate_pairs(cfg, pairs: TestPairs, out_root: str | Path, stages: Sequence[str], overwrite: bool = False,
                   progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Run the PCDMs pipeline of ``cfg`` (a :class:`reid_aug.synthesis.SynthesisConfig`) on every pair,
    once per stage setting, into ``out_root/<stages>/`` as PNG named like ``synthesize --strategy file``
    (``<source stem>_synKK.png``) with a ``generated.csv`` mapping; return ``{stages: folder}``.

    Resumable: a folder keeps its images when its manifest has the same config, pairs and
    pipeline weights; another job's folder is refused unless ``overwrite``. Each image depends
    only on (source, k, seed, target pose, settings, batch size), as in ``synthesize``.
    """
    from pcdms.pipeline import STAGES, pipeline_sha256
    from reid_aug.synthesis import (_pcdms_generate, check_pcdms_weights, config_dict, config_differences,
                                    load_pcdms, plan_sha256, resolve_dtype)

    out_root = Path(out_root)
    folder = check_pcdms_weights(cfg)
    items = _pair_items(pairs, cfg.seed)
    plan = plan_sha256(items)
    pipeline_sha = pipeline_sha256(folder)
    jobs = {}
    for st in stages:
        job_cfg = dataclasses.replace(cfg, stages=st)  # B1/B2: refine_strength 1.0 (SynthesisConfig)
        out = out_root / st
        config = json.loads(json.dumps(config_dict(job_cfg), default=str))
        config.pop("device", None)
        config.pop("batch_size", None)  # recorded below, compared: it changes the rounding
        config["dtype"] = resolve_dtype(job_cfg)  # "auto" is bf16 on one machine, float32 on another
        stored = read_manifest(out) if out.is_dir() else None
        want = {"config": config, "plan_sha256": plan, "pipeline_sha256": pipeline_sha, "batch_size": cfg.batch_size}
        if stored is not None and stored.get("step") == GENERATE_STEP:
            diffs = config_differences(stored.get("config", {}), config)
            diffs += [f"{what} differ" for k, what in (("plan_sha256", "the pairs"), ("pipeline_sha256",
                      "the pipeline weights")) if stored.get(k) != want[k]]
            if stored.get("batch_size") != cfg.batch_size:
                diffs.append(f"batch_size: {stored.get('batch_size')!r} -> {cfg.batch_size!r}")
            if diffs and not overwrite:
                raise QualityError(f"{out} holds images of another generation job ({'; '.join(diffs)}); use "
                                   "--overwrite to replace them")
            if diffs:
                for p in out.glob("*.png"):
                    p.unlink()
        elif out.is_dir() and any(out.iterdir()):
            raise QualityError(f"{out} is not empty and was not made by quality --generate; choose another --out")
        jobs[st] = (job_cfg, out, want)
    todo_any = any(not (out / it.name).is_file() for _, out, _ in jobs.values() for it in items)
    pipe = load_pcdms(cfg) if todo_any else None
    for st, (job_cfg, out, want) in jobs.items():
        needs = [n for n, used in zip(("prior", "refine"), STAGES[st]) if used]
        lacking = [n for n in needs if pipe is not None and getattr(pipe, n) is None]
        if lacking:
            raise QualityError(f"{folder}: stages {st} need the {' and '.join(lacking)} stage, which this pipeline "
                               "lacks")
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, GENERATE_STEP, config=want["config"], seed=cfg.seed,
                       sources={"pairs_csv": pairs.pairs_file, "poses_csv": pairs.poses_file, "pipeline": folder},
                       checkpoints={"pipeline": pipeline_sha},
                       extra={k: v for k, v in want.items() if k != "config"})
        todo = [it for it in items if not (out / it.name).is_file()]
        if todo:
            log(f"{out}: generating {len(todo):,} of {len(items):,} images ({st})")
            with tqdm(total=len(items), initial=len(items) - len(todo), desc=f"generate {st}", unit="img",
                      disable=not progress) as bar:
                _pcdms_generate(todo, out, pipe, job_cfg, bar, preview=False)
        with atomic_path(out / MAPPING_CSV) as tmp:
            pd.DataFrame({"from": [it.source.name for it in items], "to": [it.target for it in items],
                          "file": [it.name for it in items]}).to_csv(tmp, index=False)
    return {st: out for st, (_, out, _) in jobs.items()}


@locked_output("out_dir")
def quality_job(data_root: str | Path, out_dir: str | Path, predictions: Mapping[str, str | Path],
                settings: QualitySettings, pairs: TestPairs, generate_cfg=None, stages: Sequence[str] = ("full",),
                overwrite: bool = False, mapping_csv: str | Path | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """``reid-aug quality`` as one job holding the lock on ``out_dir``: with ``generate_cfg`` (a
    :class:`reid_aug.synthesis.SynthesisConfig`) first :func:`generate_pairs` into
    ``OUT/generated/<stages>/`` (scored first, in ``stages`` order), then :func:`run_quality`."""
    check_output_folder(Path(out_dir))
    metrics = load_metrics(settings)  # a missing weight file fails before hours of generation
    extra: dict[str, Any] = {}
    generation = None
    if generate_cfg is not None:
        from reid_aug.synthesis import guidance_text, resolve_dtype

        generation = {"pipeline": str(generate_cfg.pipeline), "stages": list(stages),
                      "scheduler": generate_cfg.scheduler, "num_inference_steps": generate_cfg.num_inference_steps,
                      "guidance_scale": guidance_text(generate_cfg.guidance_scale),
                      "refine_strength": generate_cfg.refine_strength, "seed": generate_cfg.seed,
                      "dtype": resolve_dtype(generate_cfg), "batch_size": generate_cfg.batch_size}
        folders = generate_pairs(generate_cfg, pairs, Path(out_dir) / "generated", stages, overwrite=overwrite,
                                 progress=progress, log=log)
        predictions = {**{st: str(f) for st, f in folders.items()}, **predictions}
        extra["pipeline"] = generate_cfg.pipeline
    return run_quality(data_root, out_dir, predictions, settings, pairs=pairs, mapping_csv=mapping_csv,
                       progress=progress, log=log, sources_extra=extra, metrics=metrics, generation=generation)
