"""The three-stage PCDMs sampling pipeline (Shen et al., ICLR 2024, Sec. 3.2-3.4, Eq. 4, 6, 8).

prior (target CLIP embedding) -> inpainting (coarse target on the [source | target]
canvas) -> refining (final target image). ``stages`` selects the paper's
ablations (Sec. 4.2): ``"B1"`` inpainting only, ``"B2"`` prior + inpainting,
``"B3"`` inpainting + refining, ``"full"`` all three.

Noise schedules (the stages' training schedules; samplers are built from them):

- prior: cosine ``squaredcos_cap_v2``, 1000 steps, x0 prediction
  (``prediction_type="sample"``; unCLIP, App. B);
- inpaint and refine: SD 2.1-base's ``scaled_linear`` 0.00085-0.012, 1000
  steps, epsilon prediction. App. B says "a linear noise schedule"; both UNets
  start from SD 2.1-base weights, which were trained on ``scaled_linear`` (the
  schedule the release samples with), and a true linear schedule would change
  every noise level those weights expect.

Classifier-free guidance: conditional and unconditional inputs go through ONE
forward pass (concatenated along the batch), ``uncond + w * (cond - uncond)``,
which is Eq. 2's ``w * cond + (1 - w) * uncond``. At ``w == 1`` the
unconditional half is skipped, so the result is the pure conditional path.
The unconditional inputs are exactly each model's ``null_condition`` (what
training drops to). Eq. 6 is read as the release does: the inpainting
unconditional branch drops the DINOv2 tokens and the global embedding and keeps
the pose canvas, mask and masked source canvas. Without the prior (B1, B3) the
inpainting model gets its null global embedding in both branches.

Refining from the coarse image (``refine_strength`` < 1, not in the paper, which samples stage 3
from noise): the coarse latent is noised to the level of a later sampler step and only the
remaining steps run (SDEdit, Meng et al., ICLR 2022; the way diffusers' img2img pipelines and
the SDXL refiner use a second model), so stage 3 keeps stage 2's layout and adds texture.

Randomness: the three initial noises (prior, canvas, refine) are drawn up front
in that order, so for one seed the ablations share their noise (full's coarse
image is B2's output, B3's coarse image is B1's); the samplers run
deterministically (DDIM with eta 0, Euler without churn).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from pcdms.encoders import FrozenEncoders, check_images
from pcdms.io import sha256_folder
from pcdms.pose import draw_skeleton_batch, pose_to_vector, side_by_side

# The four samplers offered; all run deterministically (DDIM eta 0, no Euler churn),
# so the initial noise is the only random draw.
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
STAGES = {"full": (True, True), "B1": (False, False), "B2": (True, False), "B3": (False, True)}  # (prior, refine)
# Files of a generator folder that describe it rather than make it (notes, the training manifests and
# logs that reid-aug export-generator copies, its export record): left out of its identity hash.
DESCRIPTIVE_FILES = ("*.md", "training/*", "export.json")


def pipeline_sha256(folder: str | Path) -> str:
    """SHA-256 identifying a generator folder: every file :meth:`PCDMsPipeline.from_pretrained` may
    load (stages, schedules, bundled encoders, ``model_index.json``), not :data:`DESCRIPTIVE_FILES`,
    so that editing a generator's notes or logs does not make jobs started with it refuse to resume."""
    return sha256_folder(folder, exclude=DESCRIPTIVE_FILES)


def prior_schedule_config() -> dict:
    """Stage-1 noise schedule: cosine (Nichol & Dhariwal 2021), 1000 steps, x0 prediction."""
    return dict(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )


def latent_schedule_config(preset=None) -> dict:
    """Stage-2/3 noise schedule of ``preset`` (default: the paper's, SD 2.1-base ``scaled_linear``
    0.00085-0.012, 1000 steps, epsilon). A preset with ``latent_zero_terminal_snr`` gets betas
    rescaled to zero terminal SNR and "trailing" timestep spacing, so sampling starts from pure
    noise at t = 999 (Lin et al. 2024, Sec. 3.1-3.3)."""
    beta_schedule = getattr(preset, "latent_beta_schedule", "scaled_linear")
    zero_snr = bool(getattr(preset, "latent_zero_terminal_snr", False))
    config = dict(
        num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
        prediction_type=getattr(preset, "latent_prediction_type", "epsilon"), clip_sample=False,
        set_alpha_to_one=False, steps_offset=0 if zero_snr else 1,
        timestep_spacing="trailing" if zero_snr else "leading",
    )
    if zero_snr:
        config["rescale_betas_zero_snr"] = True
    return config


