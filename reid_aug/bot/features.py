"""Test-time feature extraction for a BoT model."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from reid_aug.bot.data import normalize


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    flip: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Eval-mode features of ``images`` (N, 3, H, W) uint8 -> float32 (N, D) on the CPU.

    BoT's test feature is the BNNeck output (``neck_feat="after"``). ``flip``: average
    the features of each image and its horizontal mirror (a common test-time trick, not
    part of BoT's published numbers). On CUDA the forward runs under float16 autocast,
    inputs and model in channels_last (the fast layout for cuDNN convolutions).
    The model is moved to ``device`` and left there; its train/eval mode is restored afterwards.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    was_training = model.training
    model.to(device, memory_format=torch.channels_last) if cuda else model.to(device)
    model.eval()
    out = []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="features", unit="batch", disable=not progress):
            x = normalize(images[start : start + batch_size].to(device, non_blocking=True))
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                feats = model(x).float()
                if flip:
                    feats = (feats + model(x.flip(-1)).float()) / 2
            out.append(feats.cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)
