"""A procedurally rendered toy dataset laid out exactly like Market-1501.

Market-1501 (Zheng et al., ICCV 2015) cannot be shipped, so tests, benchmarks
and the demo run on this stand-in. It has the same folders, naming
(``PPPP_cCsS_FFFFFF_BB.jpg``), 128x64 JPEGs and protocol quirks (DESIGN.md §6):

- ``bounding_box_train/``: the odd pids; ``query/`` + ``bounding_box_test/``:
  the even pids, so train and test identities are disjoint;
- every identity is seen by >= 2 of the cameras; each camera follows the
  person along one track (one walking direction, consecutive frames), so
  images of one camera look alike and the same-camera gallery removal of
  the Market protocol matters;
- a test identity has one query per camera it is seen in and >= 1 gallery
  image in each of those cameras (so every query has a cross-camera match);
- ``bounding_box_test/`` also holds distractors (pid ``0000``: empty scenes
  and strangers cut by the box) and junk (pid ``-1``: fragments, far-away
  people);
- the community pose files: ``market-annotation-{train,test}.csv`` with the
  exact keypoints of every image (DESIGN.md §4) and ``market-pairs-{train,test}.csv``
  (``from,to`` pairs of one identity).

Every random choice comes from a NumPy generator seeded by ``(seed, stream,
pid[, image index])``: the same seed gives byte-identical files, and adding
identities (``num_ids``) leaves the earlier identities' images unchanged.
The folder is built in ``OUT.tmp`` and renamed to ``OUT`` after the manifest
is written, so a killed run never leaves a folder that looks complete.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pcdms.pose import write_annotation_csv, write_pairs_csv
from reid_aug.data.toy_render import (
    VIEWS,
    Camera,
    Identity,
    PoseParams,
    render_background,
    render_person,
    sample_camera,
    sample_identity,
    sample_pose_params,
)
from reid_aug.manifest import read_manifest, write_manifest

HEIGHT, WIDTH = 128, 64
STEP = "make-toy-market"
TRAIN_DIR, QUERY_DIR, GALLERY_DIR = "bounding_box_train", "query", "bounding_box_test"
ANNOTATION_FILES = {"train": "market-annotation-train.csv", "test": "market-annotation-test.csv"}
PAIRS_FILES = {"train": "market-pairs-train.csv", "test": "market-pairs-test.csv"}
_BUILDING_MARKER = ".toy-market-building"
# Independent random streams, so that e.g. adding distractors does not move identities.
_S_IDENTITY, _S_PLAN, _S_IMAGE, _S_CAMERA, _S_DISTRACTOR, _S_JUNK, _S_PAIRS = range(7)


@dataclass(frozen=True)
class ToyConfig:
    """Size of the toy Market. ``images_per_id``: inclusive range of train images per train
    identity and of gallery images per test identity (queries come on top)."""

    num_ids: int = 100
    images_per_id: tuple[int, ...] = (12, 20)  # (lo, hi); checked below
    num_cameras: int = 6
    distractors_per_id: float = 1.0  # pid 0000 gallery images, per identity
    junk_per_id: float = 0.5  # pid -1 gallery images, per identity
    train_pairs_per_image: int = 4
    test_pairs_per_image: int = 2
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if not 2 <= self.num_ids <= 9998:
            raise ValueError(f"num_ids must be in 2..9998 (4-digit pids, half train half test), got {self.num_ids}")
        if len(self.images_per_id) != 2 or not 2 <= self.images_per_id[0] <= self.images_per_id[1]:
            raise ValueError(f"images_per_id must be (lo, hi) with 2 <= lo <= hi, got {self.images_per_id}")
        if not 2 <= self.num_cameras <= 6:
            raise ValueError(f"num_cameras must be in 2..6 (Market has 6), got {self.num_cameras}")
        if self.distractors_per_id < 0 or self.junk_per_id < 0:
            raise ValueError("distractors_per_id and junk_per_id must be >= 0")
        if self.train_pairs_per_image < 0 or self.test_pairs_per_image < 0:
            raise ValueError("train_pairs_per_image and test_pairs_per_image must be >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class Shot:
    """One image to render: where it goes, its name, and how it is made."""

    folder: str
    name: str
    pid: int
    camid: int  # 1-based, as in the name
    index: int  # image index within its pid (or distractor / junk number): seeds the render
    pose: PoseParams | None  # None: an empty scene


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def camera_for(seed: int, camid: int) -> Camera:
    return sample_camera(_rng(seed, _S_CAMERA, camid), camid)


def identity_for(seed: int, pid: int) -> Identity:
    return sample_identity(_rng(seed, _S_IDENTITY, pid))


def is_train_pid(pid: int) -> bool:
    """Odd pids train, even pids test: interleaved like Market, and stable when num_ids grows."""
    return pid % 2 == 1


def _name(pid: int, camid: int, seq: int, frame: int, bbox: int) -> str:
    head = "-1" if pid < 0 else f"{pid:04d}"
    return f"{head}_c{camid}s{seq}_{frame:06d}_{bbox:02d}.jpg"


def _track_pose(rng: np.random.Generator) -> tuple[PoseParams, float]:
    """The walking direction, gait and box placement of one camera's track, and its phase step."""
    base = sample_pose_params(rng, tuple(VIEWS)[rng.integers(len(VIEWS))])
    return base, float(rng.uniform(0.5, 1.6)) if base.stride > 0 else 0.0


