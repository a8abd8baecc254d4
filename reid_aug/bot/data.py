"""Fast BoT data path: decode once into a uint8 tensor, augment whole batches on the device.

Market-1501 crops are tiny (128x64 JPEGs), so a per-image PIL pipeline in
DataLoader workers is the bottleneck of BoT training, not the network. Here
every image is decoded and resized ONCE into ``(N, 3, H, W)`` uint8 (Market
train at 256x128: 1.3 GB), optionally cached on disk as ``.npy`` keyed by the
file list and the size, and each batch is augmented by a few tensor ops on the
device that trains on it.

Training augmentation, as in BoT (Luo et al., CVPRW 2019, Sec. 3) and its
reference code, in this order: random horizontal flip (p 0.5); zero padding by
10 px and a random crop back to H x W; ToTensor + ImageNet normalisation;
random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020,
Alg. 1) with p 0.5, area 2-40 % of the image, aspect ratio uniform in
[0.3, 1/0.3], up to 100 tries per image. As in the reference code the erased
box is filled with the numbers (0.485, 0.456, 0.406) written into the
*normalised* tensor (not the mean colour), and a box that does not fit in 100
tries leaves the image unerased.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pcdms.images import to_rgb8
from pcdms.io import atomic_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CACHE_VERSION = "bot-images-v2"  # v2: 16-bit images scaled, not clipped  # bump when decoding changes, so old caches are not reused
ERASE_TRIES = 100


def _decode(path: Path, size: tuple[int, int]) -> np.ndarray:
    """One image as ``(3, H, W)`` uint8, bilinear resize (PIL's, as torchvision's Resize on PIL)."""
    height, width = size
    try:
        with Image.open(path) as im:
            im = to_rgb8(im, str(path))
            if im.size != (width, height):
                im = im.resize((width, height), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def cache_key(paths: Sequence[str | Path], size: tuple[int, int]) -> str:
    """SHA-256 (hex, 20 chars) of the decoding version, the size and every file's path, byte size
    and modification time: a changed, added, removed or reordered file gives a new key."""
    h = hashlib.sha256(f"{_CACHE_VERSION}|{size[0]}x{size[1]}|{len(paths)}".encode())
    for p in paths:
        p = Path(p)
        try:
            st = p.stat()
        except OSError:
            raise FileNotFoundError(f"image not found: {p}") from None
        h.update(f"\n{p.absolute()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def load_images(
    paths: Sequence[str | Path],
    size: tuple[int, int] = (256, 128),
    cache_dir: str | Path | None = None,
    num_workers: int = 4,
    progress: bool = True,
) -> torch.Tensor:
    """Decode ``paths`` into one ``(N, 3, H, W)`` uint8 tensor at ``size = (H, W)``.

    With ``cache_dir``, the tensor is kept in ``cache_dir/images-<key>-HxW.npy`` (see
    :func:`cache_key`), written atomically; a later call with the same files loads it
    instead of decoding. ``num_workers`` threads decode in parallel (PIL releases the GIL).
    """
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive (H, W), got {size}")
    if not paths:
        raise ValueError("no images to load")
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"images-{cache_key(paths, (height, width))}-{height}x{width}.npy"
        if cache_file.is_file():
            try:
                array = np.load(cache_file)
            except (OSError, ValueError):
                array = None  # a damaged cache is rebuilt below
            if array is not None and array.shape == (len(paths), 3, height, width) and array.dtype == np.uint8:
                return torch.from_numpy(array)
    out = np.empty((len(paths), 3, height, width), dtype=np.uint8)
    bar = tqdm(total=len(paths), desc=f"decoding images at {height}x{width}", unit="img", disable=not progress, leave=False)
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for i, arr in enumerate(pool.map(lambda p: _decode(Path(p), (height, width)), paths)):
            out[i] = arr
            bar.update()
    bar.close()
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            np.save(tmp, out)
    return torch.from_numpy(out)


def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 -> float32 ``(x / 255 - mean) / std`` (ImageNet statistics), test time."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    mean, std = _stats(images.device)
    return (images.float().div_(255.0) - mean) / std


def _crop_params(b: int, padding: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    return oy, ox


def _erase_params(
    b: int, height: int, width: int, area: tuple[float, float], ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """Per image: (found, top, left, h, w) of Zhong et al.'s box, first fitting try of ``ERASE_TRIES``."""
    target = torch.empty(b, ERASE_TRIES, dtype=torch.float64).uniform_(area[0], area[1], generator=generator)
    target *= height * width
    aspect = torch.empty(b, ERASE_TRIES, dtype=torch.float64).uniform_(ratio, 1.0 / ratio, generator=generator)
    hs = torch.round(torch.sqrt(target * aspect)).long()
    ws = torch.round(torch.sqrt(target / aspect)).long()
    fits = (hs < height) & (ws < width)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    h, w = hs.gather(1, first)[:, 0], ws.gather(1, first)[:, 0]
    found = fits.any(1)
    u = torch.rand(b, 2, generator=generator, dtype=torch.float64)
    top = (u[:, 0] * (height - h + 1)).long().clamp_(max=height - 1)
    left = (u[:, 1] * (width - w + 1)).long().clamp_(max=width - 1)
    return found, top, left, h, w


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    flip_prob: float = 0.5,
    padding: int = 10,
    erase_prob: float = 0.5,
    erase_area: tuple[float, float] = (0.02, 0.4),
    erase_ratio: float = 0.3,
    erase_fill: tuple[float, float, float] = IMAGENET_MEAN,
) -> torch.Tensor:
    """BoT's training augmentation of a uint8 batch ``(B, 3, H, W)`` -> normalised float32 ``(B, 3, H, W)``.

    Runs on ``images.device``. Every random number is drawn from the CPU ``generator``
    in a fixed order, so a batch is augmented identically on CPU and GPU.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    b, c, height, width = images.shape
    dev = images.device
    flip = torch.rand(b, generator=generator) < flip_prob
    oy, ox = _crop_params(b, padding, generator)
    erase = torch.rand(b, generator=generator) < erase_prob
    found, top, left, eh, ew = _erase_params(b, height, width, erase_area, erase_ratio, generator)

    x = torch.where(flip.to(dev)[:, None, None, None], images.flip(-1), images)
    if padding > 0:
        # Crop window (oy, ox) of the zero-padded image, read straight from the unpadded one.
        rows = oy.to(dev)[:, None] - padding + torch.arange(height, device=dev)  # (B, H)
        cols = ox.to(dev)[:, None] - padding + torch.arange(width, device=dev)  # (B, W)
        inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        flat = rows.clamp(0, height - 1)[:, :, None] * width + cols.clamp(0, width - 1)[:, None, :]  # (B, H, W)
        x = x.reshape(b, c, height * width).gather(2, flat.reshape(b, 1, -1).expand(b, c, -1))
        x = x.view(b, c, height, width) * inside[:, None].to(x.dtype)
    x = normalize(x)
    if erase_prob > 0:
        top, left, eh, ew = (t.to(dev)[:, None] for t in (top, left, eh, ew))
        r = torch.arange(height, device=dev)[None, :]
        q = torch.arange(width, device=dev)[None, :]
        in_rows = (r >= top) & (r < top + eh)  # (B, H)
        in_cols = (q >= left) & (q < left + ew)  # (B, W)
        box = in_rows[:, :, None] & in_cols[:, None, :] & (erase & found).to(dev)[:, None, None]
        fill = torch.tensor(erase_fill, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
        x = torch.where(box[:, None], fill, x)
    return x


def default_num_workers() -> int:
    """Decoding threads: the CPUs this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))
