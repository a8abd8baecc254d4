"""Fréchet Inception Distance (Heusel et al., NeurIPS 2017) in the two variants papers mix up (DESIGN.md §9).

- ``community``: the number in the pose-transfer tables (GFLA / DPTN / PIDM / PCDMs scripts,
  a port of an early pytorch-fid): pool3 features (2048) of *torchvision's ImageNet*
  Inception-v3 (``inception_v3_google-0cc3c7bd.pth``), inputs bilinearly resized to 299x299
  (``align_corners=False``) and scaled to [-1, 1], no ``transform_input``.
- ``standard``: the TF-Inception FID of the FID paper, via ``torchmetrics`` (torch-fidelity's
  port of the 2015-12-05 TF graph, ``weights-inception-2015-12-05-6726825d.pth``, its TF-style
  bilinear resize, no antialiasing). This is the number image-generation papers outside pose
  transfer report.

Both take (N, 3, H, W) uint8 images, accumulate feature statistics in float64 and compute the
distance with torchmetrics (trace of the square root from the eigenvalues of the covariance
product: finite and ~0 for a set against itself even when the covariances are singular, as
they are with fewer images than 2048). The two numbers are never interchangeable: every
result names its variant.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pcdms.encoders import WeightsNotFoundError
from pcdms.io import read_torch_file

VARIANTS = ("community", "standard")
WEIGHT_FILES = {"community": "inception_v3_google-0cc3c7bd.pth",
                "standard": "weights-inception-2015-12-05-6726825d.pth"}
EXPECTED = {"community": f"torchvision's ImageNet Inception-v3 weights ({WEIGHT_FILES['community']})",
            "standard": f"torch-fidelity's TF-Inception FID weights ({WEIGHT_FILES['standard']})"}
FEATURES = 2048
INPUT_SIZE = 299


class CommunityInception(nn.Module):
    """pool3 features of torchvision's Inception-v3 as the pose-transfer FID scripts compute them.

    Input (N, 3, H, W) uint8 RGB of any size; output (N, 2048) float32.
    """

    num_features = FEATURES

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1,
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, net.maxpool2,
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
            net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, net.avgpool,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.blocks(2.0 * x - 1.0).flatten(1)


def _inception(num_classes: int, aux_logits: bool, weights: str | Path | None, variant: str) -> nn.Module:
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, num_classes=num_classes, aux_logits=aux_logits, init_weights=weights is None)
    if weights is None:
        _calibrate_batchnorm(net)
    else:
        state = read_torch_file(weights, EXPECTED[variant])
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{weights}: not {EXPECTED[variant]} ({str(exc).splitlines()[0]})") from None
    return net


@torch.no_grad()
def _calibrate_batchnorm(net: nn.Module, images: int = 8) -> None:
    """Set a random network's batch-norm statistics from one pass of noise images: with the
    initial (0, 1) statistics its pool3 features are ~1e10 and the distance is all rounding."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the pass's own statistics
    net.train()
    net(torch.rand(images, 3, INPUT_SIZE, INPUT_SIZE) * 2 - 1)
    net.eval()


def build_fid(variant: str, weights: str | Path | None, allow_random_weights: bool = False, seed: int = 0,
              device: str | torch.device = "cpu"):
    """A ``torchmetrics`` ``FrechetInceptionDistance`` of ``variant`` that keeps its real (reference)
    features across ``reset()``, so several generated sets compare against one reference pass.

    ``weights``: the variant's local weight file (:data:`WEIGHT_FILES`). Without one,
    ``allow_random_weights`` draws a seeded random network (tests and smoke runs only).
    Raises ``ValueError`` for an unknown variant or a file of the wrong network,
    :class:`pcdms.encoders.WeightsNotFoundError` when no weights are given or allowed.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if variant not in VARIANTS:
        raise ValueError(f"FID variant must be one of {list(VARIANTS)}, got {variant!r}")
    if weights is None and not allow_random_weights:
        option = "--fid-weights" if variant == "community" else "--fid-tf-weights"
        raise WeightsNotFoundError(f"the {variant} FID needs {EXPECTED[variant]}: pass its path ({option}), or "
                                   "--allow-random-weights for a smoke run")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if variant == "community":
            feature = CommunityInception(_inception(1000, True, weights, variant)).eval().requires_grad_(False)
            metric = FrechetInceptionDistance(feature=feature, reset_real_features=False)
        elif weights is not None:
            metric = FrechetInceptionDistance(feature=FEATURES, reset_real_features=False, antialias=False,
                                              feature_extractor_weights_path=str(weights))
        else:  # torch-fidelity only reads a file: write the random network (same layer names) to one
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "random-inception.pth"
                torch.save(_inception(1008, False, None, variant).state_dict(), path)
                metric = FrechetInceptionDistance(feature=FEATURES, reset_real_features=False, antialias=False,
                                                  feature_extractor_weights_path=str(path))
    return metric.to(device)


@torch.no_grad()
def add_images(metric, images: torch.Tensor, real: bool, batch_size: int = 64) -> None:
    """Feed (N, 3, H, W) uint8 ``images`` to ``metric`` as the real (reference) or the generated set."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"FID takes (N, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    device = metric.device
    for i in range(0, len(images), batch_size):
        metric.update(images[i:i + batch_size].to(device), real=real)


def compute_fid(metric) -> float:
    """The distance between the sets fed so far; ``ValueError`` with fewer than 2 images in either."""
    n_real, n_fake = int(metric.real_features_num_samples), int(metric.fake_features_num_samples)
    if n_real < 2 or n_fake < 2:
        raise ValueError(f"FID needs at least 2 reference and 2 generated images (got {n_real} and {n_fake})")
    return float(metric.compute())