def check_sampler_steps(name: str, config: dict, num_inference_steps: int, what: str = "schedule") -> None:
    """Raise ValueError unless sampler ``name`` runs ``num_inference_steps`` steps on the noise schedule
    ``config`` (a ``scheduler_config.json`` mapping).

    Run before any network loads: the sampler's loop is stepped on a tiny tensor with a zero model
    output, which is what a trained model would be fed step by step, so every schedule-dependent
    failure (more steps than training timesteps, index errors at the last step of some
    solvers, non-finite values) shows here, in well under a second, rather than after loading.
    """
    import logging as _logging

    scheduler = make_scheduler(name, {k: v for k, v in config.items() if not k.startswith("_")})
    problem = None
    quiet = _logging.getLogger("diffusers.schedulers")  # "call scale_model_input first": not meant for a probe
    level = quiet.level
    quiet.setLevel(_logging.ERROR)
    try:
        scheduler.set_timesteps(num_inference_steps)
        x = torch.ones(1, 1, 2, 2)
        for t in scheduler.timesteps:
            x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
        if not torch.isfinite(x).all():
            problem = "it gives non-finite values"
    except (ValueError, IndexError, AssertionError, RuntimeError) as exc:
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'failed'}"
    finally:
        quiet.setLevel(level)
    if problem is not None:
        raise ValueError(f"the {name} sampler cannot take {num_inference_steps} steps on the {what} "
                         f"({config.get('num_train_timesteps')} training timesteps): {problem}; use fewer "
                         "steps (the paper samples with 50)")


def make_scheduler(name: str, config: dict):
    """A fresh sampler ``name`` (one of :data:`SCHEDULERS`) on the noise schedule ``config``."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpmsolver++" else {}
    return SCHEDULERS[name].from_config(dict(config), **extra)


def classifier_free_guidance(
    model: Callable[..., torch.Tensor],
    sample: torch.Tensor,
    timestep: torch.Tensor,
    cond: Sequence[torch.Tensor],
    uncond: Sequence[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Guided prediction ``uncond + scale * (cond - uncond)`` (PCDMs Eq. 2/4/6/8) in one batched call.

    ``model(sample, timestep, *conditions)``; ``sample`` (B, ...), ``timestep``
    scalar tensor; ``cond``/``uncond`` the condition tensors (B, ...) of both
    branches, in the model's argument order. ``scale == 1`` runs only the
    conditional branch.
    """
    b = sample.shape[0]
    if scale == 1.0:
        return model(sample, timestep.expand(b), *cond)
    inputs = [torch.cat([u, c]) for u, c in zip(uncond, cond)]
    out_uncond, out_cond = model(torch.cat([sample, sample]), timestep.expand(2 * b), *inputs).chunk(2)
    return out_uncond + scale * (out_cond - out_uncond)


def denoise(model, scheduler, noise: torch.Tensor, cond, uncond, scale: float, num_inference_steps: int,
            desc: str | None = None, init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """One stage's guided sampling loop from ``noise`` (B, ...) with ``scheduler``; the clean sample.
    ``desc``: a per-step tqdm bar with this label (None: no bar).

    ``strength`` < 1 with ``init`` (B, ...) (SDEdit, Meng et al., ICLR 2022; diffusers' img2img
    ``strength``): ``init`` is noised to the level of the ``sampler_start`` step and only the last
    ``int(num_inference_steps * strength)`` steps run. ``strength`` 1 starts from pure noise."""
    scheduler.set_timesteps(int(num_inference_steps), device=noise.device)
    timesteps = scheduler.timesteps
    if strength < 1.0:
        if init is None:
            raise ValueError("strength < 1 needs the init sample to start from")
        begin = sampler_start(int(num_inference_steps), strength) * scheduler.order
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):  # multistep and sigma-indexed samplers count from here
            scheduler.set_begin_index(begin)
        sample = scheduler.add_noise(init, noise, timesteps[:1])
    else:
        sample = noise * scheduler.init_noise_sigma
    for t in tqdm(timesteps, desc=desc, disable=desc is None, leave=False):
        model_input = scheduler.scale_model_input(sample, t)
        pred = classifier_free_guidance(model, model_input, t, cond, uncond, scale)
        sample = scheduler.step(pred, t, sample).prev_sample
    return sample


