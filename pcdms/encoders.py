"""Frozen image encoders of PCDMs: OpenCLIP ViT-H/14, DINOv2-G/14 and the SD 2.1-base VAE.

Shen et al., ICLR 2024, Sec. 3.2-3.4 and App. B: the prior predicts the target's
OpenCLIP ViT-H/14 image embedding from the source one; the inpainting and
refining UNets read DINOv2-G/14 tokens of the source image through a trainable
MLP; both UNets work in the latent space of the Stable Diffusion 2.1-base VAE.

Every encoder takes images as float tensors ``(B, 3, H, W)`` in ``[0, 1]`` and
does its own documented preprocessing. Each one builds with random weights from
its config (tests, benchmarks) or loads from a local path; nothing is ever
downloaded. Random weights take the real architectures when the preset's
encoder dims are the pretrained ones (1024 CLIP, 1536 DINOv2), so benchmarks
measure the real cost, and tiny CPU-sized ones otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MODEL_NAME = "ViT-H-14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CLIP_SOURCE = (
    "OpenCLIP ViT-H-14 laion2b_s32b_b79k weights: open_clip_pytorch_model.bin (or open_clip_model.safetensors) "
    "from the Hugging Face repo laion/CLIP-ViT-H-14-laion2B-s32B-b79K; pass --clip-checkpoint PATH"
)
DINO_SOURCE = (
    "DINOv2-G/14 transformers folder (config.json + model.safetensors) from the Hugging Face repo "
    "facebook/dinov2-giant; pass --dino-checkpoint FOLDER"
)
VAE_SOURCE = (
    "Stable Diffusion 2.1-base diffusers folder with vae/config.json + vae/diffusion_pytorch_model.safetensors "
    "(Hugging Face repo stabilityai/stable-diffusion-2-1-base), or a bare VAE folder; pass --vae-checkpoint FOLDER"
)

# facebook/dinov2-giant config.json (the fields that shape the network).
DINOV2_GIANT = dict(
    hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, patch_size=14,
    image_size=518, layerscale_value=1.0, use_swiglu_ffn=True, layer_norm_eps=1e-6, qkv_bias=True,
)
# stabilityai/stable-diffusion-2-1-base vae/config.json.
SD21_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", sample_size=768, scaling_factor=0.18215,
)


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained encoder was asked for but its local file/folder is missing."""


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise ``ValueError`` unless ``images`` is a float ``(B, 3, H, W)`` batch in ``[0, 1]``."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} must be a float tensor (B, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [0, 1], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"{name} must lie in [0, 1], got range [{images.min().item():.3f}, {images.max().item():.3f}]"
        )


def load_image_uint8(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 RGB of an image file, resized (bicubic) to ``size`` = (H, W) if it differs.

    Keypoints are not touched: the community annotation format defines them on the 128x64 frame.
    Raises ``ValueError`` naming the file when it cannot be read as an image.
    """
    import numpy as np
    from PIL import Image

    from pcdms.images import to_rgb8

    try:
        with Image.open(path) as im:
            im = to_rgb8(im, str(path))
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_image(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float in [0, 1]: :func:`load_image_uint8` / 255, the input every encoder here takes."""
    return load_image_uint8(path, size).float() / 255.0


def _normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = images.new_tensor(mean).view(1, 3, 1, 1)
    std_t = images.new_tensor(std).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0, 1).to(images.dtype)


def pad_to_square(images: torch.Tensor, fill: tuple[float, float, float]) -> torch.Tensor:
    """Centre ``(B, 3, H, W)`` images on a square ``(B, 3, S, S)`` canvas, ``S = max(H, W)``, filled with ``fill``."""
    b, c, h, w = images.shape
    side = max(h, w)
    canvas = images.new_tensor(fill).view(1, 3, 1, 1).expand(b, c, side, side).clone()
    top, left = (side - h) // 2, (side - w) // 2
    canvas[:, :, top : top + h, left : left + w] = images
    return canvas


