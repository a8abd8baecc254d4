"""LPIPS (Zhang et al., CVPR 2018) as the pose-transfer papers report it (DESIGN.md §9).

The ``lpips`` package's AlexNet variant with the v0.1 linear layers (shipped inside the
package), on images scaled to [-1, 1] (the PCDMs evaluation script feeds [0, 1] images and so
reports another number). The AlexNet backbone is torchvision's ImageNet AlexNet, read from a
local file (``alexnet-owt-7be5be79.pth``, torchvision's ``AlexNet_Weights.IMAGENET1K_V1``):
nothing downloads. ``allow_random_weights`` builds a seeded random backbone instead, for tests
and smoke runs only; results say so.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from pcdms.encoders import WeightsNotFoundError
from pcdms.io import read_torch_file

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_EXPECTED = f"torchvision's ImageNet AlexNet weights ({ALEXNET_FILE})"


def load_lpips(alexnet_weights: str | Path | None, allow_random_weights: bool = False, seed: int = 0,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """``lpips.LPIPS(net="alex", version="0.1")`` with its backbone from ``alexnet_weights``, in eval mode.

    Raises :class:`pcdms.encoders.WeightsNotFoundError` when no file is given and random weights
    are not allowed, ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing,
    not a checkpoint, or lacks AlexNet's ``features.*`` tensors.
    """
    import lpips

    if alexnet_weights is None and not allow_random_weights:
        raise WeightsNotFoundError(f"LPIPS needs {ALEXNET_EXPECTED}: pass its path (--lpips-weights), or "
                                   "--allow-random-weights for a smoke run")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # lpips asks torchvision with the old `pretrained=False` argument; the warning is about lpips's code
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        torch.manual_seed(seed)  # the random backbone (and nothing else) is drawn here
        # Nothing downloads: pretrained=True reads the linear layers shipped inside the lpips package,
        # pnet_rand=True builds the AlexNet backbone without torchvision's weights (loaded from a file below).
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    if alexnet_weights is not None:
        state = read_torch_file(alexnet_weights, ALEXNET_EXPECTED)
        # lpips splits torchvision's `features` into slices that keep the layer indices: slice2.3 = features.3
        wanted = {k: f"features.{k.split('.', 1)[1]}" for k in model.net.state_dict()}
        missing = sorted(v for v in wanted.values() if v not in state)
        if missing:
            raise ValueError(f"{alexnet_weights}: not {ALEXNET_EXPECTED}; missing {', '.join(missing[:4])}")
        model.net.load_state_dict({k: state[v] for k, v in wanted.items()})
    return model.eval().requires_grad_(False).to(device)


def to_lpips_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], the scaling LPIPS was trained with."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def lpips_distances(model: torch.nn.Module, preds: np.ndarray, targets: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N,) LPIPS distance of each ``preds[i]`` to ``targets[i]`` ((N, H, W, 3) uint8 each; lower is closer)."""
    if preds.shape != targets.shape:
        raise ValueError(f"lpips: predictions {preds.shape} and targets {targets.shape} differ in shape")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(preds), batch_size):
        p, t = (to_lpips_input(x[i:i + batch_size]).to(device) for x in (preds, targets))
        out.append(model(p, t).flatten().double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
