"""``reid-aug synthesize``: pose-guided synthetic images of a real training subset (see :mod:`reid_aug.synthesis`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from pcdms.encoders import WeightsNotFoundError
from pcdms.pose import PoseFormatError
from reid_aug.cli.app import main
from reid_aug.cli.config import GuidanceParam, config_to_dict, load_config, normalize_record
from reid_aug.data.market import DatasetError, ReidDataset, read_reid_dataset, records_summary
from reid_aug.data.subset import make_subset, read_subset_csv
from reid_aug.manifest import read_manifest
from reid_aug.synthesis import GENERATORS, RANDOM_WEIGHTS_WARNING, SynthesisConfig, encoder_paths, synthesize


def parse_subset_arg(value: str) -> float | Path:
    """``--subset``: an existing CSV path, else a number in (0, 1] meaning the seeded subset at that fraction."""
    path = Path(value)
    if path.is_file():
        return path
    try:
        fraction = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither an existing subset CSV nor a fraction in (0, 1]",
                                 param_hint="--subset") from None
    if not 0.0 < fraction <= 1.0:
        raise click.BadParameter(f"fraction must be in (0, 1], got {value}", param_hint="--subset")
    return fraction


def subset_records(dataset: ReidDataset, subset: str | None, fraction: float | None, subset_seed: int):
    """(records, subset file or None, manifest notes) for --subset FILE|F or --fraction F."""
    if (subset is None) == (fraction is None):
        raise click.UsageError("give the real subset as --subset FILE|FRACTION or --fraction F (exactly one)")
    chosen = parse_subset_arg(subset) if subset is not None else fraction
    if isinstance(chosen, Path):
        return read_subset_csv(chosen, dataset), chosen, {}
    return make_subset(dataset.train, chosen, subset_seed), None, {"subset_fraction": chosen,
                                                                   "subset_seed": subset_seed}


@main.command("synthesize")
@click.option("--data", "data_root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Market-1501-style dataset root (or a toy Market). Without --data and --out: the workspace's.")
@click.option("--subset", default=None, help="Real subset: a CSV from `reid-aug subset`, or a fraction in (0, 1] "
              "(in a workspace: the fraction of the cell, default 1).")
@click.option("--fraction", type=float, default=None, help="Same as --subset F.")
@click.option("--subset-seed", type=int, default=0, show_default=True, help="Seed of a subset given as a fraction.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Output folder (in a workspace: synthetic/<method>/frac<F>/seed<S>/).")
@click.option("--method", default=None, help="Workspace only: the method (row) to synthesize for (default: the first).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="YAML with SynthesisConfig keys.")
@click.option("--generator", type=click.Choice(GENERATORS), default=None,
              help="pcdms (default) or toy-oracle (toy Market only; NOT a generative model).")
@click.option("--poses", "poses_csv", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Pose annotation file (default ROOT/market-annotation-train.csv).")
@click.option("--pose-pool", type=click.Choice(["subset", "train"]), default=None,
              help="Draw target poses from the subset (default) or the whole training set.")
@click.option("--pipeline", type=click.Path(path_type=Path), default=None, help="Trained PCDMs pipeline folder.")
@click.option("--clip-checkpoint", type=click.Path(path_type=Path), default=None, help="OpenCLIP ViT-H/14 checkpoint.")
@click.option("--dino", "--dino-checkpoint", "dino_path", type=click.Path(path_type=Path), default=None,
              help="DINOv2 transformers folder.")
@click.option("--vae", "--vae-checkpoint", "vae_path", type=click.Path(path_type=Path), default=None,
              help="SD 2.1-base folder (or a bare VAE folder).")
@click.option("--per-image", type=int, default=None, help="Synthetic images per real image (default 1).")
@click.option("--steps", type=int, default=None, help="Sampler steps per stage (default 50).")
@click.option("--guidance", type=GuidanceParam(), default=None,
              help="Classifier-free guidance scale, one for all stages or prior,inpaint,refine (default 2.0).")
@click.option("--refine-strength", type=float, default=None,
              help="Refining stage: 1 (default, the paper) samples from noise; below 1 it starts from the coarse "
                   "image noised to that level and runs that fraction of --steps (SDEdit).")
@click.option("--scheduler", default=None, help="ddim (default) | dpmsolver++ | unipc | euler.")
@click.option("--stages", default=None, help="full (default) | B1 (inpaint) | B2 (prior+inpaint) | B3 (inpaint+refine).")
@click.option("--batch-size", type=int, default=None, help="Images per pipeline call (default 16).")
@click.option("--seed", type=int, default=None, help="Seed of pose draws and noise (default 0).")
@click.option("--allow-random-weights", is_flag=True, default=None,
              help="Random weights for encoders without a path: tests and smoke runs ONLY.")
@click.option("--device", default=None, help="torch device (default cuda if available, else cpu).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "auto"]), default=None,
              help="Pipeline dtype (default float32; auto: bfloat16 where the device has native bf16, "
                   "float32 elsewhere).")
@click.option("--strategy", type=click.Choice(["random", "same-id", "canonical", "file"]), default=None,
              help="Target poses: random (default; the pose bank, other identities), same-id (other images of the "
                   "same person), canonical (k-means centres of the bank), file (--target-poses).")
@click.option("--k", "canonical_k", type=int, default=None, help="Number of canonical poses (default 8).")
@click.option("--target-poses", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="strategy file: an annotation csv (poses to draw from) or a from,to pairs csv.")
@click.option("--keep-coarse", is_flag=True, default=None, help="Also write the stage-2 (coarse) images to OUT/coarse/.")
@click.option("--overwrite", is_flag=True, help="Replace an output folder made with another config.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (images, what exists or is reusable, batches, strategy, pose bank); write nothing, "
                   "load no weights.")
def synthesize_cmd(data_root: Path | None, subset: str | None, fraction: float | None, subset_seed: int,
                   out: Path | None, method: str | None, config_path: Path | None, generator, poses_csv, pose_pool, pipeline, clip_checkpoint, dino_path,
                   vae_path, per_image, steps, guidance, refine_strength, scheduler, stages, batch_size, seed,
                   allow_random_weights,
                   device, dtype, strategy, canonical_k, target_poses, keep_coarse, overwrite: bool,
                   dry_run: bool) -> None:
    """Synthesize each image of a real training subset under other sampled poses into OUT.

    \b
    In a workspace (no --data and no --out; see `reid-aug init`): `reid-aug synthesize --subset 0.4`
    makes the synthetic cell of fraction 0.4 (seed: the workspace's first) with the workspace's
    generator settings, which `train-bot --subset 0.4 --method pcdms` then trains on.
    \b
    OUT/<source stem>_synNN.jpg   Market-named: same pid and camera as the source
    OUT/manifest.csv              per image: source, pid, camid, k, seed, target pose, settings, hashes
    OUT/preview.png               source | target skeleton | coarse | result, first images
    OUT/coarse/                   stage-2 images (--keep-coarse)
    OUT/annotation.csv            target keypoints (community Market format)
    OUT/subset.csv                the real subset used
    OUT/manifest.json
    A killed run resumes where it stopped when run again with the same options.
    """
    if target_poses is not None and strategy is None:
        strategy = "file"
    overrides = {
        "generator": generator, "pose_pool": pose_pool, "pipeline": pipeline, "clip_checkpoint": clip_checkpoint,
        "dino_path": dino_path, "vae_path": vae_path, "per_image": per_image, "num_inference_steps": steps,
        "guidance_scale": guidance, "refine_strength": refine_strength, "scheduler": scheduler, "stages": stages,
        "batch_size": batch_size, "seed": seed,
        "allow_random_weights": True if allow_random_weights else None, "device": device, "dtype": dtype,
        "keep_coarse": keep_coarse, "strategy": strategy, "canonical_k": canonical_k, "target_poses": target_poses,
    }
    if data_root is None and out is None:
        return _workspace_job(subset, fraction, subset_seed, method, config_path, poses_csv, overrides, overwrite,
                              dry_run)
    if data_root is None or out is None:
        raise click.UsageError("give both --data and --out (a one-off job), or neither (the workspace's cell)")
    if method is not None:
        raise click.UsageError("--method names a workspace row; a one-off job (--data/--out) takes --config")
    cfg = load_config(SynthesisConfig, config_path, overrides)
    if cfg.generator == "toy-oracle" and poses_csv is not None:
        raise click.UsageError("--poses: the toy-oracle renders its own poses and reads no pose file")
    _warn_random_weights(cfg, dry_run)
    try:
        dataset = read_reid_dataset(data_root)
        records, subset_file, notes = subset_records(dataset, subset, fraction, subset_seed)
        summary = records_summary(records)
        click.echo(f"real subset: {summary['num_images']:,} images, {summary['num_pids']:,} ids; "
                   f"generator {cfg.generator}, {cfg.per_image} per image")
        result = synthesize(cfg, dataset, records, out, poses_csv=poses_csv, subset_file=subset_file,
                            overwrite=overwrite, progress=True, sources_extra=notes, log=click.echo, dry_run=dry_run)
    except (DatasetError, PoseFormatError, WeightsNotFoundError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if dry_run:
        return _print_plan(result)
    _summary(out)


def _warn_random_weights(cfg: SynthesisConfig, dry_run: bool) -> None:
    """The random-encoder warning, for a run that will sample (a dry run loads no weights)."""
    if not dry_run and cfg.generator == "pcdms" and cfg.allow_random_weights and None in encoder_paths(cfg).values():
        click.secho(f"WARNING: {RANDOM_WEIGHTS_WARNING}", fg="yellow", err=True)


def _print_plan(plan: dict) -> None:
    """--dry-run: the plan of a synthesis job, one line per fact."""
    click.echo(f"plan for {plan['out']} (nothing written, no weights loaded):")
    click.echo(f"  {plan['images']:,} images of {plan['sources']:,} real images: {plan['existing']:,} already there, "
               f"{plan['reusable']:,} reusable from other fractions, {plan['to_make']:,} to make"
               + (f" in {plan['batches']:,} batches of {plan['config']['batch_size']}" if plan["batches"] else ""))
    click.echo(f"  generator {plan['generator']}; target poses: {plan['strategy']}")
    if plan["generator"] == "pcdms":
        strength = plan.get("refine_strength", 1.0)
        click.echo(f"  sampler {plan['scheduler']}, {plan['num_inference_steps']} steps, guidance "
                   f"{plan['guidance_scale']}" + (f", refine strength {strength:g}" if strength != 1.0 else "")
                   + f", stages {plan['stages']}, {plan['dtype']}")
        bank = {k.removeprefix("pose_bank_"): plan[k] for k in plan if k.startswith("pose_bank_")}
        if bank:
            click.echo("  pose bank: " + ", ".join(f"{v:,} {k}" for k, v in bank.items())
                       + f"; {plan.get('skipped_no_target_pose', 0):,} sources without a target pose")
    est = plan.get("estimate")
    if not plan["to_make"]:
        click.echo("  time: nothing to make")
    elif est is not None:
        click.echo(f"  time: about {_duration(est['seconds'])} at {est['seconds_per_image']:.3g} s/image "
                   f"({est['source']}), counting whole batches, plus loading the models")
    elif plan["generator"] == "pcdms":
        click.echo("  time: unknown: this pipeline has not been timed with this device, dtype, stages, guided "
                   "stages, refine strength and batch size yet (every run records its speed; a small --subset run "
                   "gives the estimate)")
    else:
        click.echo("  time: seconds (toy-oracle renders, it does not sample)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _summary(out: Path) -> None:
    counts = read_manifest(out)["counts"]
    skipped = counts.get("skipped_missing_source_pose", 0)
    click.echo(f"{out}: {counts['images']:,} synthetic images of {counts['sources_used']:,} real images"
               + (f" ({skipped} skipped: no source pose)" if skipped else ""))


def workspace_fraction(subset: str | None, fraction: float | None) -> float:
    """The cell fraction of --subset F / --fraction F in a workspace (default 1); a CSV is refused."""
    if subset is not None and fraction is not None:
        raise click.UsageError("give --subset F or --fraction F, not both")
    if subset is None:
        return 1.0 if fraction is None else fraction
    chosen = parse_subset_arg(subset)
    if isinstance(chosen, Path):
        raise click.UsageError("in a workspace --subset is a fraction (the cell); a subset CSV needs --data/--out")
    return chosen


def _workspace_job(subset, fraction, subset_seed, method_name, config_path, poses_csv, overrides,
                   overwrite: bool, dry_run: bool) -> None:
    """`synthesize` in a workspace: the synthetic cell (method, fraction, seed) of its run folder."""
    from reid_aug.cli.workspace_cmds import load_workspace, settings_conflict, workspace_record
    from reid_aug.sweep import ExperimentConfig, open_run_dir, synthesize_cell

    if config_path is not None:
        raise click.UsageError("--config is for one-off jobs (--data/--out); a workspace's settings are in its "
                               "reid-aug.yaml")
    if subset_seed != 0:
        raise click.UsageError("--subset-seed is for one-off jobs; a workspace cell's subset uses the cell seed (--seed)")
    if poses_csv is not None:
        raise click.UsageError("--poses is for one-off jobs; a workspace's pose file is `poses:` in its reid-aug.yaml")
    frac = workspace_fraction(subset, fraction)
    ws = load_workspace()
    if not ws.config.methods:
        raise click.ClickException(f"{ws.file}: no augmentation method (methods:) to synthesize for")
    method = ws.method(method_name) if method_name is not None else ws.config.methods[0]
    if method is None:
        raise click.BadParameter("the standard row has no synthetic images", param_hint="--method")
    seed = overrides.pop("seed", None)
    seed = ws.config.seeds[0] if seed is None else seed
    try:
        given = {k: v for k, v in overrides.items() if v is not None}
        syn = load_config(SynthesisConfig, None, {**config_to_dict(method.synthesis), **given})
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    changed = sorted(k for k, v in config_to_dict(syn).items()
                     if k != "device" and v != config_to_dict(method.synthesis)[k])
    if changed:
        raise settings_conflict(ws, "the synthesis settings come", changed, f"method {method.name!r} there",
                                f"methods: {method.name}: synthesis:", "run a one-off job")
    method = dataclasses.replace(method, synthesis=syn)
    _warn_random_weights(syn, dry_run)
    try:
        if dry_run:
            plan = synthesize_cell(ws.config, ws.root, read_reid_dataset(ws.config.data), method, frac, seed,
                                   echo=click.echo, overwrite=overwrite, dry_run=True)
            return _print_plan(plan)
        # --overwrite: accept a changed reid-aug.yaml for the run folder (and replace this cell's images)
        dataset = open_run_dir(ws.config, ws.root, workspace_record(ws), overwrite=overwrite,
                               normalize=normalize_record(ExperimentConfig))
        click.echo(f"workspace {ws.root}: method {method.name}, fraction {frac:g}, seed {seed}; generator "
                   f"{syn.generator} ({syn.pipeline or ''}), {syn.per_image} per image")
        out = synthesize_cell(ws.config, ws.root, dataset, method, frac, seed, echo=click.echo, overwrite=overwrite)
    except (DatasetError, PoseFormatError, WeightsNotFoundError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    _summary(out)
