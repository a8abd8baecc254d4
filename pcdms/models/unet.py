"""The Stable Diffusion 2.1 UNet shared by stages 2 and 3 (PCDMs Sec. 3.3-3.4, App. B).

Built from a :class:`pcdms.presets.UNetStageConfig` with diffusers'
``UNet2DConditionModel``; only the first convolution is wider than SD's
(9 inpaint / 8 refine input channels). The inpainting UNet also gets a
"projection" class embedding: the stage-1 global embedding goes through
``class_embedding.linear_{1,2}`` and is added to the timestep embedding.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from pcdms.presets import UNetStageConfig


def build_stage_unet(config: UNetStageConfig) -> UNet2DConditionModel:
    """A randomly initialised UNet for ``config`` (no weights are read)."""
    return UNet2DConditionModel(
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        attention_head_dim=tuple(config.attention_head_dim),
        cross_attention_dim=config.cross_attention_dim,
        norm_num_groups=config.norm_num_groups,
        use_linear_projection=config.use_linear_projection,
        upcast_attention=config.upcast_attention,
        class_embed_type="projection" if config.clip_dim is not None else None,
        projection_class_embeddings_input_dim=config.clip_dim,
    )


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``t.shape`` matches ``shape`` (None = any size)."""
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
