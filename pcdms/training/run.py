"""Train one stage into a generator folder: the pieces around :func:`pcdms.training.loop.train`.

A generator folder holds everything a trained PCDMs pipeline needs, written
stage by stage, and is itself loadable with ``PCDMsPipeline.from_pretrained``::

    GEN/vae/                 AutoencoderKL (toy preset: trained with stage "vae")
    GEN/clip/, GEN/dino/     stand-in encoders (random frozen, seeded) when no pretrained ones
    GEN/prior/ inpaint/ refine/   stage folders (config.json + model.safetensors)
    GEN/model_index.json     stages present, encoders, schedules (rewritten after each export)
    GEN/train/<stage>/       checkpoints/, log.csv, pairs.csv, manifest.json
    GEN/cache/               frozen-encoder outputs (pcdms.training.cache)
    GEN/coarse/              stage-2 images of the training pairs, for stage 3 (make_coarse)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pcdms.devices import resolve_device
from pcdms.io import read_json_object, sha256_folder, write_json_atomic
from pcdms.training.pairs import TrainingPair, write_pairs_table

ENCODER_FOLDERS = {"clip": "clip", "dino": "dino", "vae": "vae"}
STAND_IN_NOTE = ("stand-in encoder: random frozen weights (seeded), not the pretrained OpenCLIP / DINOv2; "
                 "results with it are a toy, not comparable with the paper")


def pairs_sha256(pairs: Sequence[TrainingPair], extra: Sequence[str] = ()) -> str:
    """Identity of a training set: hash of the ordered (source, target[, extra]) names, keypoints and
    background weights (where not 1)."""
    h = hashlib.sha256()
    for i, p in enumerate(pairs):
        h.update(f"{p.source.name}|{p.source_keypoints}|{p.target.name}|{p.target_keypoints}".encode())
        if p.background_weight != 1.0:  # only then: runs made before the weight existed keep their identity
            h.update(f"|background_weight={p.background_weight!r}".encode())
        if extra:
            h.update(str(extra[i]).encode())
    return h.hexdigest()


def make_stand_in_encoders(gen_dir: str | os.PathLike, preset, seed: int) -> None:
    """Write seeded random stand-ins for CLIP and DINOv2 into ``gen_dir/clip`` and ``gen_dir/dino``
    (once: existing ones are kept if made with the same seed, else ``ValueError``)."""
    from pcdms.encoders import ClipImageEncoder, DinoEncoder, stand_in_configs

    gen_dir = Path(gen_dir)
    note = gen_dir / "stand_in.json"
    if note.is_file():
        stored = read_json_object(note).get("seed")
        if stored != seed:
            raise ValueError(f"{note}: stand-in encoders were made with seed {stored}, not {seed}")
        return
    configs = stand_in_configs(preset)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip = ClipImageEncoder(configs["clip"])
        dino = DinoEncoder.from_config(configs["dino"])
    clip.save_pretrained(gen_dir / "clip")
    dino.save_pretrained(gen_dir / "dino")
    write_json_atomic(note, {"seed": seed, "encoders": ["clip", "dino"], "note": STAND_IN_NOTE})


_ENCODER_FLAGS = {"vae": ("--vae", "train it with --stage vae (toy and tiny presets)"),
                  "clip": ("--clip-checkpoint", "or --stand-in-encoders SEED"),
                  "dino": ("--dino", "or --stand-in-encoders SEED")}


def generator_encoder_paths(gen_dir, clip_path=None, dino_path=None, vae_path=None,
                            names=("clip", "dino", "vae")) -> dict[str, Path]:
    """The encoder paths of a training run for ``names``: a given path, else ``gen_dir``'s own folder.
    Raises :class:`pcdms.encoders.WeightsNotFoundError` naming the option for a missing one."""
    from pcdms.encoders import WeightsNotFoundError

    given = {"clip": clip_path, "dino": dino_path, "vae": vae_path}
    paths = {}
    for name in names:
        own = Path(gen_dir) / ENCODER_FOLDERS[name]
        if given[name] is None and not own.is_dir():
            flag, hint = _ENCODER_FLAGS[name]
            raise WeightsNotFoundError(f"{own} not found and no {flag} given: pass {flag} ({hint})")
        paths[name] = Path(given[name]) if given[name] is not None else own
    return paths


def load_generator_encoders(gen_dir, preset, clip_path=None, dino_path=None, vae_path=None, device="cpu"):
    """Frozen encoders for training into ``gen_dir`` (:func:`generator_encoder_paths`) and their paths."""
    from pcdms.encoders import build_encoders

    paths = generator_encoder_paths(gen_dir, clip_path, dino_path, vae_path)
    return build_encoders(preset, paths["clip"], paths["dino"], paths["vae"], device=device), paths


def write_model_index(gen_dir: str | os.PathLike, preset) -> Path | None:
    """(Re)write ``gen_dir``'s pipeline index and schedules for the stages and encoders present
    (:func:`pcdms.pipeline.write_pipeline_index`); None (nothing written) while there is no inpaint stage."""
    from pcdms.pipeline import latent_schedule_config, prior_schedule_config, write_pipeline_index

    gen_dir = Path(gen_dir)
    stages = [s for s in ("prior", "inpaint", "refine") if (gen_dir / s / "config.json").is_file()]
    if "inpaint" not in stages:
        return None
    extra = {"encoders": {k: v for k, v in ENCODER_FOLDERS.items() if (gen_dir / v).is_dir()}}
    if (gen_dir / "stand_in.json").is_file():
        extra["stand_in"] = read_json_object(gen_dir / "stand_in.json")
    return write_pipeline_index(gen_dir, preset.name, stages, prior_schedule_config(),
                                latent_schedule_config(preset), **extra)


def write_run_manifest(run_dir: Path, **fields) -> None:
    write_json_atomic(Path(run_dir) / "manifest.json", {"step": "train-pcdms", **fields})


def folder_sha256(path: Path) -> str | None:
    return sha256_folder(path) if Path(path).is_dir() else None


def config_dict(obj) -> dict:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)


@torch.no_grad()
def vae_scaling_factor(vae, images: torch.Tensor, batch: int = 64) -> float:
    """1 / std of the VAE's posterior-mean latents on ``images`` (B, 3, H, W) in [0, 1]: the
    ``scaling_factor`` that gives the diffusion stages unit-variance latents (as SD's 0.18215)."""
    zs = [vae.encode(images[i:i + batch] * 2 - 1).latent_dist.mode() for i in range(0, len(images), batch)]
    return float(1.0 / torch.cat(zs).float().std())


@torch.no_grad()
def vae_psnr(vae, images: torch.Tensor, batch: int = 64) -> float:
    """Mean PSNR (dB, images in [0, 1]) of posterior-mean reconstructions of ``images`` (B, 3, H, W)."""
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        recon = ((vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
        mse = (recon - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        out.append(10 * torch.log10(1.0 / mse))
    return float(torch.cat(out).mean())


def _remove_run(run_dir: Path) -> None:
    """--overwrite: rank 0 removes an earlier run's folder (checkpoints, log, manifest); all ranks wait."""
    import shutil

    from pcdms.training.loop import barrier

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0 and run_dir.exists():
        shutil.rmtree(run_dir)
    barrier()


def _device(device) -> torch.device:
    return resolve_device(device)


def train_vae(
    images: Sequence[Path], gen_dir: str | os.PathLike, preset, cfg, loss, *, heldout: Sequence[Path] = (),
    resume=None, device=None, progress: bool = True, overwrite: bool = False,
) -> dict:
    """Train the preset's stand-in VAE (diffusers ``AutoencoderKL``) on ``images`` into ``gen_dir/vae``.

    After training, ``scaling_factor`` is set to 1 / std of the training latents. Returns
    ``{"psnr_train": dB, "psnr_heldout": dB or None, "scaling_factor": ...}`` (posterior-mean
    reconstructions, at most 256 images each).
    """
    from diffusers import AutoencoderKL

    from pcdms.encoders import stand_in_configs
    from pcdms.encoders import load_image
    from pcdms.training.loop import barrier, train
    from pcdms.training.tasks import VaeForward, VaeTask

    gen_dir, dev = Path(gen_dir), _device(device)
    run_dir = gen_dir / "train" / "vae"
    vae_config = stand_in_configs(preset)["vae"]
    h, w = preset.latent_size
    task = VaeTask(images, preset.image_size, (preset.latent_channels, h, w), loss, progress)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        vae = AutoencoderKL(**vae_config)
    identity = {"stage": "vae", "preset": preset.name, "model_config": dict(vae_config),
                "data_sha256": hashlib.sha256("\n".join(p.name for p in images).encode()).hexdigest()}
    wrapper = VaeForward(vae)
    if overwrite:
        _remove_run(run_dir)
    train(wrapper, task, cfg, run_dir, identity=identity, resume=resume, device=dev, progress=progress)
    barrier()
    vae = wrapper.vae.eval()
    sample = task.images[:256].float().to(dev) / 255
    vae.register_to_config(scaling_factor=vae_scaling_factor(vae, sample))
    held = (torch.stack([load_image(p, preset.image_size) for p in list(heldout)[:256]]).to(dev) if heldout
            else None)
    metrics = {"psnr_train": vae_psnr(vae, sample), "psnr_heldout": vae_psnr(vae, held) if held is not None else None,
               "scaling_factor": vae.config.scaling_factor}
    vae.save_pretrained(str(gen_dir / "vae"), safe_serialization=True)
    write_run_manifest(run_dir, stage="vae", preset=preset.name, identity=identity, train=config_dict(cfg),
                       loss=config_dict(loss), images=len(images), heldout_images=len(list(heldout)[:256]),
                       metrics=metrics, output=str(gen_dir / "vae"), output_sha256=folder_sha256(gen_dir / "vae"))
    return metrics


def init_prior_from_kandinsky(model, folder: str | os.PathLike) -> dict[str, list[str]]:
    """Copy a local Kandinsky-2.2 prior's transformer blocks, time embedding, ``norm_out`` and
    ``prd_embedding`` into ``model`` (a ``PosePriorTransformer``), as the PCDMs release starts stage 1.

    ``folder``: a diffusers ``PriorTransformer`` folder (``prior/`` subfolder or bare) with
    ``diffusion_pytorch_model.safetensors``. Returns ``{"copied": [...], "kept_init": [...]}``.
    Raises ``FileNotFoundError`` (no weights) or ``ValueError`` listing what does not fit.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    name = "diffusion_pytorch_model.safetensors"
    file = next((c for c in (folder / "prior" / name, folder / name) if c.is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{folder}: no prior/{name} (nor {name}); needed: a Kandinsky-2.2 prior diffusers "
                                "folder (Hugging Face repo kandinsky-community/kandinsky-2-2-prior)")
    theirs = load_file(str(file))
    ours = model.state_dict()
    wanted = [k for k in ours if k.startswith(("transformer_blocks.", "time_embedding.", "norm_out."))
              or k == "prd_embedding"]
    absent = [k for k in wanted if k not in theirs]
    bad = [f"{k}: {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}" for k in wanted
           if k in theirs and theirs[k].shape != ours[k].shape]
    if absent or bad:
        raise ValueError(f"{file} does not fit this prior (width {model.config.width}, "
                         f"{model.config.num_layers} blocks): missing {absent[:10]}{' ...' if len(absent) > 10 else ''}"
                         f"; shape mismatches {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    with torch.no_grad():
        for k in wanted:
            ours[k].copy_(theirs[k])
    return {"copied": wanted, "kept_init": sorted(set(ours) - set(wanted))}


def _init_model(stage: str, preset, init, embed_stats, task, seed: int):
    from pcdms.models import build_stage, init_from_stable_diffusion

    config = getattr(preset, stage)
    if stage == "prior" and embed_stats == "train":
        mean, std = task.embed_stats()
        config = dataclasses.replace(config, embed_mean=mean, embed_std=std)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_stage(stage, config, preset.name)
    if init is None:
        return model, {"init": "random"}
    init = Path(init)
    if (init / "config.json").is_file() and (init / "model.safetensors").is_file():  # a pcdms stage folder
        _init_from_stage_folder(model, stage, init)
        return model, {"init": str(init), "init_sha256": folder_sha256(init), "kept_init": []}
    # A pcdms generator folder (its stage folders hold model.safetensors; Kandinsky's prior/ holds diffusers files).
    if (init / stage / "model.safetensors").is_file():
        raise ValueError(f"--init {init} is a whole generator folder; give its stage: --init {init / stage}")
    got = init_prior_from_kandinsky(model, init) if stage == "prior" else init_from_stable_diffusion(model, init)
    return model, {"init": str(init), "kept_init": got["kept_init"]}


def _init_from_stage_folder(model, stage: str, folder) -> None:
    """Fine-tuning: copy every weight of a trained ``stage`` folder (pcdms ``save_model``) into ``model``.
    The architecture must be the same; the prior's embedding statistics stay the new training set's.
    ``ValueError`` naming what differs."""
    from pcdms.checkpoint import load_model, read_config

    got_stage, _, config = read_config(folder)
    if got_stage != stage:
        raise ValueError(f"--init {folder} holds the {got_stage} stage, not the {stage} stage")
    ours, theirs = dataclasses.asdict(model.config), dataclasses.asdict(config)
    differ = sorted(k for k in ours if k not in ("embed_mean", "embed_std") and ours[k] != theirs.get(k))
    if differ:
        raise ValueError(f"--init {folder}: architecture differs from this preset's {stage} in "
                         + ", ".join(f"{k} ({theirs.get(k)} vs {ours[k]})" for k in differ))
    model.load_state_dict(load_model(folder, dtype=torch.float32).state_dict())


def read_coarse_table(coarse_dir: str | os.PathLike, pairs: Sequence[TrainingPair]) -> list[Path]:
    """Coarse image of each pair from ``coarse_dir/coarse.csv`` (written by :func:`make_coarse`);
    ``ValueError`` naming the first pair without one."""
    import csv

    coarse_dir = Path(coarse_dir)
    table = coarse_dir / "coarse.csv"
    if not table.is_file():
        raise FileNotFoundError(f"{table} not found: run make-coarse with the trained inpaint stage first")
    with open(table, newline="") as f:
        rows = {(r["source"], r["target"]): coarse_dir / r["coarse"] for r in csv.DictReader(f)}
    out = []
    for p in pairs:
        path = rows.get((p.source.name, p.target.name))
        if path is None or not path.is_file():
            raise ValueError(f"{table}: no coarse image for pair {p.source.name} -> {p.target.name}; the pairs are "
                             "drawn from --subset, --per-source and --seed, so give make-coarse the same three (or a "
                             "--pairs file)")
        out.append(path)
    return out


def train_diffusion_stage(
    stage: str, pairs: Sequence[TrainingPair], gen_dir: str | os.PathLike, preset, cfg, loss, *,
    init=None, embed_stats: str = "train", clip_path=None, dino_path=None, vae_path=None,
    stand_in_seed: int | None = None, coarse_dir=None, resume=None, device=None, progress: bool = True,
    sources: dict | None = None, overwrite: bool = False,
) -> dict:
    """Train ``stage`` ("prior" | "inpaint" | "refine") on ``pairs`` into ``gen_dir/<stage>``.

    Encoders: the given paths, else ``gen_dir``'s own (``stand_in_seed`` first writes seeded random
    stand-ins for CLIP/DINOv2 there). Refine reads the coarse image of every pair from
    ``coarse_dir`` (default ``gen_dir/coarse``, see :func:`make_coarse`). Returns
    ``{"output", "step", "final_loss"}``. Raises ``ValueError`` / ``FileNotFoundError`` /
    :class:`pcdms.training.loop.ResumeError` with the cause.
    """
    from pcdms.checkpoint import save_model
    from pcdms.training.cache import EncoderCache
    from pcdms.training.loop import barrier, read_log, train
    from pcdms.training.tasks import InpaintTask, PriorTask, RefineTask

    if stage not in ("prior", "inpaint", "refine"):
        raise ValueError(f"unknown diffusion stage {stage!r}")
    if init is not None and not Path(init).exists():
        raise FileNotFoundError(f"--init {init}: folder not found")
    gen_dir, dev = Path(gen_dir), _device(device)
    run_dir = gen_dir / "train" / stage
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    generator_encoder_paths(gen_dir, vae_path=vae_path, names=("vae",))  # before writing any stand-in
    if stage == "inpaint" and loss.prior_samples and not (gen_dir / "prior" / "config.json").is_file():
        raise FileNotFoundError(f"{gen_dir / 'prior'}: no trained prior; --prior-samples needs stage 1 first")
    if stand_in_seed is not None and rank == 0:
        make_stand_in_encoders(gen_dir, preset, stand_in_seed)
    barrier()
    encoders, enc_paths = load_generator_encoders(gen_dir, preset, clip_path, dino_path, vae_path, device=dev)
    coarse = read_coarse_table(coarse_dir or gen_dir / "coarse", pairs) if stage == "refine" else None
    prior = None
    if stage == "inpaint" and loss.prior_samples:  # stage 2 learns from stage 1's samples
        from pcdms.checkpoint import load_model

        prior = load_model(gen_dir / "prior", device=dev, dtype=torch.float32)
    def build_task():
        cache = EncoderCache(gen_dir / "cache", encoders, preset.image_size)
        if stage == "prior":
            return cache, PriorTask(pairs, cache, preset.clip_embed_dim, preset.image_size, loss, progress)
        if stage == "inpaint":
            return cache, InpaintTask(pairs, cache, preset, loss, progress, prior=prior, seed=cfg.seed)
        return cache, RefineTask(pairs, coarse, cache, preset, loss, progress)

    # Rank 0 fills the cache, then the others read it: never two writers on one shard.
    if rank == 0:
        cache, task = build_task()
    barrier()
    if rank != 0:
        cache, task = build_task()
    model, init_report = _init_model(stage, preset, init, embed_stats, task, cfg.seed)
    if overwrite:  # only now: every input, the starting weights included, has been checked
        _remove_run(run_dir)
    identity = {"stage": stage, "preset": preset.name, "model_config": dataclasses.asdict(model.config),
                "data_sha256": pairs_sha256(pairs, [c.name for c in coarse] if coarse else ()),
                "loss": config_dict(loss), "encoders_sha256": dict(cache.hashes)}
    if prior is not None:
        identity["prior_sha256"] = folder_sha256(gen_dir / "prior")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_pairs_table(run_dir / "pairs.csv", pairs)

    def export(weights, step):
        save_model(weights, gen_dir / stage)
        write_model_index(gen_dir, preset)
        write_run_manifest(run_dir, stage=stage, preset=preset.name, identity=identity, train=config_dict(cfg),
                           complete=step >= cfg.max_steps, exported_step=step, pairs=len(pairs),
                           sources=sources or {}, init=init_report, embed_stats=embed_stats,
                           encoders={k: str(v) for k, v in enc_paths.items()},
                           output=str(gen_dir / stage), output_sha256=folder_sha256(gen_dir / stage))

    train(model, task, cfg, run_dir, identity=identity, resume=resume, device=dev, progress=progress,
          on_checkpoint=export)
    rows = read_log(run_dir)
    final_loss = rows[-1]["loss"] if rows else None
    return {"output": str(gen_dir / stage), "step": cfg.max_steps, "final_loss": final_loss}


def _pair_seed(seed: int, pair: TrainingPair) -> int:
    digest = hashlib.sha256(f"{seed}|{pair.source.name}|{pair.target.name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_coarse(
    pairs: Sequence[TrainingPair], gen_dir: str | os.PathLike, *, out: str | os.PathLike | None = None,
    num_inference_steps: int = 20, guidance_scale: float = 2.0, scheduler: str = "ddim", seed: int = 0,
    batch_size: int = 32, device=None, progress: bool = True,
) -> Path:
    """Stage-2 (coarse) images of ``pairs`` made by the trained generator in ``gen_dir``: the inputs
    stage 3 learns from (the release trains refining on stage-2 outputs, not ground truth).

    Uses prior + inpaint (ablation B2) when ``gen_dir`` has a prior, else inpaint only (B1).
    Writes ``out`` (default ``gen_dir/coarse``): ``<source stem>__<target stem>.png`` per pair,
    ``coarse.csv`` (source, target, coarse) and ``manifest.json``. Each image is a function of
    its pair and ``seed`` (one noise generator per pair), so a killed run resumes by running again:
    existing images are kept.
    """
    import csv

    from tqdm.auto import tqdm

    from pcdms.io import atomic_path, sha256_file
    from pcdms.pipeline import PCDMsPipeline
    from pcdms.encoders import load_image

    gen_dir, dev = Path(gen_dir), _device(device)
    out = Path(out) if out is not None else gen_dir / "coarse"
    pipe = PCDMsPipeline.from_pretrained(gen_dir, device=dev)
    stages = "B2" if pipe.prior is not None else "B1"
    names = [f"{p.source.stem}__{p.target.stem}.png" for p in pairs]
    todo = [i for i, n in enumerate(names) if not (out / n).is_file()]
    out.mkdir(parents=True, exist_ok=True)
    settings = {"stages": stages, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                "scheduler": scheduler, "seed": seed,
                "checkpoints_sha256": {s: folder_sha256(gen_dir / s) for s in ("prior", "inpaint")}}
    manifest = out / "manifest.json"
    if manifest.is_file() and read_json_object(manifest).get("settings") != settings:
        raise ValueError(f"{manifest}: coarse images there were made with other settings or checkpoints; "
                         "use another --out or delete the folder")
    write_json_atomic(manifest, {"step": "make-coarse", "settings": settings, "complete": False})
    h, w = pipe.preset.image_size
    with tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="make-coarse", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            src = torch.stack([load_image(pairs[i].source, (h, w)) for i in chunk])
            kps = [pairs[i].keypoints() for i in chunk]
            gens = [torch.Generator().manual_seed(_pair_seed(seed, pairs[i])) for i in chunk]
            result = pipe(src, torch.tensor(np.stack([k[0] for k in kps])), torch.tensor(np.stack([k[1] for k in kps])),
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=gens,
                          stages=stages, scheduler=scheduler, output_type="pil")
            for i, img in zip(chunk, result.coarse_images):
                with atomic_path(out / names[i]) as tmp:
                    img.save(tmp)
            bar.update(len(chunk))
    with atomic_path(out / "coarse.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["source", "target", "coarse"])
            writer.writerows([p.source.name, p.target.name, n] for p, n in zip(pairs, names))
    write_json_atomic(manifest, {"step": "make-coarse", "settings": settings, "complete": True, "pairs": len(pairs),
                                 "pairs_sha256": pairs_sha256(pairs)})
    return out


EXPORT_MARKER = "export.json"


def export_generator(gen_dir: str | os.PathLike, out: str | os.PathLike, dtype: str = "float16",
                     notes: dict | None = None, allow_incomplete: bool = False) -> Path:
    """Copy the loadable part of a generator folder to ``out`` (no checkpoints, cache or coarse images):
    stage networks cast to ``dtype`` (storage only: ``PCDMsPipeline.from_pretrained`` loads them as
    float32 by default), encoders, schedulers, ``model_index.json``, and each stage's training
    manifest and log under ``training/``. ``notes`` is written as ``training/notes.json``.
    Raises ``FileNotFoundError`` when ``gen_dir`` has no ``model_index.json``, ``ValueError`` when
    ``out`` is or contains ``gen_dir``, is a non-empty folder other than an earlier export, or a
    stage's run did not finish (unless ``allow_incomplete``). ``out/export.json`` records the source.
    """
    import shutil

    from pcdms.checkpoint import load_model, save_model

    gen_dir, out = Path(gen_dir), Path(out)
    if not (gen_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{gen_dir}: no model_index.json (train the inpaint stage first)")
    src, dst = gen_dir.resolve(), out.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise ValueError(f"--out {out} is, holds or lies inside the generator folder {gen_dir}; choose another folder")
    if out.exists() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise ValueError(f"{out} is not empty and not an earlier export (no {EXPORT_MARKER}); choose a new folder")
    index = read_json_object(gen_dir / "model_index.json")
    unfinished = [s for s in index["stages"]
                  if (gen_dir / "train" / s / "manifest.json").is_file()
                  and not read_json_object(gen_dir / "train" / s / "manifest.json").get("complete", True)]
    if unfinished and not allow_incomplete:
        raise ValueError(f"{gen_dir}: stage(s) {unfinished} did not finish their run (manifest complete: false); "
                         "finish them with --resume, or export anyway with allow_incomplete")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch_dtype = getattr(torch, dtype)
    for stage in index["stages"]:
        save_model(load_model(gen_dir / stage, dtype=torch_dtype), out / stage)
    encoders = index.get("encoders", {})
    for sub in ("prior_scheduler", "latent_scheduler", *(v for k, v in encoders.items() if k != "vae")):
        if (gen_dir / sub).is_dir():
            shutil.copytree(gen_dir / sub, out / sub)
    if "vae" in encoders:  # re-saved in the storage dtype rather than copied
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(gen_dir / encoders["vae"]), local_files_only=True)
        vae.to(torch_dtype).save_pretrained(str(out / encoders["vae"]), safe_serialization=True)
    for name in ("stand_in.json", "model_index.json"):
        if (gen_dir / name).is_file():
            shutil.copyfile(gen_dir / name, out / name)
    for stage in ("vae", *index["stages"]):
        for name in ("manifest.json", "log.csv"):
            src = gen_dir / "train" / stage / name
            if src.is_file():
                (out / "training").mkdir(exist_ok=True)
                shutil.copyfile(src, out / "training" / f"{stage}-{name}")
    if notes:
        write_json_atomic(out / "training" / "notes.json", notes)
    write_json_atomic(out / EXPORT_MARKER, {"step": "export-generator", "source": str(gen_dir.resolve()),
                                            "dtype": dtype, "stages": index["stages"],
                                            "incomplete_stages": unfinished})
    return out
