"""On-disk cache of the frozen encoders' outputs, so a training step runs only the trainable network.

PCDMs trains three networks on features of frozen encoders (Sec. 3, App. B):
OpenCLIP image embeddings (prior), DINOv2 tokens (inpaint, refine) and VAE
latents (inpaint, refine). They depend only on the image and the encoder
weights, so each is computed once per image and stored:

- ``clip``: (D,) image embedding of one image;
- ``dino``: (1 + N, d) tokens of one image;
- ``latent``: (C, h, w) VAE latent (posterior mean, scaled) of one image;
- ``masked_latent``: (C, h, 2w) VAE latent of the stage-2 masked canvas
  ``[image | black]`` whose left half is that image: exactly what the pipeline
  encodes for a source (it depends on the source only, so it is exact);
- ``canvas_latent``: (C, h, 2w) VAE latent of a pair's clean canvas
  ``[source | target]`` (:meth:`EncoderCache.get_pairs`), for presets whose
  canvas latent is "joint" (the release's training target).

``[latent(source) | latent(target)]`` is NOT ``VAE([source | target])``: the
encoder's receptive field and its mid-block attention cross the seam.
``canvas_seam_error`` measures the gap (for the toy VAE: 21 % of the latent's
RMS overall, 35 % next to the seam), which is why a preset says which one it
trains on and decodes (``Preset.canvas_latents``) and the trainer never mixes them.

Entries are keyed by the SHA-256 of the image file's bytes, so renamed or
copied images hit and edited ones miss. A cache folder belongs to one set of
encoder weights: ``meta.json`` holds each encoder's weights hash and a cache
made with other weights is refused, naming the encoder. New entries land in
shard files written atomically, so a kill loses at most the shard in progress.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pcdms.encoders import load_image
from pcdms.io import atomic_path, read_json_object, sha256_file, write_json_atomic
from pcdms.pipeline import masked_canvas

KINDS = ("clip", "dino", "latent", "masked_latent", "canvas_latent")
_ENCODER_OF = {"clip": "clip", "dino": "dino", "latent": "vae", "masked_latent": "vae"}
META_NAME = "meta.json"
CACHE_VERSION = 1


class CacheMismatchError(ValueError):
    """A cache folder was made with other encoder weights or image size than the ones given."""


def module_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (sorted names, dtypes, shapes and bytes): its weights' identity."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class EncoderCache:
    """Frozen-encoder outputs per image file, on disk under ``folder``.

    Args:
        folder: cache folder (created); one per set of encoder weights.
        encoders: a :class:`pcdms.encoders.FrozenEncoders`.
        image_size: (H, W) images are resized to before encoding.
        batch_size: images per encoder call when filling the cache.
    """

    def __init__(self, folder: str | os.PathLike, encoders, image_size: tuple[int, int], batch_size: int = 32):
        self.folder = Path(folder)
        self.encoders = encoders
        self.image_size = tuple(int(s) for s in image_size)
        self.batch_size = batch_size
        self.hashes = {name: module_sha256(getattr(encoders, name)) for name in ("clip", "dino", "vae")}
        self._check_meta()
        self._entries: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KINDS}
        self._key_of: dict[Path, str] = {}
        for shard in sorted(self.folder.glob("*.safetensors")):
            kind = shard.name.split("-", 1)[0]
            if kind in self._entries:
                for key, value in load_file(str(shard)).items():
                    self._entries[kind][key] = value

    def _check_meta(self) -> None:
        meta = {"version": CACHE_VERSION, "image_size": list(self.image_size), "weights_sha256": self.hashes}
        path = self.folder / META_NAME
        if path.is_file():
            stored = read_json_object(path)
            if stored.get("version") != CACHE_VERSION or stored.get("image_size") != meta["image_size"]:
                raise CacheMismatchError(f"{path}: cache made for image size {stored.get('image_size')} "
                                         f"(version {stored.get('version')}), not {meta['image_size']}; use a new "
                                         "cache folder")
            old = stored.get("weights_sha256", {})
            bad = [f"{name} ({str(old.get(name))[:12]} cached, {h[:12]} now)" for name, h in self.hashes.items()
                   if old.get(name) != h]
            if bad:
                raise CacheMismatchError(f"{path}: cache made with other encoder weights: {', '.join(bad)}; "
                                         "use a new cache folder (or delete this one)")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, meta)

    def key(self, path: str | os.PathLike) -> str:
        path = Path(path)
        if path not in self._key_of:
            self._key_of[path] = sha256_file(path)
        return self._key_of[path]

    def get(self, kind: str, paths: Sequence[str | os.PathLike], progress: bool = False) -> torch.Tensor:
        """Stacked cached outputs of ``kind`` for ``paths`` (computing and storing the missing ones).

        Returns float32 (B, ...) on CPU. Raises ``ValueError`` for an unknown kind or unreadable image.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown cache kind {kind!r}; choose one of {list(KINDS)}")
        keys = [self.key(p) for p in paths]
        store = self._entries[kind]
        missing = list(dict.fromkeys((k, Path(p)) for k, p in zip(keys, paths) if k not in store))
        if missing:
            self._fill(kind, missing, progress)
        return torch.stack([store[k] for k in keys]).float()

    def get_indexed(self, kind: str, paths: Sequence[str | os.PathLike], progress: bool = False) -> "Indexed":
        """Like :meth:`get`, but each distinct image is stored once: an image that is the source (or
        target) of many pairs costs one row, and rows are gathered per batch."""
        distinct = list(dict.fromkeys(Path(p) for p in paths))
        row = {p: i for i, p in enumerate(distinct)}
        return Indexed(self.get(kind, distinct, progress), torch.tensor([row[Path(p)] for p in paths]))

    def get_pairs(self, sources: Sequence[str | os.PathLike], targets: Sequence[str | os.PathLike],
                  progress: bool = False) -> torch.Tensor:
        """(B, C, h, 2w) cached ``VAE([source | target])`` of each pair (kind ``canvas_latent``)."""
        keys = [f"{self.key(s)}|{self.key(t)}" for s, t in zip(sources, targets)]
        store = self._entries["canvas_latent"]
        missing = list(dict.fromkeys((k, (Path(s), Path(t))) for k, s, t in zip(keys, sources, targets)
                                     if k not in store))
        if missing:
            self._fill("canvas_latent", missing, progress)
        return torch.stack([store[k] for k in keys]).float()

    @torch.no_grad()
    def _fill(self, kind: str, missing: list, progress: bool) -> None:
        encode = self._encoder_fn(kind)
        bar = tqdm(total=len(missing), desc=f"caching {kind}", disable=not progress, leave=False)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            if kind == "canvas_latent":
                images = torch.stack([torch.cat([load_image(s, self.image_size), load_image(t, self.image_size)], -1)
                                      for _, (s, t) in chunk])
            else:
                images = torch.stack([load_image(p, self.image_size) for _, p in chunk])
            out = encode(images).float().cpu()
            new = {k: out[i].contiguous() for i, (k, _) in enumerate(chunk)}
            shard = self.folder / f"{kind}-{hashlib.sha256(''.join(sorted(new)).encode()).hexdigest()[:16]}.safetensors"
            with atomic_path(shard) as tmp:
                save_file(new, str(tmp))
            self._entries[kind].update(new)
            bar.update(len(chunk))
        bar.close()

    def _encoder_fn(self, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
        enc = self.encoders
        device = next(enc.parameters()).device
        dtype = next(enc.vae.parameters()).dtype
        if kind == "clip":
            return lambda x: enc.clip(x.to(device))
        if kind == "dino":
            return lambda x: enc.dino(x.to(device))
        if kind in ("latent", "canvas_latent"):
            return lambda x: enc.vae.encode(x.to(device, dtype))
        return lambda x: enc.vae.encode(masked_canvas(x).to(device, dtype))


class Indexed:
    """Per-item rows without copies: ``table`` (N, ...) of distinct values, ``index`` (M,) row of each item.
    ``x[idx]`` gathers items ``idx``; ``len(x)`` is M."""

    def __init__(self, table: torch.Tensor, index: torch.Tensor):
        self.table, self.index = table, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx) -> torch.Tensor:
        return self.table[self.index[idx]]

    def all(self) -> torch.Tensor:
        """(M, ...) every item's row (materialised)."""
        return self.table[self.index]


@torch.no_grad()
def canvas_seam_error(vae, sources: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """How far ``[VAE(source) | VAE(target)]`` is from ``VAE([source | target])`` (scaled latents).

    Returns ``{"rms_diff": ..., "rms_latent": ..., "rel": rms_diff / rms_latent, "max_abs": ...,
    "seam_rel": rel over the two latent columns next to the seam}``.
    """
    joint = vae.encode(torch.cat([sources, targets], dim=-1))
    split = torch.cat([vae.encode(sources), vae.encode(targets)], dim=-1)
    diff = joint - split
    w = sources.shape[-1] // vae.scale_factor
    seam = diff[..., w - 1:w + 1]
    rms = joint.pow(2).mean().sqrt().item()
    return {"rms_diff": diff.pow(2).mean().sqrt().item(), "rms_latent": rms,
            "rel": diff.pow(2).mean().sqrt().item() / rms, "max_abs": diff.abs().max().item(),
            "seam_rel": seam.pow(2).mean().sqrt().item() / rms}