def _frame_pose(base: PoseParams, k: int, step: float, rng: np.random.Generator) -> PoseParams:
    """Frame ``k`` of a track: the gait advances, the box and heading jitter a little."""
    pose = dataclasses.replace(
        base,
        yaw=base.yaw + rng.normal(0, 0.1),
        phase=base.phase + k * step + rng.normal(0, 0.2),
        scale=base.scale + rng.normal(0, 0.015),
        center_x=base.center_x + rng.normal(0, 0.015),
        top=base.top + rng.normal(0, 0.008),
    )
    if rng.random() < 0.06:  # a badly aligned detector box cuts off head or feet
        pose = dataclasses.replace(pose, scale=rng.uniform(1.0, 1.2), top=rng.uniform(-0.12, 0.03))
    return pose


def plan_identity(cfg: ToyConfig, seed: int, pid: int) -> list[Shot]:
    """The cameras, tracks, frames and poses of one identity (train, or query + gallery)."""
    rng = _rng(seed, _S_PLAN, pid)
    lo, hi = cfg.images_per_id
    n_images = int(rng.integers(lo, hi + 1))
    n_cams = int(min(rng.integers(2, cfg.num_cameras + 1), n_images))
    cams = np.sort(rng.choice(cfg.num_cameras, size=n_cams, replace=False)) + 1
    counts = 1 + rng.multinomial(n_images - n_cams, np.full(n_cams, 1.0 / n_cams))
    train = is_train_pid(pid)
    shots: list[Shot] = []
    for cam, count in zip(cams.tolist(), counts.tolist()):
        seq, frame0, gap = int(rng.integers(1, 7)), int(rng.integers(0, 900_000)), int(rng.integers(3, 15))
        base, step = _track_pose(rng)
        n_frames = count if train else count + 1
        query_k = -1 if train else int(rng.integers(n_frames))
        for k in range(n_frames):
            folder = QUERY_DIR if k == query_k else (TRAIN_DIR if train else GALLERY_DIR)
            name = _name(pid, cam, seq, frame0 + k * gap, int(rng.integers(1, 4)))
            shots.append(Shot(folder, name, pid, cam, len(shots), _frame_pose(base, k, step, rng)))
    return shots


def _free_name(names: set[str], pid: int, camid: int, seq: int, frame: int) -> str:
    """A free name: bump the box number on a clash (only distractors / junk can clash)."""
    for bbox in range(1, 100):
        name = _name(pid, camid, seq, frame, bbox)
        if name not in names:
            names.add(name)
            return name
    raise RuntimeError(f"no free box number for pid {pid} c{camid}s{seq} frame {frame}")


