"""Model sizes for the three PCDMs stages: the paper's ("paper") and a CPU-test size ("tiny").

Shen et al., ICLR 2024, Sec. 4 "Implementations" and App. B: the prior is a
20-block transformer of width 2,048 on OpenCLIP ViT-H/14 image embeddings
(1,024-d); the inpainting and refining models are Stable Diffusion 2.1-base
UNets with a widened first convolution, conditioned on DINOv2-G/14 tokens
(1,536-d). The UNet numbers below are SD 2.1-base ``unet/config.json``.

Every size lives here as a frozen dataclass; networks take one of these and
nothing else, so a checkpoint's ``config.json`` rebuilds the exact network.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


@dataclass(frozen=True)
class PriorConfig:
    """Stage-1 prior transformer (Sec. 3.2, Fig. 3).

    ``embed_dim`` is the CLIP image-embedding size; ``width`` the transformer
    width (``num_heads * head_dim``); ``pose_hidden`` the two hidden sizes of
    each pose MLP (36 -> 512 -> 1024), followed by one linear layer to
    ``width``; ``num_tokens`` is the sequence length [source pose, target
    pose, source embedding, timestep, noisy target, learned query].
    """

    num_layers: int
    width: int
    num_heads: int
    embed_dim: int
    pose_dim: int = 36
    pose_hidden: tuple[int, int] = (512, 1024)
    num_tokens: int = 6
    dropout: float = 0.0
    embed_mean: float = -0.016
    embed_std: float = 0.415

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"PriorConfig: width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.num_tokens != 6:
            raise ValueError(f"PriorConfig: num_tokens must be 6 (the PCDMs token layout), got {self.num_tokens}")
        if not self.embed_std > 0:
            raise ValueError(f"PriorConfig: embed_std must be positive, got {self.embed_std}")
        if len(self.pose_hidden) != 2:
            raise ValueError(f"PriorConfig: pose_hidden needs two sizes, got {self.pose_hidden}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclass(frozen=True)
class UNetStageConfig:
    """Stage-2 inpainting (``in_channels`` 9) or stage-3 refining (8) UNet + its condition nets.

    The UNet fields are ``diffusers.UNet2DConditionModel`` arguments (as in
    SD 2.1, ``attention_head_dim`` there means the number of heads per
    level). ``dino_dim`` is the DINOv2 token size fed to the trainable MLP
    ``dino_dim -> mlp_hidden -> cross_attention_dim``. Inpaint only:
    ``clip_dim`` (global embedding from stage 1; it is appended to the
    cross-attention context as one token, so it must equal
    ``cross_attention_dim``) and ``pose_channels`` (ControlNet-style pose
    encoder; ``len - 1`` stride-2 convolutions). Refine: both ``None``.
    """

    in_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_head_dim: tuple[int, ...]
    cross_attention_dim: int
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    sample_size: int
    dino_dim: int
    clip_dim: int | None = None
    pose_channels: tuple[int, ...] | None = None
    mlp_hidden: int = 768
    out_channels: int = 4
    norm_num_groups: int = 32
    use_linear_projection: bool = True
    upcast_attention: bool = False

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        for name in ("attention_head_dim", "down_block_types", "up_block_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"UNetStageConfig: {name} needs {n} entries (one per block), got {getattr(self, name)}"
                )
        if (self.clip_dim is None) != (self.pose_channels is None):
            raise ValueError("UNetStageConfig: clip_dim and pose_channels are both set (inpaint) or both None (refine)")
        if self.clip_dim is not None and self.clip_dim != self.cross_attention_dim:
            raise ValueError(
                f"UNetStageConfig: clip_dim {self.clip_dim} must equal cross_attention_dim "
                f"{self.cross_attention_dim}: the global embedding is one cross-attention token"
            )

    @property
    def is_inpaint(self) -> bool:
        return self.pose_channels is not None


@dataclass(frozen=True)
class Preset:
    """One consistent set of sizes for the whole PCDMs pipeline.

    ``image_size`` is (H, W) of one person image; the stage-2 canvas puts
    source and target side by side, (H, 2W). Latents are
    ``image / vae_scale_factor``; the pose encoder downsamples the pixel
    skeleton canvas by ``2 ** (len(pose_channels) - 1)``, which must equal
    ``vae_scale_factor`` so its features match ``conv_in``'s output.
    """

    name: str
    prior: PriorConfig
    inpaint: UNetStageConfig
    refine: UNetStageConfig
    image_size: tuple[int, int] = (128, 64)
    vae_scale_factor: int = 8
    latent_channels: int = 4
    clip_embed_dim: int = 1024
    dino_dim: int = 1536
    # Noise schedule of stages 2 and 3 (the pipeline and the trainer both read these):
    # SD 2.1-base's for the paper (its UNet weights expect it); the toy preset trains from
    # scratch and uses v-prediction on a cosine schedule with zero terminal SNR (Lin et al.
    # 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"), because with
    # epsilon/linear the high-noise steps, where pose and layout are decided, stayed unlearned
    # in CPU-sized training (DESIGN.md §7).
    latent_beta_schedule: str = "scaled_linear"
    latent_prediction_type: str = "epsilon"
    latent_zero_terminal_snr: bool = False
    # Sizes of the random stand-in encoders built when no pretrained path is given
    # (presets whose encoder dims are not the pretrained ones): the square CLIP input and
    # the DINOv2 long side, in pixels (multiples of 14), and the VAE block widths.
    stand_in_clip_size: int = 56
    stand_in_dino_size: int = 56
    stand_in_vae_channels: tuple[int, ...] | None = None
    # How the clean stage-2 canvas latent relates to the VAE (training target and decoding):
    # "joint" = VAE([source | target]) encoded and decoded as one canvas (the release; the
    # trainer caches it per pair); "per_image" = [VAE(source) | VAE(target)], the target half
    # decoded alone (a VAE trained on single person images, as the toy one, never saw the
    # two-person canvas; its encoder attends across the seam, so the two differ: see
    # pcdms.training.cache.canvas_seam_error).
    canvas_latents: str = "joint"

    def __post_init__(self) -> None:
        if self.latent_beta_schedule not in ("scaled_linear", "linear", "squaredcos_cap_v2"):
            raise ValueError(f"Preset {self.name!r}: unknown latent_beta_schedule {self.latent_beta_schedule!r}")
        if self.canvas_latents not in ("joint", "per_image"):
            raise ValueError(f"Preset {self.name!r}: canvas_latents must be 'joint' or 'per_image'")
        if self.latent_prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"Preset {self.name!r}: latent_prediction_type must be 'epsilon' or 'v_prediction'")
        h, w = self.image_size
        f = self.vae_scale_factor
        if h % f or w % f:
            raise ValueError(
                f"Preset {self.name!r}: image_size {self.image_size} not divisible by vae_scale_factor {f}"
            )
        down = 2 ** (len(self.inpaint.pose_channels or ()) - 1)
        if down != f:
            raise ValueError(f"Preset {self.name!r}: pose encoder downsamples by {down}, vae_scale_factor is {f}")
        if self.prior.embed_dim != self.clip_embed_dim or self.inpaint.clip_dim != self.clip_embed_dim:
            raise ValueError(f"Preset {self.name!r}: prior.embed_dim and inpaint.clip_dim must equal clip_embed_dim")
        if self.inpaint.dino_dim != self.dino_dim or self.refine.dino_dim != self.dino_dim:
            raise ValueError(f"Preset {self.name!r}: inpaint/refine dino_dim must equal dino_dim")
        lat = self.latent_channels
        if self.inpaint.in_channels != 2 * lat + 1 or self.refine.in_channels != 2 * lat:
            raise ValueError(f"Preset {self.name!r}: in_channels must be 2*latent+1 (inpaint) and 2*latent (refine)")
        if self.refine.is_inpaint or not self.inpaint.is_inpaint:
            raise ValueError(f"Preset {self.name!r}: inpaint needs pose_channels/clip_dim, refine must not have them")

    @property
    def canvas_size(self) -> tuple[int, int]:
        """(H, 2W): source and target side by side."""
        return (self.image_size[0], 2 * self.image_size[1])

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) latent of one person image."""
        return (self.image_size[0] // self.vae_scale_factor, self.image_size[1] // self.vae_scale_factor)

    @property
    def canvas_latent_size(self) -> tuple[int, int]:
        """(h, 2w) latent of the stage-2 canvas."""
        h, w = self.latent_size
        return (h, 2 * w)


def _sd21_unet(in_channels: int, inpaint: bool) -> UNetStageConfig:
    return UNetStageConfig(
        in_channels=in_channels,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        down_block_types=_SD_DOWN,
        up_block_types=_SD_UP,
        sample_size=64,
        dino_dim=1536,
        clip_dim=1024 if inpaint else None,
        pose_channels=(16, 32, 96, 256) if inpaint else None,
        mlp_hidden=768,
    )


def _tiny_unet(in_channels: int, inpaint: bool) -> UNetStageConfig:
    # Two levels of 32/64 channels: a forward pass on a 16x16 latent takes milliseconds on CPU.
    return UNetStageConfig(
        in_channels=in_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=16,
        dino_dim=32,
        clip_dim=32 if inpaint else None,
        pose_channels=(4, 8, 8, 16) if inpaint else None,
        mlp_hidden=48,
        norm_num_groups=8,
    )


def _toy_unet(in_channels: int, inpaint: bool, channels: tuple[int, ...] = (64, 128, 128)) -> UNetStageConfig:
    # Sized for CPU training of the shipped toy generator: self- and cross-attention at the
    # 16x16 and 8x8 canvas levels, so the target half can read the source half (canvas
    # self-attention) and the source tokens (cross-attention), where appearance flows (Sec. 3.3).
    return UNetStageConfig(
        in_channels=in_channels,
        block_out_channels=channels,
        layers_per_block=1,
        attention_head_dim=tuple(c // 16 for c in channels),
        cross_attention_dim=128,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=16,
        dino_dim=128,
        clip_dim=128 if inpaint else None,
        pose_channels=(16, 32, 64, 128) if inpaint else None,
        mlp_hidden=256,
        norm_num_groups=32 if channels[0] >= 64 else 16,
    )


PRESETS: MappingProxyType[str, Preset] = MappingProxyType({
    "paper": Preset(
        name="paper",
        prior=PriorConfig(num_layers=20, width=2048, num_heads=32, embed_dim=1024),
        inpaint=_sd21_unet(9, inpaint=True),
        refine=_sd21_unet(8, inpaint=False),
        clip_embed_dim=1024,
        dino_dim=1536,
    ),
    # vae_scale_factor 8 like SD: the tiny VAE (pcdms.encoders) has 4 blocks, and the
    # 4-level pose encoder downsamples by 8, so a 128x128 canvas gives a 16x16 latent.
    "tiny": Preset(
        name="tiny",
        prior=PriorConfig(num_layers=2, width=64, num_heads=4, embed_dim=32, pose_hidden=(32, 64)),
        inpaint=_tiny_unet(9, inpaint=True),
        refine=_tiny_unet(8, inpaint=False),
        clip_embed_dim=32,
        dino_dim=32,
    ),
    # The shipped toy generator (CPU-trainable, 128x64 like Market): its own small VAE
    # (trained with `train-pcdms --stage vae`) and random frozen stand-ins for CLIP/DINOv2.
    "toy": Preset(
        name="toy",
        prior=PriorConfig(num_layers=4, width=128, num_heads=4, embed_dim=128, pose_hidden=(128, 128)),
        inpaint=_toy_unet(9, inpaint=True),
        refine=_toy_unet(8, inpaint=False, channels=(32, 64, 64)),
        clip_embed_dim=128,
        dino_dim=128,
        latent_beta_schedule="squaredcos_cap_v2",
        latent_prediction_type="v_prediction",
        latent_zero_terminal_snr=True,
        stand_in_clip_size=112,
        stand_in_dino_size=112,
        stand_in_vae_channels=(32, 64, 64, 64),
        canvas_latents="per_image",
    ),
})


def get_preset(name: str) -> Preset:
    """The named preset ("paper" | "tiny" | "toy"); unknown names raise ``ValueError`` listing the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown PCDMs preset {name!r}; choose one of {sorted(PRESETS)}") from None
