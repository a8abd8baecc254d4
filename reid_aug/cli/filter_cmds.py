"""``reid-aug filter-identity``: keep the synthetic images a BoT model trained on the real subset recognises."""

from __future__ import annotations

from pathlib import Path

import click

from reid_aug.cli.app import main
from reid_aug.data.market import DatasetError


@main.command("filter-identity")
@click.argument("synthetic_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--model", "model_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="BoT model folder trained on the same real subset (e.g. runs/standard/frac0.4/seed0/model).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder for the kept images (hard links), scores.csv and manifest.json.")
@click.option("--min-score", type=float, default=None, help="Keep images with cosine similarity >= this.")
@click.option("--rank1", is_flag=True, help="Keep only images whose own identity ranks first among the subset's.")
@click.option("--device", default="cpu", show_default=True)
def filter_identity_cmd(synthetic_dir: Path, model_dir: Path, out: Path, min_score: float | None, rank1: bool,
                        device: str) -> None:
    """Score every image of SYNTHETIC_DIR (a complete `synthesize` folder) against its source identity
    and link the kept ones into OUT, which `train-bot --synthetic OUT` then uses.

    \b
    score: cosine similarity of the image's BoT feature to the mean feature of its identity's real
    images in the subset (SYNTHETIC_DIR/subset.csv); rank1: that identity is the nearest of all.
    OUT/scores.csv has every image with its score, rank1 and whether it was kept; the manifest
    states the kept fraction. Run again with other inputs, OUT is made again.
    """
    from reid_aug.identity_filter import filter_folder

    if min_score is None and not rank1:
        raise click.UsageError("give --min-score X and/or --rank1: what to keep")
    try:
        manifest = filter_folder(synthetic_dir, model_dir, out, min_score, rank1, device=device, progress=True)
    except (DatasetError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{out}: kept {manifest['kept']:,} of {manifest['images']:,} synthetic images "
               f"({100 * manifest['kept_fraction']:.1f} %); mean score {manifest['mean_score']:.3f}, own identity "
               f"first for {100 * manifest['rank1_fraction']:.1f} %")
