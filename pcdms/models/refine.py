"""Stage 3: the refining conditional diffusion model (PCDMs Sec. 3.4, Fig. 5, Eq. 7-8).

The coarse stage-2 target image's latent is concatenated with the noisy
latent on channels (conv_in 8), and the source image's DINOv2 tokens enter
through a trainable MLP and cross-attention. Parameter names ``unet.*``,
``image_proj_model_p.*`` follow the official release's ``SDModel``.
"""

from __future__ import annotations

import torch
from torch import nn

from pcdms.models.conditions import check_masks, drop_mask, replace_rows
from pcdms.models.pose_encoder import TokenMLP
from pcdms.models.unet import build_stage_unet, check_shape
from pcdms.presets import UNetStageConfig


class RefineModel(nn.Module):
    """epsilon_theta(x_t, i_ct, x_s, t) of Eq. 7 (epsilon prediction)."""

    def __init__(self, config: UNetStageConfig) -> None:
        super().__init__()
        if config.is_inpaint:
            raise ValueError("RefineModel needs the refine UNetStageConfig (no pose_channels / clip_dim)")
        self.config = config
        self.unet = build_stage_unet(config)
        self.image_proj_model_p = TokenMLP(config.dino_dim, config.mlp_hidden, config.cross_attention_dim)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        coarse_latent: torch.Tensor,
        dino_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the noise on the target latent.

        Args:
            sample: (B, 4, h, w) noisy target latent.
            timestep: (B,) or scalar diffusion step.
            coarse_latent: (B, 4, h, w) latent of the coarse stage-2 target image.
            dino_tokens: (B, N, dino_dim) DINOv2 tokens of the source image.

        Returns:
            (B, 4, h, w) predicted epsilon.
        """
        b, c, h, w = sample.shape
        check_shape("RefineModel sample", sample, (b, self.config.in_channels // 2, h, w))
        check_shape("RefineModel coarse_latent", coarse_latent, (b, c, h, w))
        check_shape("RefineModel dino_tokens", dino_tokens, (b, None, self.config.dino_dim))
        dtype = self.unet.conv_in.weight.dtype
        x = torch.cat([sample, coarse_latent], dim=1).to(dtype)
        context = self.image_proj_model_p(dino_tokens.to(dtype))
        return self.unet(x, timestep, encoder_hidden_states=context).sample

    @staticmethod
    def null_condition(coarse_latent: torch.Tensor, dino_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unconditional inputs of Eq. 8, epsilon_theta(x_t, t): coarse latent and DINOv2 tokens zeroed."""
        return torch.zeros_like(coarse_latent), torch.zeros_like(dino_tokens)

    def drop_conditions(
        self,
        coarse_latent: torch.Tensor,
        dino_tokens: torch.Tensor,
        p: float = 0.1,
        generator: torch.Generator | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time dropout to :meth:`null_condition`: one draw per sample (probability ``p``).

        The release drops only the coarse image (10 %), so Eq. 8's
        unconditional branch, which also lacks the source features, was never
        trained. Here the coarse latent is dropped 10 % as released, and the
        DINOv2 tokens go with it, so the guidance null is exactly a trained input.
        ``masks`` (2, B) bool, given: exactly these drops (coarse, tokens; see
        :func:`pcdms.models.conditions.condition_masks`).
        """
        null_coarse, null_tokens = self.null_condition(coarse_latent, dino_tokens)
        b = coarse_latent.shape[0]
        if masks is not None:
            drop_coarse, drop_tokens = check_masks(masks, 2, b).to(coarse_latent.device)
        else:
            drop_coarse = drop_tokens = drop_mask(b, p, generator, coarse_latent.device)
        return replace_rows(coarse_latent, null_coarse, drop_coarse), replace_rows(dino_tokens, null_tokens, drop_tokens)
