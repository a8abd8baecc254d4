"""``reid-aug train-pcdms`` (one PCDMs stage, or the toy VAE) and ``reid-aug make-coarse`` (stage-3 inputs).

The pairs come from :mod:`reid_aug.pairs` (training identities only, the subset only);
the training itself is :mod:`pcdms.training`.
"""

from __future__ import annotations

from pathlib import Path

import click

from pcdms.encoders import WeightsNotFoundError
from pcdms.pose import PoseFormatError, read_annotation_csv
from reid_aug.cli.app import main
from reid_aug.cli.synth_cmds import subset_records
from reid_aug.data.market import DatasetError, read_reid_dataset

STAGES = ("vae", "prior", "inpaint", "refine")
DEFAULT_POSES = "market-annotation-train.csv"


def _training_records(dataset, subset: str | None, subset_seed: int):
    """(records allowed in training, description): the subset's images, or the whole train split."""
    if subset is None:
        return list(dataset.train), "the whole training split"
    records, subset_file, _ = subset_records(dataset, subset, None, subset_seed)
    what = f"subset file {subset_file}" if subset_file else f"subset fraction {subset} (seed {subset_seed})"
    return records, what


def _pair_options(command):
    """The options that choose the training pairs; train-pcdms and make-coarse must be given the same."""
    options = [
        click.option("--subset", default=None,
                     help="Pairs only from this real subset: a subset CSV or a fraction in (0, 1]."),
        click.option("--subset-seed", type=int, default=0, show_default=True),
        click.option("--pairs", "pairs_csv", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="Community pairs file (from,to) instead of all same-id pairs; every pair is checked."),
        click.option("--poses", "poses_csv", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help=f"Pose annotations (default ROOT/{DEFAULT_POSES})."),
        click.option("--per-source", type=int, default=None, help="At most N targets per source image (seeded)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _pairs(dataset, records, poses_csv: Path, pairs_csv: Path | None, per_source: int | None, seed: int):
    from reid_aug.pairs import build_training_pairs, read_training_pairs

    poses = read_annotation_csv(poses_csv)
    if pairs_csv is not None:
        pairs = read_training_pairs(pairs_csv, records, poses, train_names=[r.name for r in dataset.train])
        return pairs, {"pairs": len(pairs), "pairs_file": str(pairs_csv)}
    return build_training_pairs(records, poses, per_source=per_source, seed=seed)


@main.command("train-pcdms")
@click.option("--stage", type=click.Choice(STAGES), required=True,
              help="vae (the own VAE of presets without a pretrained one: toy, tiny), prior, inpaint, or refine "
                   "(needs make-coarse first).")
@click.option("--data", "data_root", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Market-1501-style dataset root.")
@click.option("--out", "gen_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Generator folder: every stage of one generator goes here (a loadable pipeline once "
                   "inpaint is trained).")
@click.option("--preset", default="paper", show_default=True, help="paper | toy | tiny.")
@_pair_options
@click.option("--steps", type=int, default=1000, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Global batch per step.")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--weight-decay", type=float, default=1e-2, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--ema", "ema_decay", type=float, default=None, help="EMA decay (exported weights are the EMA).")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default="no", show_default=True)
@click.option("--checkpoint-every", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Pair choice (with --per-source), data order, noise, dropout, init.")
@click.option("--p-joint", type=float, default=0.1, show_default=True,
              help="Probability that all conditions are dropped together (the guidance null).")
@click.option("--p-extra", type=float, default=0.0, show_default=True,
              help="Extra independent drop probability per condition (the release: 0.1, joint 0).")
@click.option("--snr-gamma", type=float, default=None, help="Min-SNR-gamma loss weighting (default off).")
@click.option("--noise-offset", type=float, default=0.0, show_default=True, help="Offset noise (release 0.1).")
@click.option("--global-noise", type=float, default=0.0, show_default=True,
              help="Inpaint: noise augmentation of the target CLIP embedding, in units of its per-dimension std "
                   "(unCLIP; makes stage 2 tolerant of the prior's errors). 0 = off, as in the paper.")
@click.option("--prior-samples", type=int, default=0, show_default=True,
              help="Inpaint: learn from N embeddings per pair sampled by the trained OUT/prior (what stage 2 gets "
                   "at sampling time) instead of the true target embedding. 0 = the true one, as in the paper.")
@click.option("--prior-steps", type=int, default=10, show_default=True, help="DDIM steps of those prior samples.")
@click.option("--prior-guidance", type=float, default=2.0, show_default=True, help="Guidance of those samples.")
@click.option("--cross-camera-background", "cross_camera_background", type=click.FloatRange(0.0, 1.0), default=1.0,
              show_default=True,
              help="Inpaint/refine: loss weight of the target's background (outside the box around its joints) in "
                   "pairs whose images come from different cameras, which the source cannot predict. 1 = the "
                   "paper's plain loss; 0 lets the generator keep the source's background (beyond the paper).")
@click.option("--init", "init_path", type=click.Path(path_type=Path), default=None,
              help="Starting weights: SD 2.1-base folder (inpaint/refine), Kandinsky-2.2 prior folder (prior), "
                   "or a trained stage folder of the same architecture (fine-tuning). Default: random.")
@click.option("--embed-stats", type=click.Choice(["train", "release"]), default="train", show_default=True,
              help="Prior: standardise CLIP embeddings with training-set statistics or the release's values.")
@click.option("--clip-checkpoint", type=click.Path(path_type=Path), default=None, help="OpenCLIP ViT-H/14.")
@click.option("--dino", "dino_path", type=click.Path(path_type=Path), default=None, help="DINOv2 folder.")
@click.option("--vae", "vae_path", type=click.Path(path_type=Path), default=None,
              help="SD 2.1-base (or bare VAE) folder; default OUT/vae.")
@click.option("--stand-in-encoders", type=int, default=None, metavar="SEED",
              help="Random frozen CLIP/DINOv2 stand-ins made with SEED into OUT (toy and tiny presets; no real encoders).")
@click.option("--coarse", "coarse_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Refine: folder from make-coarse (default OUT/coarse).")
@click.option("--resume", default=None, is_flag=False, flag_value="latest",
              help="Continue the stage's run: --resume (latest checkpoint) or --resume CHECKPOINT_DIR.")
@click.option("--overwrite", is_flag=True, help="Start over, removing this stage's earlier checkpoints.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
def train_pcdms_cmd(stage, data_root, gen_dir, preset, subset, subset_seed, pairs_csv, poses_csv, per_source, steps,
                    batch_size, grad_accum, lr, weight_decay, max_grad_norm, warmup_steps, ema_decay,
                    mixed_precision, checkpoint_every, seed, p_joint, p_extra, snr_gamma, noise_offset, global_noise,
                    prior_samples, prior_steps, prior_guidance, cross_camera_background, init_path,
                    embed_stats, clip_checkpoint, dino_path, vae_path, stand_in_encoders, coarse_dir, resume,
                    overwrite, device) -> None:
    """Train one PCDMs stage (or the toy VAE) on same-identity pairs of a Market-style dataset into OUT.

    \b
    OUT/<stage>/                 the trained stage (config.json + model.safetensors; vae: AutoencoderKL)
    OUT/train/<stage>/           checkpoints/, log.csv, pairs.csv, manifest.json
    OUT/model_index.json         once inpaint exists: OUT loads as a PCDMs pipeline
    Multi-GPU / multi-process: torchrun --nproc_per_node N $(which reid-aug) train-pcdms ...
    """
    from pcdms.presets import get_preset
    from pcdms.training.loop import ResumeError, TrainConfig, checkpoint_dirs, init_distributed
    from pcdms.training.tasks import LossConfig

    try:
        p = get_preset(preset)
        cfg = TrainConfig(max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                          weight_decay=weight_decay, max_grad_norm=max_grad_norm, warmup_steps=warmup_steps,
                          ema_decay=ema_decay, mixed_precision=mixed_precision, checkpoint_every=checkpoint_every,
                          seed=seed)
        loss = LossConfig(p_joint=p_joint, p_extra=p_extra, snr_gamma=snr_gamma, noise_offset=noise_offset,
                          global_noise=global_noise, prior_samples=prior_samples, prior_steps=prior_steps,
                          prior_guidance=prior_guidance)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    rank, world = init_distributed()
    run_dir = gen_dir / "train" / stage
    if resume is None and checkpoint_dirs(run_dir) and not overwrite:
        raise click.ClickException(f"{run_dir}: holds checkpoints of an earlier run; --resume to continue it "
                                   "or --overwrite to start over (the old run is removed once every input checks out)")
    overwrite = overwrite and resume is None
    try:
        dataset = read_reid_dataset(data_root)
        records, what = _training_records(dataset, subset, subset_seed)
        poses_csv = poses_csv or dataset.root / DEFAULT_POSES
        if stage == "vae":
            from pcdms.training.run import train_vae

            images = sorted({r.path for r in records})
            heldout = sorted({r.path for r in dataset.query})
            if rank == 0:
                click.echo(f"vae: {len(images):,} training images ({what}); PSNR on {min(len(heldout), 256)} "
                           "query images (unseen people)")
            metrics = train_vae(images, gen_dir, p, cfg, loss, heldout=heldout, resume=resume, device=device,
                                overwrite=overwrite)
            if rank == 0:
                click.echo(f"{gen_dir / 'vae'}: PSNR {metrics['psnr_train']:.2f} dB train, "
                           f"{metrics['psnr_heldout']:.2f} dB held-out; scaling_factor "
                           f"{metrics['scaling_factor']:.4f}")
            return
        from pcdms.training.run import train_diffusion_stage

        pairs, counts = _pairs(dataset, records, poses_csv, pairs_csv, per_source, seed)
        if not pairs:
            raise click.ClickException(f"{data_root}: no training pairs ({what}; {counts})")
        if cross_camera_background != 1.0:
            if stage == "prior":
                raise click.UsageError("--cross-camera-background weights image latents: inpaint and refine only")
            from reid_aug.pairs import weight_cross_camera_background

            pairs = weight_cross_camera_background(pairs, records, cross_camera_background)
            counts["cross_camera_pairs"] = sum(p.background_weight != 1.0 for p in pairs)
        if rank == 0:
            click.echo(f"{stage}: {len(pairs):,} pairs from {what} (" + ", ".join(f"{k} {v:,}" if isinstance(v, int)
                                                                           else f"{k} {v}" for k, v in counts.items())
                       + ")")
        result = train_diffusion_stage(
            stage, pairs, gen_dir, p, cfg, loss, init=init_path, embed_stats=embed_stats,
            clip_path=clip_checkpoint, dino_path=dino_path, vae_path=vae_path, stand_in_seed=stand_in_encoders,
            coarse_dir=coarse_dir, resume=resume, device=device, overwrite=overwrite,
            sources={"data": str(dataset.root), "records": what, "poses": str(poses_csv),
                     "cross_camera_background": cross_camera_background})
        if rank == 0:
            click.echo(f"{result['output']}: {stage} trained to step {result['step']} (final loss "
                       f"{result['final_loss']})")
    except (DatasetError, PoseFormatError, WeightsNotFoundError, ResumeError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command("make-coarse")
@click.option("--data", "data_root", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Market-1501-style dataset root (the one the generator trains on).")
@click.option("--generator", "gen_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Generator folder with a trained inpaint stage (and prior, if any).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Output folder (default GENERATOR/coarse, where train-pcdms --stage refine looks).")
@_pair_options
@click.option("--seed", type=int, default=0, show_default=True, help="Pair choice (with --per-source) and noise.")
@click.option("--steps", type=int, default=20, show_default=True, help="Sampler steps.")
@click.option("--guidance", type=float, default=2.0, show_default=True)
@click.option("--scheduler", default="ddim", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default=None, help="cpu, cuda ... (default: cuda if available).")
def make_coarse_cmd(data_root, gen_dir, out, subset, subset_seed, pairs_csv, poses_csv, per_source, seed, steps,
                    guidance, scheduler, batch_size, device) -> None:
    """Coarse (stage-2) images of the training pairs, made by the trained generator: what stage 3 learns from.

    Give the same --subset / --pairs / --per-source / --seed as to train-pcdms --stage refine, which reads
    GENERATOR/coarse/coarse.csv. A killed run resumes when run again (existing images are kept).
    """
    from pcdms.training.run import make_coarse

    try:
        dataset = read_reid_dataset(data_root)
        records, what = _training_records(dataset, subset, subset_seed)
        pairs, _ = _pairs(dataset, records, poses_csv or dataset.root / DEFAULT_POSES, pairs_csv, per_source, seed)
        click.echo(f"make-coarse: {len(pairs):,} pairs from {what}")
        folder = make_coarse(pairs, gen_dir, out=out, num_inference_steps=steps, guidance_scale=guidance,
                             scheduler=scheduler, seed=seed, batch_size=batch_size, device=device)
    except (DatasetError, PoseFormatError, WeightsNotFoundError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{folder}: coarse images of {len(pairs):,} pairs")


@main.command("export-generator")
@click.argument("gen_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder to write (replaced if it exists).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float16", show_default=True,
              help="Storage dtype of the networks (loading casts them back to float32 by default).")
@click.option("--allow-incomplete", is_flag=True, help="Export even if a stage's training run did not finish.")
def export_generator_cmd(gen_dir: Path, out: Path, dtype: str, allow_incomplete: bool) -> None:
    """Copy the loadable part of generator folder GEN_DIR to OUT: stages, encoders, schedules, training manifests
    and logs; no checkpoints, cache or coarse images. OUT loads with synthesize --pipeline OUT."""
    from pcdms.pipeline import pipeline_sha256
    from pcdms.training.run import export_generator

    try:
        folder = export_generator(gen_dir, out, dtype, allow_incomplete=allow_incomplete)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    click.echo(f"{folder}: {size / 2**20:.1f} MiB, sha256 {pipeline_sha256(folder)[:16]}")