def sampler_start(num_inference_steps: int, strength: float) -> int:
    """Index of the first of ``num_inference_steps`` sampler steps that a run of ``strength`` in (0, 1]
    takes (:func:`denoise`): it runs ``int(num_inference_steps * strength)`` steps, as diffusers' img2img.

    Raises ``ValueError`` for a strength outside (0, 1] or one that leaves no step to run."""
    if not np.isfinite(strength) or not 0.0 < strength <= 1.0:
        raise ValueError(f"refine_strength must be in (0, 1], got {strength!r}")
    run = int(num_inference_steps * strength + 1e-9)  # 5 x 0.6 must run 3 steps, not 2.9999...
    if run < 1:
        raise ValueError(f"refine_strength {strength} of {num_inference_steps} steps runs no step; "
                         f"use at least {1 / num_inference_steps:.3g}")
    return num_inference_steps - run


def sample_prior(prior, source_embeds: torch.Tensor, source_pose: torch.Tensor, target_pose: torch.Tensor,
                 noise: torch.Tensor, guidance_scale: float, num_inference_steps: int, scheduler: str = "ddim",
                 schedule: dict | None = None, desc: str | None = None) -> torch.Tensor:
    """Stage 1 (PCDMs Eq. 4): target CLIP embeddings (B, D), raw (not standardised), sampled by the
    x0-predicting ``prior`` from ``noise`` (B, D) given source embeddings (B, D) and pose vectors
    (B, P) (:func:`pcdms.pose.pose_to_vector`). ``schedule``: default :func:`prior_schedule_config`.
    The pipeline's stage 1, and the embeddings stage 2 can be trained on (``LossConfig.prior_samples``)."""
    cond = (source_embeds, source_pose, target_pose)
    x0 = denoise(prior, make_scheduler(scheduler, schedule or prior_schedule_config()), noise, cond,
                 prior.null_condition(*cond), guidance_scale, num_inference_steps, desc)
    # The prior diffuses in a standardised space; stage 2 takes raw CLIP embeddings.
    return prior.denormalize_embeds(x0)


