"""Read re-ID datasets laid out like Market-1501 (and DukeMTMC-reID, MSMT17).

Market-1501 (Zheng et al., ICCV 2015) keeps three folders under its root:
``bounding_box_train/`` (751 ids, 12,936 images), ``query/`` (3,368) and
``bounding_box_test/`` (the gallery, 15,913 after dropping junk). Every image
name encodes its labels: ``PPPP_cCsS_FFFFFF_BB.jpg`` is person ``PPPP`` seen by
camera ``C`` (sequence ``S``, frame ``F``, box ``B``). Person id ``-1`` marks
junk boxes (dropped everywhere, as in the official protocol) and ``0`` marks
distractors (kept in the gallery, never allowed in train or query).
DukeMTMC-reID uses the same folders and ``PPPP_cC_fFFFFFFF.jpg`` names.
MSMT17 lists ``path pid`` lines in ``list_{train,query,gallery}.txt``.

Conventions follow torchreid: ``camid`` is 0-based (``c1`` -> 0); training
labels are the train pids relabelled to ``0..N-1`` in sorted pid order;
query/gallery labels are the original pids. Records are sorted by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image
from tqdm.auto import tqdm

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MARKET_SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
#: Folder names that :func:`read_reid_dataset` also looks for under the given root: the archives'
#: own names, and where torchreid (``market1501/Market-1501-v15.09.15``, ``dukemtmc-reid/...``,
#: ``msmt17/...``) and fast-reid (the archive names under ``datasets/``) keep them.
KNOWN_SUBFOLDERS = (
    "Market-1501-v15.09.15",
    "Market-1501",
    "market1501",
    "market1501/Market-1501-v15.09.15",
    "DukeMTMC-reID",
    "dukemtmc-reid/DukeMTMC-reID",
    "MSMT17_V1",
    "MSMT17_V2",
    "msmt17/MSMT17_V1",
    "msmt17/MSMT17_V2",
)
JUNK_PID = -1
DISTRACTOR_PID = 0

# pid (may be -1), then "_c" and the 1-based camera number; the rest of the name is free
# so that synthetic images (which append a suffix to a Market name) parse too.
_NAME_RE = re.compile(r"^(-?\d+)_c(\d+)(?!\d)")
_DUKE_RE = re.compile(r"^-?\d+_c\d+_f\d+")


class DatasetError(ValueError):
    """A dataset folder, file name, list file or image is missing or malformed."""


@dataclass(frozen=True)
class ImageRecord:
    """One image: ``pid`` is the original person id, ``camid`` 0-based, ``label`` the class index."""

    path: Path  # absolute path of the image file
    name: str  # file name, e.g. "0002_c1s1_000451_03.jpg"
    pid: int  # original person id from the name (0 = distractor)
    camid: int  # 0-based camera index (c1 -> 0), torchreid convention
    label: int  # train: relabelled 0..N-1 (sorted by pid); query/gallery: = pid


@dataclass(frozen=True)
class ReidDataset:
    """The three splits of a re-ID dataset, each sorted by name."""

    root: Path  # the folder holding bounding_box_train/ etc.
    train: tuple[ImageRecord, ...]
    query: tuple[ImageRecord, ...]
    gallery: tuple[ImageRecord, ...]
    num_train_pids: int
    num_cams: int  # max camid + 1 over all splits
    layout: str  # "market1501" | "dukemtmc" | "msmt17"

    @property
    def ids_shared_across_splits(self) -> bool:
        """Identity rules of the layout. Market-1501 and DukeMTMC-reID number every person once
        across the splits (-1 junk, 0 distractor, train and test ids disjoint by value), so a
        training pid that is also a query/gallery pid is a test person. MSMT17's list files
        number train and test persons separately from 0 (train pid 5 is not test pid 5, and
        pid 0 is a real person): the ids say nothing across splits."""
        return self.layout != "msmt17"


def parse_market_name(name: str) -> tuple[int, int]:
    """``"0002_c1s1_000451_03.jpg"`` -> ``(2, 0)``: (pid, 0-based camid). Also Duke names."""
    m = _NAME_RE.match(name)
    if m is None:
        raise DatasetError(
            f"cannot parse image name {name!r}: expected Market-1501 naming "
            "'PPPP_cCsS_FFFFFF_BB.jpg' (or DukeMTMC 'PPPP_cC_fFFFFFFF.jpg')"
        )
    pid, cam = int(m.group(1)), int(m.group(2))
    if pid < JUNK_PID:
        raise DatasetError(f"image name {name!r}: person id {pid} is negative (only -1 = junk is allowed)")
    if cam < 1:
        raise DatasetError(f"image name {name!r}: camera numbers start at c1, got c{cam}")
    return pid, cam - 1


# Pictures reid-aug writes beside the images of a folder that are not images of people (synthesis previews).
NOT_DATASET_IMAGES = frozenset({"preview.png", "canonical-poses.png"})


def is_image_file(path: Path) -> bool:
    """A dataset image: an image suffix, not hidden, not one of :data:`NOT_DATASET_IMAGES`."""
    # Hidden files: macOS "._x.jpg" forks and the ".x.tmp.*" files of an interrupted atomic write.
    return (path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
            and path.name not in NOT_DATASET_IMAGES)


def _relabel(records: list[ImageRecord]) -> list[ImageRecord]:
    pid2label = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [ImageRecord(r.path, r.name, r.pid, r.camid, pid2label[r.pid]) for r in records]


def read_image_folder(folder: str | Path, relabel: bool, keep_distractors: bool) -> list[ImageRecord]:
    """Every Market-named image directly in ``folder``, sorted by name; junk (pid -1) dropped.

    ``relabel``: labels become ``0..N-1`` in sorted pid order (training), else ``label = pid``.
    ``keep_distractors``: pid 0 is allowed (gallery); otherwise a distractor is an error, since
    a distractor in train or query means the folders are mixed up. Non-image files
    (``Thumbs.db``, hidden files, sub-folders) are ignored. Also reads synthetic folders.
    """
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    records = []
    for path in sorted(p for p in folder.iterdir() if is_image_file(p)):
        try:
            pid, camid = parse_market_name(path.name)
        except DatasetError as exc:
            raise DatasetError(f"{path}: {exc}") from None
        if pid == JUNK_PID:
            continue
        if pid == DISTRACTOR_PID and not keep_distractors:
            raise DatasetError(
                f"{path}: distractor image (person id 0) in a folder that must hold only real "
                "identities; distractors belong in bounding_box_test/"
            )
        records.append(ImageRecord(path, path.name, pid, camid, pid))
    if not records:
        raise DatasetError(f"no usable images in {folder} (need Market-named .jpg/.png files, junk -1 excluded)")
    return _relabel(records) if relabel else records


def read_synthetic_folder(folder: str | Path) -> list[ImageRecord]:
    """The images of a synthesis (or identity-filter) folder, labels = pids, sorted by name.

    Pid 0 is kept: it is a real training person of MSMT17 (whose synthetic images are named
    ``0000_c...``). Whether each pid is one of the real training identities is checked where
    they meet (BoT training, ``check_synthetic_folder``), never assumed here.
    """
    return read_image_folder(folder, relabel=False, keep_distractors=True)


def _num_cams(*splits: Sequence[ImageRecord]) -> int:
    return 1 + max(r.camid for split in splits for r in split)


def _dataset(root: Path, train, query, gallery, layout: str) -> ReidDataset:
    return ReidDataset(
        root=root,
        train=tuple(train),
        query=tuple(query),
        gallery=tuple(gallery),
        num_train_pids=len({r.pid for r in train}),
        num_cams=_num_cams(train, query, gallery),
        layout=layout,
    )


def _market_layout(train: Sequence[ImageRecord]) -> str:
    return "dukemtmc" if _DUKE_RE.match(train[0].name) else "market1501"


def _find_root(root: Path, marker: Iterable[str]) -> Path | None:
    """``root`` or a known sub-folder of it that contains any of ``marker``."""
    for cand in (root, *(root / sub for sub in KNOWN_SUBFOLDERS)):
        if any((cand / m).exists() for m in marker):
            return cand
    return None


def read_market(root: str | Path) -> ReidDataset:
    """Read a Market-1501 (or DukeMTMC-reID) folder, or a parent holding ``Market-1501-v15.09.15/``."""
    given = Path(root).absolute()
    if not given.is_dir():
        raise DatasetError(f"dataset root not found: {given}")
    base = _find_root(given, MARKET_SPLITS.values()) or given
    missing = [f"{d}/" for d in MARKET_SPLITS.values() if not (base / d).is_dir()]
    if missing:
        raise DatasetError(
            f"{base}: missing folder(s) {', '.join(missing)}; a Market-1501 root holds "
            "bounding_box_train/, bounding_box_test/ and query/"
        )
    train = read_image_folder(base / MARKET_SPLITS["train"], relabel=True, keep_distractors=False)
    query = read_image_folder(base / MARKET_SPLITS["query"], relabel=False, keep_distractors=False)
    gallery = read_image_folder(base / MARKET_SPLITS["gallery"], relabel=False, keep_distractors=True)
    return _dataset(base, train, query, gallery, _market_layout(train))


# MSMT17: list file -> image folder (V1 names, then V2 names).
_MSMT_LISTS = {
    "train": ("list_train.txt", ("train", "mask_train_v2")),
    "query": ("list_query.txt", ("test", "mask_test_v2")),
    "gallery": ("list_gallery.txt", ("test", "mask_test_v2")),
}


def _read_msmt_list(base: Path, split: str) -> list[ImageRecord]:
    list_name, dirs = _MSMT_LISTS[split]
    list_path = base / list_name
    if not list_path.is_file():
        raise DatasetError(f"{base}: missing {list_name} (MSMT17 layout)")
    img_dir = next((base / d for d in dirs if (base / d).is_dir()), None)
    if img_dir is None:
        raise DatasetError(f"{base}: missing image folder {' or '.join(d + '/' for d in dirs)} (MSMT17 layout)")
    records, seen = [], {}
    for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            rel, pid = parts[0], int(parts[1])
            # Names are PPPP_III_CC_...: the third field is the 1-based camera.
            camid = int(Path(rel).name.split("_")[2]) - 1
        except (IndexError, ValueError):
            raise DatasetError(f"{list_path}:{lineno}: expected 'PPPP/PPPP_III_CC_....jpg PID', got {line!r}") from None
        path = img_dir / rel
        if not path.is_file():
            raise DatasetError(f"{list_path}:{lineno}: image not found: {path}")
        if path.name in seen:
            raise DatasetError(f"{list_path}:{lineno}: image name {path.name} repeats line {seen[path.name]}")
        seen[path.name] = lineno
        records.append(ImageRecord(path, path.name, pid, camid, pid))
    if not records:
        raise DatasetError(f"{list_path}: lists no images")
    return sorted(records, key=lambda r: r.name)


def read_msmt17(root: str | Path) -> ReidDataset:
    """Read MSMT17 (V1 or V2) from its list files; train is ``list_train.txt`` only (no val)."""
    given = Path(root).absolute()
    base = _find_root(given, ("list_train.txt",))
    if base is None:
        raise DatasetError(f"{given}: no list_train.txt here or in {', '.join(k for k in KNOWN_SUBFOLDERS if 'msmt' in k.lower())}")
    train = _relabel(_read_msmt_list(base, "train"))
    query = _read_msmt_list(base, "query")
    gallery = _read_msmt_list(base, "gallery")
    return _dataset(base, train, query, gallery, "msmt17")


def read_reid_dataset(root: str | Path) -> ReidDataset:
    """Detect the layout under ``root`` (Market-1501 / DukeMTMC-reID folders, or MSMT17 lists) and read it."""
    given = Path(root).absolute()
    if not given.is_dir():
        raise DatasetError(f"dataset root not found: {given}")
    market_base = _find_root(given, MARKET_SPLITS.values())
    msmt_base = _find_root(given, ("list_train.txt",))
    if market_base is not None:
        return read_market(market_base)
    if msmt_base is not None:
        return read_msmt17(msmt_base)
    raise DatasetError(
        f"{given}: not a re-ID dataset root; expected bounding_box_train/, bounding_box_test/ and "
        f"query/ (Market-1501, DukeMTMC-reID) or list_train.txt (MSMT17), here or in one of "
        f"{', '.join(KNOWN_SUBFOLDERS)}"
    )


def records_summary(records: Sequence[ImageRecord]) -> dict[str, int]:
    """``{"num_images", "num_pids", "num_cams"}``; distractors (pid 0) count as one pid, as in torchreid."""
    return {
        "num_images": len(records),
        "num_pids": len({r.pid for r in records}),
        "num_cams": len({r.camid for r in records}),
    }


def check_images_readable(records: Sequence[ImageRecord], progress: bool = True) -> None:
    """Decode every image with PIL; raise :class:`DatasetError` naming the first unreadable file."""
    for r in tqdm(records, desc="checking images", unit="img", disable=not progress, leave=False):
        try:
            with Image.open(r.path) as im:
                im.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # what PIL raises on bad files
            raise DatasetError(f"unreadable image {r.path}: {exc}") from None
        if im.width == 0 or im.height == 0:
            raise DatasetError(f"empty image {r.path} ({im.width}x{im.height})")
