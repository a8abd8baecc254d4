"""``reid-aug pcdms-info`` (model card) and ``reid-aug convert-official`` (official PCDMs weights)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from reid_aug.cli.app import main

_DTYPES = ("keep", "float32", "float16", "bfloat16")


@main.command("pcdms-info")
@click.option("--preset", default="paper", show_default=True, help="PCDMs size preset: paper | tiny.")
def pcdms_info_cmd(preset: str) -> None:
    """Print the PCDMs model card of a preset as JSON: sizes and parameter counts.

    Every network is built on the meta device (no memory, no weights): the
    three trainable stage networks (prior; inpaint = UNet + pose encoder +
    DINOv2 MLP; refine = UNet + MLP) and the frozen encoders (CLIP, DINOv2, VAE).
    """
    from pcdms.encoders import encoder_param_counts
    from pcdms.models import stage_parameter_counts
    from pcdms.presets import get_preset

    try:
        p = get_preset(preset)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--preset") from None
    stages = stage_parameter_counts(p)
    encoders = encoder_param_counts(p)
    card = {
        "preset": p.name,
        "image_size": list(p.image_size),
        "canvas_size": list(p.canvas_size),
        "canvas_latent_size": list(p.canvas_latent_size),
        "vae_scale_factor": p.vae_scale_factor,
        "clip_embed_dim": p.clip_embed_dim,
        "dino_dim": p.dino_dim,
        "trainable": stages,
        "frozen_encoders": encoders,
        "total_trainable": sum(s["total"] for s in stages.values()),
        "total_frozen": sum(encoders.values()),
    }
    click.echo(json.dumps(card, indent=2))


@main.command("convert-official")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--stage", required=True, type=click.Choice(["prior", "inpaint", "refine"]),
              help="Which stage FILE holds.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Checkpoint folder to write (config.json + model.safetensors).")
@click.option("--preset", default="paper", show_default=True, help="Size preset the weights must match.")
@click.option("--dtype", type=click.Choice(_DTYPES), default="keep", show_default=True,
              help="Store weights in this dtype (keep = as in FILE).")
@click.option("--trust-pickle", is_flag=True,
              help="Load FILE with weights_only=False (runs its pickle code; only for files you trust).")
def convert_official_cmd(file: Path, stage: str, out: Path, preset: str, dtype: str, trust_pickle: bool) -> None:
    """Convert an official PCDMs release file (DeepSpeed mp_rank_00_model_states.pt) into OUT.

    Every key and shape is checked against the preset's network; unmapped or
    missing keys are listed in the error. The result loads with
    pcdms.load_model(OUT).
    """
    import torch

    from pcdms.checkpoint import save_model
    from pcdms.convert import load_official

    torch_dtype = None if dtype == "keep" else getattr(torch, dtype)
    try:
        model = load_official(file, stage, preset, dtype=torch_dtype, trust_pickle=trust_pickle)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    save_model(model, out)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"converted {stage} ({n:,} parameters, {next(model.parameters()).dtype}) from {file} -> {out}")
