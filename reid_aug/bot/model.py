"""The BoT re-ID network: ResNet trunk, last stride 1, global average pooling, BNNeck.

Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person
Re-identification" (CVPRW 2019), Fig. 2 / Sec. 3: the triplet loss sees the
pooled feature ``f_t`` before a BatchNorm layer (the BNNeck), the ID loss sees
the classifier on the normalised ``f_i`` after it; the BN's shift is frozen at
zero and the classifier has no bias, so ``f_i`` lives on a hypersphere-like
space suited to cosine distance at test time. Last stride 1 doubles the final
feature map (16x8 instead of 8x4 for 256x128 inputs) at no parameter cost.

The trunk is torchvision's ResNet (v1.5: the stride sits on the 3x3 conv, as in
the reference code) without its ``fc``; ImageNet weights load from a local
torchvision state dict, never from the network.

A trained model is saved as a folder (diffusers style): ``config.json`` (what
:func:`build_bot` needs plus the label -> original pid mapping) and
``model.safetensors``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pcdms.io import atomic_path, read_json_object, write_json_atomic

BACKBONES = ("resnet18", "resnet34", "resnet50")
NECK_FEATS = ("after", "before")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
# torchvision's ImageNet weights (IMAGENET1K_V1, the ones the BoT recipe starts from).
PRETRAINED_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
}


class BoT(nn.Module):
    """ResNet trunk + GAP + BNNeck + bias-free classifier.

    ``forward(images (B, 3, H, W))``: in train mode returns ``(logits (B, num_classes),
    global_feat (B, D))`` with ``global_feat`` the pooled feature before the BNNeck (for
    the triplet and center losses); in eval mode returns the test feature ``(B, D)``,
    after the BNNeck (``neck_feat="after"``, the recipe) or before it.
    ``D`` = 2048 for ResNet-50, 512 for ResNet-18/34.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", last_stride: int = 1, neck_feat: str = "after"):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        if neck_feat not in NECK_FEATS:
            raise ValueError(f"neck_feat must be one of {NECK_FEATS}, got {neck_feat!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.last_stride = last_stride
        self.neck_feat = neck_feat

        # torchvision's own init is the recipe's random init (kaiming normal, fan_out, for convs).
        net = getattr(torchvision.models, backbone)(weights=None)
        self.feat_dim = net.fc.in_features
        if last_stride == 1:
            _unstride(net.layer4[0])
        self.backbone = nn.Sequential(OrderedDict((name, getattr(net, name)) for name in _TRUNK))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bottleneck = nn.BatchNorm1d(self.feat_dim)
        nn.init.ones_(self.bottleneck.weight)
        nn.init.zeros_(self.bottleneck.bias)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift, so f_i stays centred
        self.classifier = nn.Linear(self.feat_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        global_feat = self.pool(self.backbone(images)).flatten(1)  # (B, D)
        feat = self.bottleneck(global_feat)
        if self.training:
            return self.classifier(feat), global_feat
        return feat if self.neck_feat == "after" else global_feat

    def config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "backbone": self.backbone_name,
            "last_stride": self.last_stride,
            "neck_feat": self.neck_feat,
            "feat_dim": self.feat_dim,
        }


def _unstride(block: nn.Module) -> None:
    """Set every stride-2 conv of the first layer4 block (main path and downsample) to stride 1."""
    for module in block.modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)


def pretrained_hint(backbone: str) -> str:
    """Where the ImageNet weights of ``backbone`` come from (for error messages)."""
    weights_enum = getattr(torchvision.models, f"ResNet{backbone[6:]}_Weights")
    return (
        f"torchvision's ImageNet weights for {backbone} ({PRETRAINED_FILES[backbone]}, "
        f"{weights_enum.IMAGENET1K_V1.url}); download it once and pass its path, "
        "or pass 'none' to start from random weights"
    )


def load_pretrained_backbone(model: BoT, path: str | Path) -> None:
    """Copy a torchvision ImageNet ResNet state dict (``.pth``) into ``model.backbone``.

    The file's ``fc.*`` entries are dropped; every other key must match exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone weights not found: {path}; expected {pretrained_hint(model.backbone_name)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for non-checkpoint files
        raise ValueError(f"{path}: not a torch state dict ({exc})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.backbone.state_dict()
    missing = sorted(set(own) - set(trunk))
    unexpected = sorted(set(trunk) - set(own))
    bad_shape = sorted(k for k in set(own) & set(trunk) if tuple(own[k].shape) != tuple(trunk[k].shape))
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{path}: not torchvision {model.backbone_name} weights; missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]} (need {pretrained_hint(model.backbone_name)})"
        )
    model.backbone.load_state_dict(trunk, strict=True)


def build_bot(
    num_classes: int,
    backbone: str = "resnet50",
    last_stride: int = 1,
    pretrained: str | Path | None = None,
    neck_feat: str = "after",
) -> BoT:
    """A BoT network with random weights, or with the ImageNet trunk from the local file ``pretrained``."""
    model = BoT(num_classes, backbone=backbone, last_stride=last_stride, neck_feat=neck_feat)
    if pretrained is not None:
        load_pretrained_backbone(model, pretrained)
    return model


def save_bot(folder: str | Path, model: BoT, extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/model.safetensors`` then ``folder/config.json`` (each atomically); return ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json_atomic(folder / CONFIG_NAME, {"_class_name": "BoT", **model.config(), **dict(extra_config or {})})
    return folder


def load_bot(folder: str | Path, device: str | torch.device = "cpu") -> tuple[BoT, dict[str, Any]]:
    """Load a folder written by :func:`save_bot`; returns ``(model in eval mode on device, config dict)``."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"BoT model folder {folder}: missing {p.name} (written by reid-aug train-bot)")
    config = read_json_object(cfg_path)
    if config.get("_class_name") != "BoT":
        raise ValueError(f"{cfg_path}: not a BoT config (_class_name {config.get('_class_name')!r})")
    try:
        model = BoT(config["num_classes"], config["backbone"], config["last_stride"], config.get("neck_feat", "after"))
    except KeyError as exc:
        raise ValueError(f"{cfg_path}: missing key {exc}") from None
    try:
        try:
            weights = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{weights_path}: unreadable weights ({exc}); a truncated or partly copied file?") from None
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights_path}: weights do not match {cfg_path.name}: {exc}") from None
    return model.to(device).eval(), config