def clip_preprocess(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """OpenCLIP input: ``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, S, S)`` CLIP-normalised, ``S = image_size``.

    A 128x64 pedestrian centre-cropped to a square (CLIP's own transform) would
    lose head and feet, so the image is padded to a square with the CLIP mean
    colour (which normalises to 0) and then resized (bicubic, antialiased): the
    encoder sees the whole person.
    """
    check_images(images)
    square = pad_to_square(images, CLIP_MEAN)
    return _normalize(_resize(square, (image_size, image_size)), CLIP_MEAN, CLIP_STD)


def dino_input_size(height: int, width: int, long_side: int, patch_size: int) -> tuple[int, int]:
    """Keep the aspect ratio: longer side -> ``long_side``, each side rounded to a multiple of ``patch_size``."""
    scale = long_side / max(height, width)
    return tuple(max(patch_size, round(s * scale / patch_size) * patch_size) for s in (height, width))


def dino_preprocess(images: torch.Tensor, long_side: int, patch_size: int) -> torch.Tensor:
    """DINOv2 input: ``(B, 3, H, W)`` in [0, 1] -> ImageNet-normalised ``(B, 3, H', W')``.

    Aspect-preserving resize (128x64 -> 224x112 for ``long_side=224``) instead of
    the square centre crop, so every patch token sees the person and none is
    wasted on padding; DINOv2 interpolates its position embeddings to any grid.
    """
    check_images(images)
    size = dino_input_size(images.shape[-2], images.shape[-1], long_side, patch_size)
    return _normalize(_resize(images, size), IMAGENET_MEAN, IMAGENET_STD)


def _is_full_size(clip_embed_dim: int, dino_dim: int) -> bool:
    return clip_embed_dim == 1024 and dino_dim == DINOV2_GIANT["hidden_size"]


def clip_config(clip_embed_dim: int, full_size: bool, image_size: int = 56) -> dict:
    """open_clip model config ``{"embed_dim", "vision_cfg"}``: ViT-H/14, or a 2-layer stand-in ViT
    (width 32 or 64, patch 14) taking ``image_size`` square inputs."""
    if full_size:
        import open_clip

        cfg = open_clip.get_model_config(CLIP_MODEL_NAME)
        return {"embed_dim": cfg["embed_dim"], "vision_cfg": cfg["vision_cfg"]}
    width = 32 if image_size <= 56 else 64
    vision = dict(image_size=image_size, patch_size=14, width=width, layers=2, head_width=16, mlp_ratio=2.0)
    return {"embed_dim": clip_embed_dim, "vision_cfg": vision}


def dino_config(dino_dim: int, full_size: bool, image_size: int = 56):
    """``Dinov2Config``: DINOv2-giant, or a 2-layer stand-in of width ``dino_dim`` whose long input
    side is ``image_size`` pixels."""
    from transformers import Dinov2Config

    if full_size:
        return Dinov2Config(**DINOV2_GIANT)
    heads = 2 if dino_dim % 2 == 0 else 1
    return Dinov2Config(
        hidden_size=dino_dim, num_hidden_layers=2, num_attention_heads=heads, mlp_ratio=2, patch_size=14,
        image_size=image_size,
    )


def dino_long_side(config) -> int:
    """Pixels of the long input side a DINOv2 of ``config`` is fed by default: 224 like the release, or
    a stand-in's smaller ``image_size`` (tiny configs train at 56 px)."""
    return min(224, int(config.image_size))


def dino_token_shape(preset) -> tuple[int, int]:
    """``(1 + N, hidden)`` of the DINOv2 tokens that the encoders built for ``preset`` give for one
    image of ``preset.image_size`` (pretrained DINOv2-G or the preset's stand-in): its config only,
    no weights built."""
    config = stand_in_configs(preset)["dino"]
    dh, dw = dino_input_size(*preset.image_size, dino_long_side(config), int(config.patch_size))
    return 1 + (dh // config.patch_size) * (dw // config.patch_size), int(config.hidden_size)


def vae_config(latent_channels: int, scale_factor: int, full_size: bool,
               block_out_channels: tuple[int, ...] | None = None) -> dict:
    """``AutoencoderKL`` config: SD 2.1-base, or a small one with the same downsampling ``scale_factor``
    (``block_out_channels`` one width per level; default 8, 16, 16, ...)."""
    if full_size:
        return dict(SD21_VAE)
    levels = int(round(math.log2(scale_factor))) + 1
    if 2 ** (levels - 1) != scale_factor:
        raise ValueError(f"vae_scale_factor must be a power of two, got {scale_factor}")
    channels = tuple(block_out_channels) if block_out_channels else (8,) + (16,) * (levels - 1)
    if len(channels) != levels:
        raise ValueError(f"VAE block_out_channels {channels} must have {levels} entries for scale factor {scale_factor}")
    return dict(
        in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1,
        norm_num_groups=min(32, channels[0]) if channels[0] % 8 == 0 else 1,
        block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, act_fn="silu", sample_size=128, scaling_factor=0.18215,
    )


def stand_in_configs(preset) -> dict:
    """The three encoder configs for ``preset`` without pretrained weights: the real architectures
    when the preset's dims are the pretrained ones, else its stand-in sizes."""
    full = _is_full_size(preset.clip_embed_dim, preset.dino_dim)
    return {
        "clip": clip_config(preset.clip_embed_dim, full, getattr(preset, "stand_in_clip_size", 56)),
        "dino": dino_config(preset.dino_dim, full, getattr(preset, "stand_in_dino_size", 56)),
        "vae": vae_config(preset.latent_channels, preset.vae_scale_factor, full,
                          getattr(preset, "stand_in_vae_channels", None)),
    }


class ClipImageEncoder(nn.Module):
    """OpenCLIP vision tower returning the projected ``image_embeds`` ``(B, embed_dim)``, not normalised.

    The projected embedding is what an unCLIP-style prior predicts (Sec. 3.2).
    Only the vision tower is built; the text tower is never needed.
    """

    def __init__(self, config: dict):
        super().__init__()
        from open_clip.model import _build_vision_tower

        self.config = config
        self.visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"])
        self.image_size = int(config["vision_cfg"]["image_size"])
        self.embed_dim = int(config["embed_dim"])

    @classmethod
    def from_pretrained(cls, path: str | Path, config: dict | None = None) -> "ClipImageEncoder":
        """Load the vision tower from a full OpenCLIP checkpoint file (or a folder holding one).

        ``config`` is the open_clip model config; default: the folder's ``open_clip_config.json``
        (``{"model_cfg": ...}``, as open_clip's Hugging Face folders and :meth:`save_pretrained`
        write it) if there is one, else ViT-H-14 (PCDMs' encoder).
        """
        file = _find_clip_file(path)
        cfg_file = file.parent / CLIP_CONFIG_NAME
        if config is None and cfg_file.is_file():
            config = _read_clip_config(cfg_file)
        model = cls(config or clip_config(1024, full_size=True))
        state = _load_visual_state(file)
        if not state:
            raise ValueError(f"{file}: no 'visual.*' weights; expected an OpenCLIP ViT-H-14 checkpoint ({CLIP_SOURCE})")
        try:
            model.visual.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{file}: weights do not fit the OpenCLIP vision tower ({str(err)[:300]} ...); "
                             f"expected {CLIP_SOURCE}") from None
        return model

    def save_pretrained(self, folder: str | Path) -> Path:
        """``folder/open_clip_model.safetensors`` (``visual.*`` keys) + ``open_clip_config.json``."""
        from safetensors.torch import save_file

        from pcdms.io import atomic_path, write_json_atomic

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {f"visual.{k}": v.detach().cpu().contiguous() for k, v in self.visual.state_dict().items()}
        with atomic_path(folder / "open_clip_model.safetensors") as tmp:
            save_file(state, str(tmp))
        write_json_atomic(folder / CLIP_CONFIG_NAME, {"model_cfg": self.config})
        return folder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W) in [0, 1] -> ``image_embeds`` (B, embed_dim)."""
        pixels = clip_preprocess(images, self.image_size).to(next(self.parameters()).dtype)
        return self.visual(pixels)


CLIP_CONFIG_NAME = "open_clip_config.json"


def _read_clip_config(path: Path) -> dict:
    from pcdms.io import read_json_object

    cfg = read_json_object(path).get("model_cfg")
    if not isinstance(cfg, dict) or "embed_dim" not in cfg or "vision_cfg" not in cfg:
        raise ValueError(f"{path}: no 'model_cfg' with 'embed_dim' and 'vision_cfg'")
    return {"embed_dim": cfg["embed_dim"], "vision_cfg": cfg["vision_cfg"]}


def _find_clip_file(path) -> Path:
    if path is None:
        raise WeightsNotFoundError(f"No CLIP checkpoint given. Needed: {CLIP_SOURCE}")
    path = Path(path)
    if path.is_dir():
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise WeightsNotFoundError(
            f"{path}: folder holds no open_clip_model.safetensors / open_clip_pytorch_model.bin. Needed: {CLIP_SOURCE}")
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: file not found. Needed: {CLIP_SOURCE}")
    return path


def _load_visual_state(file: Path) -> dict[str, torch.Tensor]:
    """The ``visual.*`` tensors of a full OpenCLIP checkpoint, prefix stripped; text weights stay on disk."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            return {k[len("visual."):]: f.get_tensor(k) for k in f.keys() if k.startswith("visual.")}
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}


