"""Condition encoders shared by the stage networks (key layout of the official PCDMs release).

- :class:`PoseMLP`: the prior's pose-coordinate network (Sec. 3.2). With the
  linear layer that follows it in the prior (``encoder_hidden_states_proj``)
  it is the paper's "3 linear layers" 36 -> 512 -> 1024 -> width.
- :class:`TokenMLP`: the trainable MLP on frozen DINOv2 tokens (Sec. 3.3,
  3.4), ``dino_dim -> hidden -> cross_attention_dim``.
- :func:`build_pose_canvas_encoder`: the ControlNet-style 4-level conv stack
  on the skeleton canvas (Sec. 3.3), diffusers'
  ``ControlNetConditioningEmbedding`` (zero-initialised output convolution).

The ``net.{i}`` indices of the two MLPs follow the release's layer order
(Linear, GELU, Dropout, LayerNorm, Linear, Dropout[, LayerNorm]) so its
state dicts load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # diffusers >= 0.31 moved ControlNet into a sub-package
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
except ImportError:  # pragma: no cover - older diffusers
    from diffusers.models.controlnet import ControlNetConditioningEmbedding


class PoseMLP(nn.Module):
    """(B, ..., pose_dim) pose coordinates -> (B, ..., hidden[1]): Linear-GELU-LN-Linear-LN."""

    def __init__(self, pose_dim: int, hidden: tuple[int, int], dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(pose_dim, hidden[0]),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.LayerNorm(hidden[0]),
            nn.Linear(hidden[0], hidden[1]),
            nn.Dropout(dropout),
            nn.LayerNorm(hidden[1]),
        )

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        return self.net(pose)


class TokenMLP(nn.Module):
    """(B, N, in_dim) image tokens -> (B, N, out_dim): Linear-GELU-LN-Linear (no final norm, as released)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.LayerNorm(hidden_dim),
            nn.Linear(hidden_dim, out_dim),
            nn.Dropout(dropout),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


def build_pose_canvas_encoder(channels: tuple[int, ...], out_channels: int) -> ControlNetConditioningEmbedding:
    """(B, 3, H, W) skeleton canvas -> (B, out_channels, H / 2**(L-1), W / 2**(L-1)), L = len(channels).

    The output convolution starts at zero, so a freshly built inpainting
    model is exactly the UNet it was initialised from until training moves it.
    """
    return ControlNetConditioningEmbedding(
        conditioning_embedding_channels=out_channels, conditioning_channels=3, block_out_channels=tuple(channels)
    )