def plan_clutter(cfg: ToyConfig, seed: int, pid: int) -> list[Shot]:
    """Distractors (``pid=0``: empty scenes, strangers cut by the box) or junk (``pid=-1``:
    fragments, far-away people), all for the gallery."""
    per_id, stream = (cfg.distractors_per_id, _S_DISTRACTOR) if pid == 0 else (cfg.junk_per_id, _S_JUNK)
    shots, names = [], set()
    for i in range(int(round(per_id * cfg.num_ids))):
        rng = _rng(seed, stream, i)
        cam = int(rng.integers(1, cfg.num_cameras + 1))
        name = _free_name(names, pid, cam, int(rng.integers(1, 7)), int(rng.integers(0, 900_000)))
        pose = None
        if pid == 0 and rng.random() < 0.5:  # a stranger the box cuts badly
            pose = dataclasses.replace(
                sample_pose_params(rng), scale=rng.uniform(1.3, 2.2), top=rng.uniform(-0.9, 0.15),
                center_x=rng.uniform(0.0, 1.0))
        elif pid < 0:
            pose = sample_pose_params(rng)
            if rng.random() < 0.5:  # a fragment
                pose = dataclasses.replace(pose, scale=rng.uniform(2.0, 3.5), top=rng.uniform(-2.2, -0.2),
                                           center_x=rng.uniform(-0.2, 1.2))
            else:  # a far-away person
                pose = dataclasses.replace(pose, scale=rng.uniform(0.3, 0.55), top=rng.uniform(0.05, 0.5),
                                           center_x=rng.uniform(0.2, 0.8))
        shots.append(Shot(GALLERY_DIR, name, pid, cam, i, pose))
    return shots


def render_shot(shot: Shot, seed: int) -> tuple[Image.Image, np.ndarray]:
    """The image and ``(18, 2)`` keypoints of ``shot`` (all -1 for an empty scene)."""
    rng = _rng(seed, _S_IMAGE, shot.pid + 1, shot.index)  # pid + 1: junk (-1) keys must be >= 0
    camera = camera_for(seed, shot.camid)
    if shot.pose is None:
        return render_background(camera, rng, HEIGHT, WIDTH), np.full((18, 2), -1, np.int64)
    ident = identity_for(seed, shot.pid) if shot.pid > 0 else sample_identity(rng)
    bystander_p = 0.12 if shot.pid > 0 else 0.0
    return render_person(ident, shot.pose, camera, rng, HEIGHT, WIDTH, bystander_p=bystander_p)


def plan_dataset(cfg: ToyConfig, seed: int) -> list[Shot]:
    shots = [s for pid in range(1, cfg.num_ids + 1) for s in plan_identity(cfg, seed, pid)]
    return shots + plan_clutter(cfg, seed, 0) + plan_clutter(cfg, seed, -1)


def _pairs(names_by_pid: dict[int, list[str]], per_image: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """For every image, ``per_image`` other images of its identity (fewer if it has fewer)."""
    pairs = []
    for pid in sorted(names_by_pid):
        names = sorted(names_by_pid[pid])
        for src in names:
            others = [n for n in names if n != src]
            for j in rng.permutation(len(others))[:per_image]:
                pairs.append((src, others[j]))
    return pairs


def read_toy_manifest(out: Path) -> dict | None:
    """The manifest of a complete toy Market at ``out``, or None if there is none."""
    data = read_manifest(out)
    return data if data is not None and data.get("step") == STEP else None


def _clear_stale_build(tmp: Path) -> None:
    if not tmp.exists():
        return
    if not (tmp / _BUILDING_MARKER).is_file() and read_toy_manifest(tmp) is None:
        raise FileExistsError(f"{tmp} exists and was not made by {STEP}; remove it or choose another OUT")
    shutil.rmtree(tmp)  # what a killed run left behind: rebuilt from scratch (seconds)


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if read_toy_manifest(out) is not None:
        if not overwrite:
            raise FileExistsError(f"{out} already holds a complete toy Market (manifest.json); use --overwrite")
        return
    if any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists, is not empty and has no {STEP} manifest.json; it is not a toy Market this "
            "command made, so it is left alone: remove it or choose another OUT"
        )