def canvas_conditions(
    source_images: torch.Tensor,
    source_keypoints,
    target_keypoints,
    vae_scale_factor: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage-2 pixel-space conditions (Sec. 3.3, Fig. 4), shared by training and sampling.

    Args:
        source_images: (B, 3, H, W) in [0, 1].
        source_keypoints, target_keypoints: (B, 18, 2) pixel (x, y) in an H x W image, -1 missing.
        vae_scale_factor: latent downsampling, for the mask resolution.

    Returns:
        pose_canvas (B, 3, H, 2W) [source skeleton | target skeleton] in [0, 1] (:func:`pose_canvas`);
        masked_canvas (B, 3, H, 2W) [source | black] (:func:`masked_canvas`);
        mask (B, 1, H/f, 2W/f) (:func:`canvas_mask`).
    """
    b, _, h, w = source_images.shape
    device, dtype = source_images.device, source_images.dtype
    poses = pose_canvas(source_keypoints, target_keypoints, (h, w)).to(device=device, dtype=dtype)
    mask = canvas_mask(b, (h, w), vae_scale_factor).to(device=device, dtype=dtype)
    return poses, masked_canvas(source_images), mask


def pose_canvas(source_keypoints, target_keypoints, image_size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, 2W) float [source skeleton | target skeleton] in [0, 1] (DESIGN.md §4 drawing), on CPU."""
    h, w = image_size
    skel_s = draw_skeleton_batch(_as_numpy(source_keypoints), (h, w), (h, w))
    skel_t = draw_skeleton_batch(_as_numpy(target_keypoints), (h, w), (h, w))
    return side_by_side(skel_s, skel_t)


def masked_canvas(source_images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, 2W) ``[source | black]``: the stage-2 masked image."""
    return side_by_side(source_images, torch.zeros_like(source_images))


def canvas_mask(batch: int, image_size: tuple[int, int], vae_scale_factor: int) -> torch.Tensor:
    """(B, 1, H/f, 2W/f) float: 1 on the known source half, 0 on the half to generate
    (the paper's "0 masked, 1 unmasked", as the release), on CPU."""
    lh, lw = image_size[0] // vae_scale_factor, image_size[1] // vae_scale_factor
    return torch.cat([torch.ones(batch, 1, lh, lw), torch.zeros(batch, 1, lh, lw)], dim=-1)


def _as_numpy(keypoints) -> np.ndarray:
    return keypoints.detach().cpu().numpy() if torch.is_tensor(keypoints) else np.asarray(keypoints)


@dataclass
class PCDMsOutput(BaseOutput):
    """``images``: final target images; ``coarse_images``: stage-2 output (the final images for B1/B2);
    ``global_embeds``: stage-1 target CLIP embeddings (B, D), raw (denormalised) as stage 2 takes them,
    None without the prior (B1, B3);
    ``intermediates``: conditions and latents, only with ``return_intermediates=True``.
    Images are (B, 3, H, W) tensors in [0, 1], (B, H, W, 3) float arrays, or PIL lists per ``output_type``.
    """

    images: object
    coarse_images: object
    global_embeds: torch.Tensor | None
    intermediates: dict | None = None


class PCDMsPipeline:
    """Prior, inpainting and refining networks + frozen encoders + their noise schedules.

    ``prior(noisy (B, D), t (B,), source_embeds, source_pose (B, 36), target_pose) -> x0`` (standardised;
    ``prior.denormalize_embeds`` maps it back to a raw CLIP embedding);
    ``inpaint(sample (B, C, h, 2w), t, mask, masked_latent, pose_canvas (B, 3, H, 2W), dino_tokens,
    global_embed) -> eps``; ``refine(sample (B, C, h, w), t, coarse_latent, dino_tokens) -> eps``; each
    with a ``null_condition`` giving its unconditional inputs. ``prior`` may be None (B1/B3 only),
    ``refine`` may be None (B1/B2 only).
    """

    def __init__(self, prior, inpaint, refine, encoders: FrozenEncoders, preset,
                 prior_schedule: dict | None = None, latent_schedule: dict | None = None, progress: bool = False):
        self.prior, self.inpaint, self.refine = prior, inpaint, refine
        self.encoders, self.preset = encoders, preset
        self.prior_schedule = dict(prior_schedule or prior_schedule_config())
        self.latent_schedule = dict(latent_schedule or latent_schedule_config(preset))
        self.progress = progress  # per-step tqdm bars; synthesis jobs show their own per-image bar

    @property
    def device(self) -> torch.device:
        return next(self.inpaint.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.inpaint.parameters()).dtype

    def to(self, device=None, dtype=None) -> "PCDMsPipeline":
        for module in (self.prior, self.inpaint, self.refine, self.encoders):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self

    def check_inputs(self, source_images, source_keypoints, target_keypoints, num_inference_steps, guidance_scale,
                     stages, scheduler, output_type, refine_strength=1.0) -> tuple[float, float, float]:
        """Raise ``ValueError`` naming the bad argument; return the per-stage guidance scales."""
        check_images(source_images, "source_images")
        b = source_images.shape[0]
        if tuple(source_images.shape[-2:]) != tuple(self.preset.image_size):
            raise ValueError(f"source_images are {tuple(source_images.shape[-2:])}, preset {self.preset.name!r} "
                             f"expects {tuple(self.preset.image_size)} (H, W); resize them and their keypoints")
        for name, kp in (("source_keypoints", source_keypoints), ("target_keypoints", target_keypoints)):
            if tuple(np.shape(kp)) != (b, 18, 2):
                raise ValueError(f"{name} must have shape ({b}, 18, 2) (x, y per joint), got {tuple(np.shape(kp))}")
        if stages not in STAGES:
            raise ValueError(f"stages must be one of {list(STAGES)}, got {stages!r}")
        use_prior, use_refine = STAGES[stages]
        if use_prior and self.prior is None or use_refine and self.refine is None:
            raise ValueError(f"stages={stages!r} needs the {'prior' if use_prior and self.prior is None else 'refine'} "
                             "model, which this pipeline was built without")
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}")
        sampler_start(int(num_inference_steps), refine_strength)
        if output_type not in ("pt", "np", "pil"):
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")
        return per_stage_guidance(guidance_scale)

    @torch.no_grad()
    def __call__(
        self,
        source_images: torch.Tensor,
        source_keypoints,
        target_keypoints,
        num_inference_steps: int = 50,
        guidance_scale: float | tuple[float, float, float] = 2.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        stages: str = "full",
        scheduler: str = "ddim",
        return_intermediates: bool = False,
        output_type: str = "pt",
        refine_strength: float = 1.0,
    ) -> PCDMsOutput:
        """Synthesize each source person in its target pose.

        Args:
            source_images: (B, 3, H, W) in [0, 1], (H, W) = ``preset.image_size``.
            source_keypoints, target_keypoints: (B, 18, 2) pixel (x, y) in an H x W image, -1 missing.
            num_inference_steps: sampler steps per stage (paper: DDIM, 50).
            guidance_scale: w of Eq. 4/6/8, one for all stages or (prior, inpaint, refine) (paper: 2.0).
            generator: seeds the initial noise (one generator, or one per sample for batch-independent
                results). All three initial noises are drawn up front in a fixed order, so the ablations
                share the inpainting noise for a given seed.
            stages: "full" | "B1" | "B2" | "B3" (Sec. 4.2).
            scheduler: "ddim" | "dpmsolver++" | "unipc" | "euler", for all stages.
            refine_strength: in (0, 1]; 1 (the paper) samples the refining stage from pure noise; below 1
                it starts from the coarse image's latent noised to that level and runs the last
                ``int(num_inference_steps * refine_strength)`` steps (SDEdit, Meng et al. 2022).
        """
        # 1. Check inputs.
        w_prior, w_inpaint, w_refine = self.check_inputs(
            source_images, source_keypoints, target_keypoints, num_inference_steps, guidance_scale, stages,
            scheduler, output_type, refine_strength)
        use_prior, use_refine = STAGES[stages]
        device, dtype, preset = self.device, self.dtype, self.preset
        b = source_images.shape[0]
        h, w = preset.latent_size
        c = preset.latent_channels
        source_images = source_images.to(device)
        noise = [randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                 for shape in ((b, preset.clip_embed_dim), (b, c, h, 2 * w), (b, c, h, w))]

        # 2. Encode conditions: CLIP embedding (prior), DINOv2 tokens, pose vectors, canvases, mask.
        enc = self.encoders
        dino_tokens = enc.dino(source_images.to(_dtype(enc.dino))).to(dtype)
        pose_canvas, masked_canvas, mask = canvas_conditions(
            source_images.to(dtype), source_keypoints, target_keypoints, preset.vae_scale_factor)
        masked_latent = enc.vae.encode(masked_canvas.to(_dtype(enc.vae))).to(dtype)

        # 3. Stage 1, prior (Eq. 4): x0-predicting denoiser on the target CLIP embedding.
        global_embeds = source_embeds = None
        if use_prior:
            source_embeds = enc.clip(source_images.to(_dtype(enc.clip))).to(dtype)
            hk, wk = preset.image_size
            poses = [torch.from_numpy(pose_to_vector(_as_numpy(kp), hk, wk)).to(device, dtype)
                     for kp in (source_keypoints, target_keypoints)]
            global_embeds = sample_prior(self.prior, source_embeds, *poses, noise[0], w_prior, num_inference_steps,
                                         scheduler, self.prior_schedule, "prior" if self.progress else None)

        # 4. Stage 2, inpainting (Eq. 6 as released): uncond drops DINOv2 tokens and global embedding only.
        if global_embeds is None:  # B1/B3: no global features, the null embedding takes their place
            placeholder = torch.zeros(b, preset.clip_embed_dim, device=device, dtype=dtype)
            global_embeds_in = self.inpaint.null_condition(dino_tokens, placeholder)[1]
        else:
            global_embeds_in = global_embeds
        null_dino, null_global = self.inpaint.null_condition(dino_tokens, global_embeds_in)
        shared = (mask, masked_latent, pose_canvas)
        canvas_latents = self._denoise(
            self.inpaint, make_scheduler(scheduler, self.latent_schedule), noise[1],
            (*shared, dino_tokens, global_embeds_in), (*shared, null_dino, null_global), w_inpaint,
            num_inference_steps, "inpaint")

        # 5. Decode: the whole canvas (the VAE decoder sees the seam with the source) and keep the target
        #    half, or, for presets whose canvas latent is two single-image latents, the target half alone
        #    (the source half is decoded only when the intermediates are asked for).
        if preset.canvas_latents == "joint":
            coarse_canvas = enc.vae.decode(canvas_latents.to(_dtype(enc.vae)))
            coarse_images = coarse_canvas[..., preset.image_size[1]:]
        else:
            source_half, target_half = canvas_latents.to(_dtype(enc.vae)).chunk(2, dim=-1)
            coarse_images = enc.vae.decode(target_half)
            coarse_canvas = (torch.cat([enc.vae.decode(source_half), coarse_images], dim=-1)
                             if return_intermediates else None)

        # 6. Stage 3, refining (Eq. 8): uncond drops the coarse latent and the DINOv2 tokens.
        coarse_latents = latents = None
        if use_refine:
            coarse_latents = enc.vae.encode(coarse_images.to(_dtype(enc.vae))).to(dtype)
            cond = (coarse_latents, dino_tokens)
            latents = self._denoise(self.refine, make_scheduler(scheduler, self.latent_schedule), noise[2],
                                    cond, self.refine.null_condition(*cond), w_refine, num_inference_steps, "refine",
                                    init=coarse_latents, strength=refine_strength)

        # 7. Decode (without refining, B1/B2, the coarse image is the result) and postprocess.
        images = enc.vae.decode(latents.to(_dtype(enc.vae))) if use_refine else coarse_images
        intermediates = None
        if return_intermediates:
            intermediates = dict(
                source_embeds=source_embeds, dino_tokens=dino_tokens, pose_canvas=pose_canvas,
                masked_canvas=masked_canvas, mask=mask, masked_latent=masked_latent, canvas_latents=canvas_latents,
                coarse_canvas=coarse_canvas, coarse_latents=coarse_latents, latents=latents)
        return PCDMsOutput(images=_postprocess(images, output_type),
                           coarse_images=_postprocess(coarse_images, output_type),
                           global_embeds=global_embeds, intermediates=intermediates)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``prior/``, ``inpaint/``, ``refine/`` (pcdms checkpoints), both noise schedules and
        ``model_index.json`` (written last: its presence marks a complete folder). Encoders are not
        saved: they are frozen pretrained weights loaded from their own paths."""
        from pcdms.checkpoint import save_model

        folder = Path(folder)
        stages = [name for name in ("prior", "inpaint", "refine") if getattr(self, name) is not None]
        for name in stages:
            save_model(getattr(self, name), folder / name)
        write_pipeline_index(folder, self.preset.name, stages, self.prior_schedule, self.latent_schedule)
        return folder

    @staticmethod
    def bundled_encoder_paths(folder: str | Path) -> dict[str, Path | None]:
        """Encoder folders a generator folder carries (``model_index.json`` "encoders": e.g. the toy
        generator's VAE and stand-in CLIP/DINOv2), as ``{"clip", "dino", "vae"}`` -> path or None."""
        from pcdms.io import read_json_object

        folder = Path(folder)
        index_path = folder / "model_index.json"
        names = read_json_object(index_path).get("encoders", {}) if index_path.is_file() else {}
        if not isinstance(names, dict):
            raise ValueError(f"{index_path}: 'encoders' must be an object")
        return {k: (folder / names[k] if k in names else None) for k in ("clip", "dino", "vae")}

    @classmethod
    def from_pretrained(cls, folder: str | Path, encoders: FrozenEncoders | None = None, preset=None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "PCDMsPipeline":
        """Load a folder written by :meth:`save_pretrained` (or ``train-pcdms``); ``preset`` defaults to
        the one named in ``model_index.json``. Stage networks must match the preset's configs.
        ``encoders`` None: the encoders the folder carries (:meth:`bundled_encoder_paths`); a missing
        one is a :class:`pcdms.encoders.WeightsNotFoundError`. Weights are cast to ``dtype`` (default float32,
        whatever dtype they are stored in)."""
        from pcdms.checkpoint import load_model
        from pcdms.encoders import build_encoders
        from pcdms.presets import get_preset

        folder = Path(folder)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: not a PCDMs pipeline folder (see save_pretrained)")
        index = json.loads(index_path.read_text())
        preset = preset if preset is not None else get_preset(index["preset"])
        if encoders is None:
            paths = cls.bundled_encoder_paths(folder)
            encoders = build_encoders(preset, paths["clip"], paths["dino"], paths["vae"])
        models = {}
        for name in ("prior", "inpaint", "refine"):
            if name not in index.get("stages", []):
                models[name] = None
                continue
            model = load_model(folder / name, device=device, dtype=dtype)
            # The prior's embedding statistics are data (computed on the training set), not size.
            want = getattr(preset, name)
            if name == "prior":
                import dataclasses

                want = dataclasses.replace(want, embed_mean=model.config.embed_mean, embed_std=model.config.embed_std)
            if model.config != want:
                raise ValueError(f"{folder / name}: {name} config differs from preset {preset.name!r}")
            models[name] = model
        if models["inpaint"] is None:
            raise ValueError(f"{index_path}: lists no 'inpaint' stage; every PCDMs variant needs it")
        schedules = []
        for sub in ("prior_scheduler", "latent_scheduler"):
            path = folder / sub / "scheduler_config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (written by save_pretrained)")
            schedules.append({k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")})
        encoders.to(device=device, dtype=dtype)
        return cls(models["prior"], models["inpaint"], models["refine"], encoders, preset, *schedules)

    def _denoise(self, model, scheduler, noise, cond, uncond, scale, num_inference_steps, name,
                 init=None, strength=1.0) -> torch.Tensor:
        """One stage's sampling loop from ``noise`` (:func:`denoise`); returns the final (clean) sample."""
        return denoise(model, scheduler, noise, cond, uncond, scale, num_inference_steps,
                       name if self.progress else None, init, strength)


def write_pipeline_index(folder: str | Path, preset_name: str, stages: Sequence[str], prior_schedule: dict,
                         latent_schedule: dict, **extra) -> Path:
    """Write the two noise schedules (``prior_scheduler/``, ``latent_scheduler/``) and then
    ``model_index.json`` (``preset``, ``stages`` and ``extra`` entries, e.g. bundled ``encoders``): the
    index is written last, so its presence marks a complete pipeline folder. Returns its path."""
    from pcdms.io import write_json_atomic

    folder = Path(folder)
    for sub, schedule in (("prior_scheduler", prior_schedule), ("latent_scheduler", latent_schedule)):
        config = dict(DDIMScheduler.from_config(schedule).config)
        write_json_atomic(folder / sub / "scheduler_config.json", {"_class_name": "DDIMScheduler", **config})
    index = {"_class_name": PCDMsPipeline.__name__, "preset": preset_name, "stages": list(stages), **extra}
    write_json_atomic(folder / "model_index.json", index)
    return folder / "model_index.json"


def per_stage_guidance(guidance_scale) -> tuple[float, float, float]:
    """``guidance_scale`` as ``(prior, inpaint, refine)``: one number serves all three stages.

    Raises ``ValueError`` for another count, a non-finite or a negative scale."""
    try:
        scales = ((float(guidance_scale),) * 3 if isinstance(guidance_scale, (int, float))
                  else tuple(float(s) for s in guidance_scale))
    except (TypeError, ValueError):
        scales = ()
    if len(scales) != 3:
        raise ValueError(f"guidance_scale must be one number or (prior, inpaint, refine), got {guidance_scale!r}")
    if any(not np.isfinite(w) or w < 0 for w in scales):
        raise ValueError(f"guidance_scale must be finite and >= 0, got {guidance_scale!r}")
    return scales


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _postprocess(images: torch.Tensor, output_type: str):
    images = images.float().clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