class DinoEncoder(nn.Module):
    """DINOv2 ``last_hidden_state`` tokens ``(B, 1 + N, hidden)``, CLS first, N = patch grid of the input."""

    def __init__(self, model: nn.Module, long_side: int = 224):
        super().__init__()
        self.model = model
        self.long_side = long_side
        self.patch_size = int(model.config.patch_size)
        self.hidden_size = int(model.config.hidden_size)

    @classmethod
    def from_config(cls, config, long_side: int | None = None) -> "DinoEncoder":
        from transformers import Dinov2Model

        return cls(Dinov2Model(config), long_side or dino_long_side(config))

    @classmethod
    def from_pretrained(cls, folder: str | Path | None, long_side: int | None = None) -> "DinoEncoder":
        """Load a transformers DINOv2 folder; ``long_side`` defaults to 224 (the release) or the
        config's smaller ``image_size`` (stand-ins)."""
        from transformers import Dinov2Model

        if folder is None:
            raise WeightsNotFoundError(f"No DINOv2 folder given. Needed: {DINO_SOURCE}")
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise WeightsNotFoundError(f"{folder}: no config.json (not a transformers folder). Needed: {DINO_SOURCE}")
        model = Dinov2Model.from_pretrained(str(folder), local_files_only=True)
        return cls(model, long_side or dino_long_side(model.config))

    def save_pretrained(self, folder: str | Path) -> Path:
        """A transformers folder (``config.json`` + ``model.safetensors``)."""
        self.model.save_pretrained(str(folder), safe_serialization=True)
        return Path(folder)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W) in [0, 1] -> tokens (B, 1 + N, hidden)."""
        pixels = dino_preprocess(images, self.long_side, self.patch_size).to(next(self.parameters()).dtype)
        return self.model(pixel_values=pixels).last_hidden_state


class VaeCodec(nn.Module):
    """Latent codec around diffusers ``AutoencoderKL`` (images in [0, 1] <-> scaled latents).

    ``encode`` returns ``scaling_factor * z`` with ``z`` the posterior mean by
    default (deterministic conditions); pass ``sample=True`` and a generator to
    draw from the posterior instead (training targets). ``decode`` undoes the
    scaling and returns images clamped to [0, 1].
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    @classmethod
    def from_config(cls, config: dict) -> "VaeCodec":
        from diffusers import AutoencoderKL

        return cls(AutoencoderKL(**config))

    @classmethod
    def from_pretrained(cls, folder: str | Path | None) -> "VaeCodec":
        """Load from an SD folder (``vae/`` subfolder) or a bare VAE folder."""
        from diffusers import AutoencoderKL

        if folder is None:
            raise WeightsNotFoundError(f"No VAE folder given. Needed: {VAE_SOURCE}")
        folder = Path(folder)
        if (folder / "vae" / "config.json").is_file():
            # low_cpu_mem_usage=False: the default asks for `accelerate` and warns on every load without it
            vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True,
                                                low_cpu_mem_usage=False)
        elif (folder / "config.json").is_file():
            vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
        else:
            raise WeightsNotFoundError(f"{folder}: neither vae/config.json nor config.json found. Needed: {VAE_SOURCE}")
        return cls(vae)

    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """``images`` (B, 3, H, W) in [0, 1] -> latents (B, C, H/f, W/f), already times ``scaling_factor``."""
        check_images(images)
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return z * self.scaling_factor

    def save_pretrained(self, folder: str | Path) -> Path:
        """A diffusers ``AutoencoderKL`` folder (``config.json`` + safetensors)."""
        self.vae.save_pretrained(str(folder), safe_serialization=True)
        return Path(folder)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [0, 1]."""
        images = self.vae.decode((latents / self.scaling_factor).to(self.vae.dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1)


class FrozenEncoders(nn.Module):
    """The three frozen encoders; always in eval mode, never trainable."""

    def __init__(self, clip: ClipImageEncoder, dino: DinoEncoder, vae: VaeCodec):
        super().__init__()
        self.clip, self.dino, self.vae = clip, dino, vae
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenEncoders":
        # A parent's .train() must not switch dropout/norm layers of frozen encoders on.
        return super().train(False)


def build_encoders(
    preset,
    clip_path: str | Path | None = None,
    dino_path: str | Path | None = None,
    vae_path: str | Path | None = None,
    allow_random: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FrozenEncoders:
    """Build the frozen encoders for ``preset`` (needs ``clip_embed_dim``, ``dino_dim``, ``latent_channels``,
    ``vae_scale_factor``).

    Each encoder loads from its path; a ``None`` path builds random weights only
    with ``allow_random=True`` (tests, benchmarks), else raises
    :class:`WeightsNotFoundError` naming the file needed. Loaded encoders must
    match the preset's dims.
    """
    # Fail before loading anything heavy if any pretrained part lacks a path.
    for path, what, source in ((clip_path, "CLIP checkpoint", CLIP_SOURCE), (dino_path, "DINOv2 folder", DINO_SOURCE),
                               (vae_path, "VAE folder", VAE_SOURCE)):
        if path is None and not allow_random:
            raise WeightsNotFoundError(f"No {what} given (random weights need allow_random=True). Needed: {source}")
    configs = stand_in_configs(preset)
    clip = (ClipImageEncoder.from_pretrained(clip_path) if clip_path is not None
            else ClipImageEncoder(configs["clip"]))
    dino = (DinoEncoder.from_pretrained(dino_path) if dino_path is not None
            else DinoEncoder.from_config(configs["dino"]))
    vae = (VaeCodec.from_pretrained(vae_path) if vae_path is not None
           else VaeCodec.from_config(configs["vae"]))
    checks = [("CLIP embed dim", clip.embed_dim, preset.clip_embed_dim, clip_path),
             ("DINOv2 hidden size", dino.hidden_size, preset.dino_dim, dino_path),
             ("VAE latent channels", vae.latent_channels, preset.latent_channels, vae_path),
             ("VAE scale factor", vae.scale_factor, preset.vae_scale_factor, vae_path)]
    for what, got, want, path in checks:
        if got != want:
            raise ValueError(f"{path or 'random weights'}: {what} is {got} but preset {preset.name!r} expects {want}")
    return FrozenEncoders(clip, dino, vae).to(device=device, dtype=dtype)


def encoder_param_counts(preset) -> dict[str, int]:
    """Parameter count of each encoder for ``preset``, built on the meta device (no memory, no weights)."""
    configs = stand_in_configs(preset)
    with torch.device("meta"):
        modules = {
            "clip": ClipImageEncoder(configs["clip"]),
            "dino": DinoEncoder.from_config(configs["dino"]),
            "vae": VaeCodec.from_config(configs["vae"]),
        }
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
