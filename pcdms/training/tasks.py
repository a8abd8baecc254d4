"""What one training step of each stage reads and minimises (PCDMs Sec. 3.2-3.4, App. B; DESIGN.md §7).

A task turns pairs (and the encoder cache) into CPU tensors once, then gives
the loop three things: ``batch(indices)`` (a dict of per-sample tensors),
``draws(generator, n)`` (the step's random numbers for ``n`` samples: noise,
timesteps, condition-drop masks) and ``loss(model, batch, draws)``. The loop
draws for the whole global batch and slices per process, so several processes
and one process compute the same step.

- prior (Eq. 3): x0-prediction MSE on the standardised target CLIP embedding,
  cosine schedule, 1000 steps; conditions (source embedding, source pose,
  target pose) dropped jointly to the model's ``null_condition``.
- inpaint (Eq. 5): MSE on the preset's prediction target (epsilon for the paper
  preset, v for the toy one) over the whole [source | target] canvas latent
  (joint or per image, ``Preset.canvas_latents``);
  DINOv2 tokens and global embedding dropped jointly; the global embedding is
  the *target's* CLIP embedding (as the release trains it; stage 1 predicts it
  at sampling time).
- refine (Eq. 7): same loss on the target latent, conditioned on the latent of
  the coarse image stage 2 made for the pair; coarse latent and DINOv2 tokens
  dropped jointly.
- vae: reconstruction (L1 + MSE) plus a small KL term on diffusers'
  ``AutoencoderKL``, for presets without a pretrained VAE (the toy one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from pcdms.models.conditions import condition_masks
from pcdms.pipeline import canvas_mask, latent_schedule_config, pose_canvas, prior_schedule_config
from pcdms.pose import pose_to_vector
from pcdms.encoders import load_image_uint8
from pcdms.training.cache import EncoderCache
from pcdms.training.pairs import TrainingPair, person_box_weights


@dataclass(frozen=True)
class LossConfig:
    """Loss settings stored with every checkpoint.

    ``p_joint``: probability that all of a stage's conditions are dropped together (DESIGN §7: 0.1);
    ``p_extra``: independent extra drop per condition (the release: 0.1 each, joint 0);
    ``snr_gamma``: min-SNR-gamma loss weighting (Hang et al. 2023), None = plain MSE;
    ``noise_offset``: the release's offset noise (0.1), per sample and channel;
    ``global_noise``: stage 2 only: Gaussian noise of ``global_noise`` x the per-dimension std of the
    training targets' CLIP embeddings is added to the global embedding the model sees (noise
    augmentation of the image embedding, as unCLIP's decoder is trained: Ramesh et al. 2022, Sec. 2.1,
    and SD 2.1-unCLIP's ``noise_level``). Stage 2 learns from the *true* target embedding but samples
    with stage 1's estimate; the noise keeps it from leaning on details stage 1 cannot predict.
    0 = off (the paper);
    ``prior_samples``: stage 2 only: learn from this many embeddings per pair *sampled by the trained
    prior* (``prior_steps`` DDIM steps, guidance ``prior_guidance``; one picked at random per step)
    instead of the true target embedding, so stage 2 is trained on what stage 1 gives it at sampling
    time, as stage 3 learns from stage 2's images (DESIGN §7). 0 = the true embedding (the paper);
    ``vae_kl_weight``: KL weight of the VAE stage.
    """

    p_joint: float = 0.1
    p_extra: float = 0.0
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    global_noise: float = 0.0
    prior_samples: int = 0
    prior_steps: int = 10
    prior_guidance: float = 2.0
    vae_kl_weight: float = 1e-6

    def __post_init__(self) -> None:
        if self.prior_samples < 0 or self.prior_steps < 1 or self.prior_guidance < 0:
            raise ValueError(f"prior_samples must be >= 0, prior_steps >= 1 and prior_guidance >= 0, got "
                             f"{self.prior_samples}, {self.prior_steps}, {self.prior_guidance}")
        if self.global_noise < 0:
            raise ValueError(f"global_noise (--global-noise) must be >= 0, got {self.global_noise}")
        for name in ("p_joint", "p_extra"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive or None, got {self.snr_gamma}")


def diffusion_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   scheduler: DDPMScheduler, snr_gamma: float | None,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between ``pred`` and the scheduler's prediction target (epsilon | v | x0), optionally
    min-SNR weighted (weights normalised per prediction type as in Hang et al. 2023, Eq. 10).
    ``weight``: (B, 1, h, w) per-position weights of each sample's mean (None: plain mean)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    elif kind == "sample":
        target = x0
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if weight is None:
        err = err.flatten(1).mean(1)
    else:
        w = weight.to(err).expand_as(err).flatten(1)
        err = (err.flatten(1) * w).sum(1) / w.sum(1).clamp_min(1e-12)
    if snr_gamma is None:
        return err.mean()
    ac = scheduler.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac).clamp_min(1e-12)
    weight = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    weight = {"epsilon": weight / snr.clamp_min(1e-12), "v_prediction": weight / (snr + 1), "sample": weight}[kind]
    return (err * weight).mean()


class _DiffusionTask:
    """Shared draws of the three diffusion stages: noise, offset noise, timestep, drop masks."""

    num_conditions: int
    sample_shape: tuple[int, ...]

    def __init__(self, schedule: dict, loss: LossConfig):
        self.schedule = dict(schedule)
        self.scheduler = DDPMScheduler.from_config(self.schedule)
        self.loss_cfg = loss

    def draws(self, generator: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        noise = torch.randn((n, *self.sample_shape), generator=generator)
        if self.loss_cfg.noise_offset:
            offset = torch.randn((n, self.sample_shape[0]) + (1,) * (len(self.sample_shape) - 1), generator=generator)
            noise = noise + self.loss_cfg.noise_offset * offset
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator)
        masks = condition_masks(n, self.num_conditions, self.loss_cfg.p_joint, self.loss_cfg.p_extra, generator,
                                torch.device("cpu"))
        return {"noise": noise, "t": t, "masks": masks.T.contiguous()}  # (n, C): sliced by sample like the rest

    def _noisy(self, x0, draws):
        noise, t = draws["noise"].to(x0), draws["t"].to(x0.device)
        return self.scheduler.add_noise(x0, noise, t), noise, t

    def _loss(self, pred, x0, noise, t, weight=None):
        return diffusion_loss(pred, x0, noise, t, self.scheduler, self.loss_cfg.snr_gamma, weight)

    def _init_weights(self, pairs: Sequence[TrainingPair], image_size, scale: int) -> None:
        # Per-position loss weights only where some pair asks for them (TrainingPair.background_weight):
        # runs without any keep the plain mean, bit for bit.
        self.background_weights = np.array([p.background_weight for p in pairs])
        self.weighted = bool((self.background_weights != 1.0).any())
        self.target_keypoints = [p.keypoints()[1] for p in pairs] if self.weighted else None
        self.weight_size = (image_size, scale)

    def _target_weights(self, idx: torch.Tensor) -> torch.Tensor:
        ids = idx.tolist()
        return person_box_weights(np.stack([self.target_keypoints[i] for i in ids]), self.background_weights[ids],
                                  *self.weight_size)


def _pose_vectors(pairs: Sequence[TrainingPair], image_size) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = image_size
    src = np.stack([pose_to_vector(p.keypoints()[0], h, w) for p in pairs])
    tgt = np.stack([pose_to_vector(p.keypoints()[1], h, w) for p in pairs])
    return torch.from_numpy(src), torch.from_numpy(tgt)


class PriorTask(_DiffusionTask):
    """Stage 1 on cached CLIP embeddings; ``embed_stats`` = (mean, std) the model standardises with."""

    num_conditions = 3

    def __init__(self, pairs: Sequence[TrainingPair], cache: EncoderCache, embed_dim: int, image_size,
                 loss: LossConfig, progress: bool = False):
        super().__init__(prior_schedule_config(), loss)
        self.sample_shape = (embed_dim,)
        self.source_clip = cache.get_indexed("clip", [p.source for p in pairs], progress)
        self.target_clip = cache.get_indexed("clip", [p.target for p in pairs], progress)
        self.source_pose, self.target_pose = _pose_vectors(pairs, image_size)

    def __len__(self) -> int:
        return len(self.source_clip)

    def embed_stats(self) -> tuple[float, float]:
        """Scalar mean and std of the target embeddings (the release standardises with two scalars)."""
        values = self.target_clip.all()  # over pairs, as the loss sees them
        return float(values.mean()), float(values.std())

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"source_clip": self.source_clip[idx], "target_clip": self.target_clip[idx],
                "source_pose": self.source_pose[idx], "target_pose": self.target_pose[idx]}

    def loss(self, model, batch, draws) -> torch.Tensor:
        net = _unwrap(model)
        x0 = net.normalize_embeds(batch["target_clip"])
        noisy, noise, t = self._noisy(x0, draws)
        conds = net.drop_conditions(batch["source_clip"], batch["source_pose"], batch["target_pose"],
                                      masks=draws["masks"].T)
        return self._loss(model(noisy, t, *conds), x0, noise, t)


class InpaintTask(_DiffusionTask):
    """Stage 2 on cached latents, masked-canvas latents, DINOv2 tokens and CLIP embeddings."""

    num_conditions = 2

    def __init__(self, pairs: Sequence[TrainingPair], cache: EncoderCache, preset, loss: LossConfig,
                 progress: bool = False, prior=None, seed: int = 0):
        super().__init__(latent_schedule_config(preset), loss)
        h, w = preset.latent_size
        self.sample_shape = (preset.latent_channels, h, 2 * w)
        self.image_size, self.f = preset.image_size, preset.vae_scale_factor
        src, tgt = [p.source for p in pairs], [p.target for p in pairs]
        self.joint = preset.canvas_latents == "joint"
        if self.joint:  # the exact clean canvas latent of each pair (the release's target)
            self.canvas_latent = cache.get_pairs(src, tgt, progress)
        else:
            self.source_latent = cache.get_indexed("latent", src, progress)
            self.target_latent = cache.get_indexed("latent", tgt, progress)
        self.masked_latent = cache.get_indexed("masked_latent", src, progress)
        self.dino = cache.get_indexed("dino", src, progress)
        self.target_clip = cache.get_indexed("clip", tgt, progress)
        self._init_weights(pairs, preset.image_size, preset.vae_scale_factor)
        self.global_std = None  # (D,) for loss.global_noise
        if loss.global_noise:
            if len(pairs) < 2:
                raise ValueError("global_noise needs at least 2 training pairs (the per-dimension std)")
            self.global_std = self.target_clip.all().std(0)
        self.keypoints = [p.keypoints() for p in pairs]
        self.global_samples = None  # (M, S, D): loss.prior_samples stage-1 embeddings per pair
        if loss.prior_samples:
            if prior is None:
                raise ValueError("prior_samples > 0 needs the trained prior (stage 1) to sample from")
            source_pose, target_pose = _pose_vectors(pairs, preset.image_size)
            self.global_samples = prior_embedding_samples(
                prior, cache.get_indexed("clip", src, progress), source_pose, target_pose, loss, seed, progress)

    def __len__(self) -> int:
        return len(self.masked_latent)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        kps = [self.keypoints[i] for i in idx.tolist()]
        poses = pose_canvas(np.stack([k[0] for k in kps]), np.stack([k[1] for k in kps]), self.image_size)
        # Preset.canvas_latents: the joint canvas latent, or two single-image latents side by side.
        x0 = (self.canvas_latent[idx] if self.joint
              else torch.cat([self.source_latent[idx], self.target_latent[idx]], dim=-1))
        out = {"x0": x0, "masked_latent": self.masked_latent[idx], "pose_canvas": poses,
               "mask": canvas_mask(len(idx), self.image_size, self.f), "dino": self.dino[idx],
               "global": (self.target_clip[idx] if self.global_samples is None else self.global_samples[idx])}
        if self.weighted:  # the source half keeps weight 1; the target half per its background weight
            target = self._target_weights(idx)
            out["weight"] = torch.cat([torch.ones_like(target), target], dim=-1)
        return out

    def draws(self, generator: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        out = super().draws(generator, n)
        # Drawn last: runs without these keep their random stream.
        if self.loss_cfg.global_noise:
            out["global_noise"] = torch.randn((n, self.target_clip.table.shape[-1]), generator=generator)
        if self.loss_cfg.prior_samples:
            out["global_pick"] = torch.randint(0, self.loss_cfg.prior_samples, (n,), generator=generator)
        return out

    def loss(self, model, batch, draws) -> torch.Tensor:
        x0 = batch["x0"]
        noisy, noise, t = self._noisy(x0, draws)
        global_embed = batch["global"]
        if self.loss_cfg.prior_samples:  # (B, S, D): this step's pick of each pair's stage-1 samples
            global_embed = global_embed[torch.arange(len(global_embed)), draws["global_pick"].to(global_embed.device)]
        if self.loss_cfg.global_noise:
            scale = self.loss_cfg.global_noise * self.global_std.to(global_embed)
            global_embed = global_embed + scale * draws["global_noise"].to(global_embed)
        dino, global_embed = _unwrap(model).drop_conditions(batch["dino"], global_embed, masks=draws["masks"].T)
        pred = model(noisy, t, batch["mask"], batch["masked_latent"], batch["pose_canvas"], dino, global_embed)
        return self._loss(pred, x0, noise, t, batch.get("weight"))


@torch.no_grad()
def prior_embedding_samples(prior, source_clip, source_pose: torch.Tensor, target_pose: torch.Tensor,
                            loss: LossConfig, seed: int, progress: bool = False,
                            batch_size: int = 4096) -> torch.Tensor:
    """(M, S, D) target CLIP embeddings sampled by ``prior`` for M pairs, S = ``loss.prior_samples``
    (:func:`pcdms.pipeline.sample_prior`, DDIM ``loss.prior_steps`` steps, guidance ``loss.prior_guidance``).
    ``source_clip``: (M, D) rows (or :class:`~pcdms.training.cache.Indexed`); poses (M, P).
    Sample s of pair i starts from row i of ``randn((M, D))`` seeded with ``(seed, s)``: the result does
    not depend on ``batch_size``."""
    from tqdm.auto import tqdm

    from pcdms.pipeline import sample_prior

    m = len(source_pose)
    dim = prior.config.embed_dim
    device, dtype = next(prior.parameters()).device, next(prior.parameters()).dtype
    was_training = prior.training
    prior.eval()
    out = torch.empty(m, loss.prior_samples, dim)
    try:
        with tqdm(total=m * loss.prior_samples, desc="prior samples", disable=not progress, leave=False) as bar:
            for s in range(loss.prior_samples):
                noise = torch.randn((m, dim), generator=torch.Generator().manual_seed(seed * 1000 + s))
                for start in range(0, m, batch_size):
                    idx = torch.arange(start, min(start + batch_size, m))
                    args = [x.to(device, dtype) for x in (source_clip[idx], source_pose[idx], target_pose[idx],
                                                          noise[idx])]
                    out[idx, s] = sample_prior(prior, *args, loss.prior_guidance, loss.prior_steps).float().cpu()
                    bar.update(len(idx))
    finally:
        prior.train(was_training)
    return out


class RefineTask(_DiffusionTask):
    """Stage 3: target latent given the coarse stage-2 image of the pair (``coarse[i]`` for ``pairs[i]``)."""

    num_conditions = 2

    def __init__(self, pairs: Sequence[TrainingPair], coarse: Sequence, cache: EncoderCache, preset,
                 loss: LossConfig, progress: bool = False):
        if len(coarse) != len(pairs):
            raise ValueError(f"refine needs one coarse image per pair: {len(coarse)} coarse for {len(pairs)} pairs")
        super().__init__(latent_schedule_config(preset), loss)
        self.sample_shape = (preset.latent_channels, *preset.latent_size)
        self.target_latent = cache.get_indexed("latent", [p.target for p in pairs], progress)
        self.coarse_latent = cache.get_indexed("latent", list(coarse), progress)
        self.dino = cache.get_indexed("dino", [p.source for p in pairs], progress)
        self._init_weights(pairs, preset.image_size, preset.vae_scale_factor)

    def __len__(self) -> int:
        return len(self.target_latent)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"x0": self.target_latent[idx], "coarse": self.coarse_latent[idx], "dino": self.dino[idx]}
        if self.weighted:
            out["weight"] = self._target_weights(idx)
        return out

    def loss(self, model, batch, draws) -> torch.Tensor:
        x0 = batch["x0"]
        noisy, noise, t = self._noisy(x0, draws)
        coarse, dino = _unwrap(model).drop_conditions(batch["coarse"], batch["dino"], masks=draws["masks"].T)
        return self._loss(model(noisy, t, coarse, dino), x0, noise, t, batch.get("weight"))


class VaeTask:
    """Autoencoder on whole images (random horizontal flips): L1 + MSE reconstruction + KL."""

    def __init__(self, images: Sequence, image_size, latent_shape: tuple[int, ...], loss: LossConfig,
                 progress: bool = False):
        from tqdm.auto import tqdm

        self.images = torch.stack([load_image_uint8(p, image_size)
                                   for p in tqdm(images, desc="loading images", disable=not progress, leave=False)])
        self.latent_shape = tuple(latent_shape)
        self.loss_cfg = loss

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"images": self.images[idx].float() / 255.0}

    def draws(self, generator: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        return {"flip": torch.rand(n, generator=generator) < 0.5,
                "noise": torch.randn((n, *self.latent_shape), generator=generator)}

    def loss(self, model, batch, draws) -> torch.Tensor:
        x = batch["images"]
        x = torch.where(draws["flip"].view(-1, 1, 1, 1).to(x.device), x.flip(-1), x) * 2 - 1
        recon, kl = model(x, draws["noise"].to(x))
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        return rec + self.loss_cfg.vae_kl_weight * kl.mean()


class VaeForward(torch.nn.Module):
    """``AutoencoderKL`` as one forward (``x`` in [-1, 1], posterior noise) -> (reconstruction, KL), so
    DistributedDataParallel can wrap it; ``.vae`` is what gets saved."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(x).latent_dist
        z = dist.mean + dist.std * noise
        return self.vae.decode(z).sample, dist.kl()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel wrapper (its methods; forward goes through the wrapper)."""
    return getattr(model, "module", model)
