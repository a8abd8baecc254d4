"""Stage 1: the prior conditional diffusion model (PCDMs Sec. 3.2, Fig. 3, Eq. 3-4).

A transformer in the style of the unCLIP prior (Ramesh et al. 2022) that
predicts the clean CLIP image embedding of the target image (x0
prediction) from the noisy one, conditioned on the source and target pose
coordinates and the source image's CLIP embedding. Module and parameter
names match the official release (``tencent-ailab/PCDMs``,
``Stage1_PriorTransformer``) so its weights load without renaming.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from pcdms.models.conditions import check_masks, drop_mask, replace_rows
from pcdms.models.pose_encoder import PoseMLP
from pcdms.presets import PriorConfig


class PosePriorTransformer(nn.Module):
    """x_theta(x_t, x_s, p_s, p_t, t) of Eq. 3.

    Sequence of six width-``W`` tokens, in this order: source pose, target
    pose, source CLIP embedding, timestep, noisy target embedding, learned
    query (``prd_embedding``); plus a learned positional embedding. Full
    (non-causal) self-attention; the prediction is read from the last
    (query) token through ``norm_out`` and ``proj_to_clip_embeddings``.
    """

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        w, d = config.width, config.embed_dim
        # Separate pose nets for source and target (release names: pose_encoder / pose_encoder1).
        self.pose_encoder = PoseMLP(config.pose_dim, config.pose_hidden, config.dropout)
        self.pose_encoder1 = PoseMLP(config.pose_dim, config.pose_hidden, config.dropout)
        self.time_proj = Timesteps(w, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(w, w)
        self.proj_in = nn.Linear(d, w)
        self.embedding_proj = nn.Linear(d, w)
        self.encoder_hidden_states_proj = nn.Linear(config.pose_hidden[1], w)
        self.encoder_hidden_states_proj1 = nn.Linear(config.pose_hidden[1], w)
        # Zero start as in the unCLIP prior; the token projections already differ per slot.
        self.positional_embedding = nn.Parameter(torch.zeros(1, config.num_tokens, w))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, w))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                w, config.num_heads, config.head_dim, dropout=config.dropout, activation_fn="gelu", attention_bias=True
            )
            for _ in range(config.num_layers)
        )
        self.norm_out = nn.LayerNorm(w)
        self.proj_to_clip_embeddings = nn.Linear(w, d)

    def forward(
        self,
        noisy_embeds: torch.Tensor,
        timestep: torch.Tensor | int | float,
        source_embeds: torch.Tensor,
        source_pose: torch.Tensor,
        target_pose: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the clean target embedding.

        Args:
            noisy_embeds: (B, D) noisy target CLIP embedding x_t, in the
                standardised space of :meth:`normalize_embeds`.
            timestep: (B,) or scalar diffusion step, long or float.
            source_embeds: (B, D) raw (not standardised, as released) CLIP image
                embedding of the source image.
            source_pose, target_pose: (B, pose_dim) pose coordinates.

        Returns:
            (B, D) predicted x0, standardised (``denormalize_embeds`` gives the
            CLIP embedding that stage 2 takes as ``global_embed``).
        """
        b = noisy_embeds.shape[0]
        d, p = self.config.embed_dim, self.config.pose_dim
        for name, t, n in (("noisy_embeds", noisy_embeds, d), ("source_embeds", source_embeds, d),
                           ("source_pose", source_pose, p), ("target_pose", target_pose, p)):
            if t.dim() != 2 or t.shape != (b, n):
                raise ValueError(f"PosePriorTransformer: {name} must be ({b}, {n}), got {tuple(t.shape)}")
        dtype = self.proj_in.weight.dtype
        timestep = torch.as_tensor(timestep, device=noisy_embeds.device)
        timestep = timestep.reshape(-1).expand(b) if timestep.numel() == 1 else timestep
        if timestep.shape != (b,):
            raise ValueError(f"PosePriorTransformer: timestep must be a scalar or ({b},), got {tuple(timestep.shape)}")
        # Timesteps always returns float32; cast before the (possibly half) time MLP.
        t_emb = self.time_embedding(self.time_proj(timestep).to(dtype))
        tokens = torch.stack(
            [
                self.encoder_hidden_states_proj(self.pose_encoder(source_pose.to(dtype))),
                self.encoder_hidden_states_proj1(self.pose_encoder1(target_pose.to(dtype))),
                self.embedding_proj(source_embeds.to(dtype)),
                t_emb,
                self.proj_in(noisy_embeds.to(dtype)),
                self.prd_embedding[:, 0].expand(b, -1),
            ],
            dim=1,
        )
        hidden = tokens + self.positional_embedding
        for block in self.transformer_blocks:
            hidden = block(hidden)
        return self.proj_to_clip_embeddings(self.norm_out(hidden[:, -1]))

    def normalize_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, D) raw CLIP image embedding -> the standardised space the prior diffuses in."""
        return (embeds - self.config.embed_mean) / self.config.embed_std

    def denormalize_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize_embeds` (the release's ``post_process_latents``)."""
        return embeds * self.config.embed_std + self.config.embed_mean

    @staticmethod
    def null_condition(
        source_embeds: torch.Tensor, source_pose: torch.Tensor, target_pose: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unconditional inputs of Eq. 4, x_theta(x_t, t): every condition zeroed (same shapes).

        The release zeroes source *pixels* before CLIP and zeroes both pose
        vectors (10 % each, ``PriorImageDataset``); we zero the source
        embedding itself so the null needs no image encoder and training and
        guidance provably use the same value.
        """
        return torch.zeros_like(source_embeds), torch.zeros_like(source_pose), torch.zeros_like(target_pose)

    def drop_conditions(
        self,
        source_embeds: torch.Tensor,
        source_pose: torch.Tensor,
        target_pose: torch.Tensor,
        p: float = 0.1,
        generator: torch.Generator | None = None,
        joint: bool = False,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training-time dropout to :meth:`null_condition`.

        ``joint=False`` (the release): source embedding, source pose and
        target pose are each dropped with probability ``p``, independently per
        sample, so the all-dropped input of Eq. 4 occurs with ``p**3``.
        ``joint=True``: one draw per sample drops all three together.
        ``masks`` (3, B) bool, given: exactly these drops (the trainer draws them with
        :func:`pcdms.models.conditions.condition_masks`; ``p``/``joint`` are then unused).
        """
        nulls = self.null_condition(source_embeds, source_pose, target_pose)
        b, dev = source_embeds.shape[0], source_embeds.device
        if masks is not None:
            drops = list(check_masks(masks, 3, b).to(dev))
        else:
            shared = drop_mask(b, p, generator, dev) if joint else None
            drops = [shared if joint else drop_mask(b, p, generator, dev) for _ in range(3)]
        s, ps, pt = (replace_rows(c, n, d) for c, n, d in zip((source_embeds, source_pose, target_pose), nulls, drops))
        return s, ps, pt
