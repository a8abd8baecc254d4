"""Start a stage-2/3 UNet from pretrained Stable Diffusion 2.1-base weights (PCDMs Sec. 4, App. B).

"We leverage the pretrained stable diffusion V2.1, modifying the first
convolution layer to accommodate additional conditions." The release did
this with ``ignore_mismatched_sizes=True``, which re-initialises the whole
first convolution at random. Here the first ``out_channels`` input channels
of ``conv_in`` keep SD's weights and the extra condition channels (mask,
masked latent / coarse latent) start at zero, so the fresh model is exactly
SD on the noisy latent (the usual inpainting fine-tune start). Parts SD does
not have (the class-embedding projection, pose encoder, DINOv2 MLP) keep
their initialisation.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

SD_UNET_FILE = "diffusion_pytorch_model.safetensors"
SD_SOURCE = (
    "Stable Diffusion 2.1-base diffusers folder with unet/diffusion_pytorch_model.safetensors "
    "(Hugging Face repo stabilityai/stable-diffusion-2-1-base)"
)
# Our UNet keys that SD 2.1-base does not have (the stage-2 global-embedding projection).
_NEW_IN_PCDMS = ("class_embedding.",)


def find_sd_unet_weights(folder: str | os.PathLike) -> Path:
    """``folder/unet/<file>`` or ``folder/<file>`` (a bare unet folder); a clear error otherwise."""
    folder = Path(folder)
    for candidate in (folder / "unet" / SD_UNET_FILE, folder / SD_UNET_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder}: no unet/{SD_UNET_FILE} (nor {SD_UNET_FILE}). Needed: {SD_SOURCE}")


@torch.no_grad()
def init_from_stable_diffusion(model: nn.Module, folder: str | os.PathLike) -> dict[str, list[str]]:
    """Copy SD UNet weights from ``folder`` into ``model.unet`` (an inpaint or refine model), in place.

    Returns ``{"widened": [...], "kept_init": [...]}``: the input convolution
    that got zero extra channels, and our parameters SD has no value for.
    Raises ``ValueError`` listing SD keys without a place in our UNet and
    shape mismatches (e.g. a UNet of another size than the preset).
    """
    if not hasattr(model, "unet"):
        raise ValueError("init_from_stable_diffusion needs an inpaint or refine model (with .unet)")
    path = find_sd_unet_weights(folder)
    sd = load_file(str(path))
    ours = model.unet.state_dict()
    unknown = sorted(set(sd) - set(ours))
    missing = sorted(k for k in set(ours) - set(sd) if not k.startswith(_NEW_IN_PCDMS))
    bad = sorted(
        f"{k}: {tuple(sd[k].shape)} vs {tuple(ours[k].shape)}"
        for k in set(sd) & set(ours)
        if k != "conv_in.weight" and sd[k].shape != ours[k].shape
    )
    w_sd, w_ours = sd.get("conv_in.weight"), ours["conv_in.weight"]
    if w_sd is not None and (w_sd.shape[0] != w_ours.shape[0] or w_sd.shape[1] > w_ours.shape[1]
                             or w_sd.shape[2:] != w_ours.shape[2:]):
        bad.append(f"conv_in.weight: {tuple(w_sd.shape)} cannot widen to {tuple(w_ours.shape)}")
    if unknown or missing or bad:
        raise ValueError(
            f"{path} does not fit this UNet: unknown keys {unknown[:20]}, missing keys {missing[:20]}, "
            f"shape mismatches {bad[:20]}"
        )
    widened = []
    for key, value in sd.items():
        target = ours[key]
        if key == "conv_in.weight" and value.shape != target.shape:
            target.zero_()
            target[:, : value.shape[1]].copy_(value)
            widened.append(key)
        else:
            target.copy_(value)
    kept = sorted(set(ours) - set(sd))
    return {"widened": widened, "kept_init": kept}