def _render_to(job: tuple[Shot, int, Path, int]) -> np.ndarray:
    """Render one shot to its JPEG file; its keypoints (a worker's share of :func:`generate_toy_market`)."""
    shot, seed, path, quality = job
    img, kp = render_shot(shot, seed)
    img.save(path, quality=quality)
    return kp


def generate_toy_market(
    out: str | Path, config: ToyConfig = ToyConfig(), seed: int = 0, overwrite: bool = False, progress: bool = False,
    workers: int = 1,
) -> Path:
    """Render the toy Market-1501 described in the module docstring into ``out``; return ``out``.

    ``workers`` > 1 renders in that many processes; every image is a function of (seed, shot), so
    the files are the same for any number of workers.

    Raises :class:`FileExistsError` if ``out`` already holds a complete toy Market (unless
    ``overwrite``) or holds anything else; ``ValueError`` for a negative seed or workers < 1.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out).absolute()  # "." has no name to put ".tmp" after
    _check_target(out, overwrite)
    tmp = out.with_name(out.name + ".tmp")
    _clear_stale_build(tmp)
    for sub in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR):
        (tmp / sub).mkdir(parents=True)
    (tmp / _BUILDING_MARKER).touch()

    shots = plan_dataset(config, seed)
    poses: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    by_pid: dict[str, dict[int, list[str]]] = {"train": {}, "test": {}}
    jobs = ((shot, seed, tmp / shot.folder / shot.name, config.jpeg_quality) for shot in shots)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        rendered = pool.map(_render_to, jobs, chunksize=64) if pool else map(_render_to, jobs)
        keypoints = list(tqdm(rendered, total=len(shots), desc="rendering toy Market", unit="img",
                              disable=not progress))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    for shot, kp in zip(shots, keypoints):
        split = "train" if shot.folder == TRAIN_DIR else "test"
        poses[split][shot.name] = kp
        if shot.pid > 0:
            by_pid[split].setdefault(shot.pid, []).append(shot.name)

    rng = _rng(seed, _S_PAIRS)
    for split in ("train", "test"):
        write_annotation_csv(tmp / ANNOTATION_FILES[split], poses[split])
        per_image = config.train_pairs_per_image if split == "train" else config.test_pairs_per_image
        write_pairs_csv(tmp / PAIRS_FILES[split], _pairs(by_pid[split], per_image, rng))

    counts = {
        folder: sum(s.folder == folder for s in shots) for folder in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR)
    }
    counts.update(
        train_ids=sum(1 for p in range(1, config.num_ids + 1) if is_train_pid(p)),
        test_ids=sum(1 for p in range(1, config.num_ids + 1) if not is_train_pid(p)),
        distractors=sum(s.pid == 0 for s in shots),
        junk=sum(s.pid < 0 for s in shots),
    )
    write_manifest(
        tmp, STEP, config=dataclasses.asdict(config), seed=seed,
        extra={"layout": "market1501", "image_size": [HEIGHT, WIDTH], "counts": counts},
    )
    (tmp / _BUILDING_MARKER).unlink()
    _swap_in(tmp, out)
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    """Move the finished build onto ``out``; an old complete toy Market there goes only after."""
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        out.replace(old)  # onto the empty temp dir
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def make_toy_market(
    out: str | Path,
    num_ids: int = 100,
    seed: int = 0,
    images_per_id: tuple[int, int] = (12, 20),
    *,
    overwrite: bool = False,
    progress: bool = False,
    workers: int = 1,
    **options,
) -> Path:
    """Convenience wrapper: ``options`` are the other :class:`ToyConfig` fields."""
    cfg = ToyConfig(num_ids=num_ids, images_per_id=tuple(images_per_id), **options)
    return generate_toy_market(out, cfg, seed=seed, overwrite=overwrite, progress=progress, workers=workers)
