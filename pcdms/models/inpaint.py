"""Stage 2: the inpainting conditional diffusion model (PCDMs Sec. 3.3, Fig. 4, Eq. 5-6).

Source and target sit side by side on one canvas (width 2W); the UNet
inpaints the target half. Conditions, as in the official release
(``SDModel`` of ``stage2_train_inpaint_model.py``, whose parameter names
``unet.*``, ``pose_proj.*``, ``image_proj_model_p.*`` we keep):

- image level: conv_in sees [noisy latent (4), mask (1), masked-canvas latent (4)];
- pose level: a ControlNet-style encoder of the [source | target] skeleton
  canvas whose output is added to conv_in's output;
- feature level: cross-attention on [MLP(DINOv2 source tokens); global
  target embedding from stage 1], and the same global embedding through
  the UNet's class-embedding projection, added to the timestep embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from pcdms.models.conditions import check_masks, drop_mask, replace_rows
from pcdms.models.pose_encoder import TokenMLP, build_pose_canvas_encoder
from pcdms.models.unet import build_stage_unet, check_shape as _check
from pcdms.presets import UNetStageConfig


class InpaintModel(nn.Module):
    """epsilon_theta(x_t, f_st, p_st, i_sm, t) of Eq. 5 (epsilon prediction)."""

    def __init__(self, config: UNetStageConfig) -> None:
        super().__init__()
        if not config.is_inpaint:
            raise ValueError("InpaintModel needs a UNetStageConfig with pose_channels and clip_dim (the inpaint one)")
        self.config = config
        self.unet = build_stage_unet(config)
        self.pose_proj = build_pose_canvas_encoder(config.pose_channels, config.block_out_channels[0])
        self.image_proj_model_p = TokenMLP(config.dino_dim, config.mlp_hidden, config.cross_attention_dim)

    @property
    def pose_downsample(self) -> int:
        """Pixel-to-latent factor of the pose encoder: 2 ** (levels - 1)."""
        return 2 ** (len(self.config.pose_channels) - 1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        mask: torch.Tensor,
        masked_latent: torch.Tensor,
        pose_canvas: torch.Tensor,
        dino_tokens: torch.Tensor,
        global_embed: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the noise on the canvas latent.

        Args:
            sample: (B, 4, h, 2w) noisy latent of the [source | target] canvas.
            timestep: (B,) or scalar diffusion step.
            mask: (B, 1, h, 2w) mask channel of the canvas (as the caller's training used it).
            masked_latent: (B, 4, h, 2w) latent of [source | zeros].
            pose_canvas: (B, 3, H, 2W) [source | target] skeleton image in [0, 1],
                pixel resolution, H = h * 2**(levels-1).
            dino_tokens: (B, N, dino_dim) DINOv2 tokens of the source image.
            global_embed: (B, clip_dim) target CLIP embedding predicted by stage 1.

        Returns:
            (B, 4, h, 2w) predicted epsilon.
        """
        cfg = self.config
        b, _, h, w2 = sample.shape
        lat = (cfg.in_channels - 1) // 2  # conv_in = [noisy (lat), mask (1), masked (lat)]
        _check("InpaintModel sample", sample, (b, lat, h, w2))
        _check("InpaintModel mask", mask, (b, 1, h, w2))
        _check("InpaintModel masked_latent", masked_latent, (b, lat, h, w2))
        f = self.pose_downsample
        _check("InpaintModel pose_canvas", pose_canvas, (b, 3, h * f, w2 * f))
        _check("InpaintModel dino_tokens", dino_tokens, (b, None, cfg.dino_dim))
        _check("InpaintModel global_embed", global_embed, (b, cfg.clip_dim))
        dtype = self.unet.conv_in.weight.dtype
        x = torch.cat([sample, mask, masked_latent], dim=1).to(dtype)
        # The release fed skeletons normalised to [-1, 1]; keep its input range so its weights apply.
        pose_feat = self.pose_proj(pose_canvas.to(dtype) * 2 - 1)
        global_embed = global_embed.to(dtype)
        context = torch.cat([self.image_proj_model_p(dino_tokens.to(dtype)), global_embed[:, None]], dim=1)
        # The pose residual enters right after conv_in, inside diffusers' own forward: a hook
        # adds it there without re-implementing the UNet (and keeps the unet.* key names).
        handle = self.unet.conv_in.register_forward_hook(lambda _mod, _inp, out: out + pose_feat)
        try:
            return self.unet(x, timestep, encoder_hidden_states=context, class_labels=global_embed).sample
        finally:
            handle.remove()

    @staticmethod
    def null_condition(dino_tokens: torch.Tensor, global_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unconditional inputs of Eq. 6 as the release reads it: DINOv2 tokens and global embedding zeroed.

        Pose canvas and masked source canvas are kept (they are not
        arguments here). Training (:meth:`drop_conditions`) drops to exactly
        these zeros; the release instead dropped source/target *pixels* in
        training and used zero contexts at inference, which disagree.
        """
        return torch.zeros_like(dino_tokens), torch.zeros_like(global_embed)

    def drop_conditions(
        self,
        dino_tokens: torch.Tensor,
        global_embed: torch.Tensor,
        p: float = 0.1,
        generator: torch.Generator | None = None,
        joint: bool = False,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time dropout to :meth:`null_condition` (App. B: 10 %).

        ``joint=False`` (the release): DINOv2 tokens and global embedding
        are dropped independently, each with probability ``p`` per sample
        (both together with ``p**2``). ``joint=True``: one draw drops both.
        ``masks`` (2, B) bool, given: exactly these drops (see
        :func:`pcdms.models.conditions.condition_masks`).
        """
        null_tokens, null_global = self.null_condition(dino_tokens, global_embed)
        b, dev = dino_tokens.shape[0], dino_tokens.device
        if masks is not None:
            drop_tokens, drop_global = check_masks(masks, 2, b).to(dev)
        else:
            drop_tokens = drop_mask(b, p, generator, dev)
            drop_global = drop_tokens if joint else drop_mask(b, p, generator, dev)
        return replace_rows(dino_tokens, null_tokens, drop_tokens), replace_rows(global_embed, null_global, drop_global)
