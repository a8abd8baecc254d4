"""Data commands: ``subset`` (seeded real-data fraction) and ``dataset-info`` (check a dataset copy)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pcdms.io import sha256_file, write_json_atomic
from reid_aug.cli.app import main
from reid_aug.cli.config import config_to_dict, load_config
from reid_aug.data.market import DatasetError, ReidDataset, check_images_readable, read_reid_dataset, records_summary
from reid_aug.data.subset import SubsetConfig, make_subset, read_subset_csv, write_subset_csv
from reid_aug.manifest import build_manifest


def _read_dataset(root: Path, check_images: bool) -> ReidDataset:
    try:
        dataset = read_reid_dataset(root)
        if check_images:
            check_images_readable(dataset.train + dataset.query + dataset.gallery)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from None
    return dataset


def subset_manifest_path(out: Path) -> Path:
    """``subsets/f0.2.csv`` -> ``subsets/f0.2.manifest.json`` (a sidecar: the CSV is a file, not a folder)."""
    return out.with_name(out.stem + ".manifest.json")


@main.command("subset")
@click.argument("root", type=click.Path(path_type=Path, file_okay=False))
@click.option("--fraction", type=float, default=None, help="Fraction of training images in (0, 1].")
@click.option("--seed", type=int, default=None, help="Seed of the draw (default 0).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="CSV to write.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="YAML with fraction/seed.")
@click.option("--check-images", is_flag=True, help="Decode every image first (slow on the full set).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out that lists other images.")
def subset_cmd(
    root: Path, fraction: float | None, seed: int | None, out: Path, config_path: Path | None, check_images: bool,
    overwrite: bool,
) -> None:
    """Write a seeded FRACTION of ROOT's training images (every identity kept) to the CSV --out.

    ROOT is a Market-1501 / DukeMTMC-reID / MSMT17 folder (or its parent). For one seed the
    subsets nest: the 0.2 list is contained in the 0.4 list, and so on. A sidecar
    <out stem>.manifest.json records the source, the config and the CSV's hash.
    """
    cfg = load_config(SubsetConfig, config_path, {"fraction": fraction, "seed": seed})
    dataset = _read_dataset(root, check_images)
    try:
        records = make_subset(dataset.train, cfg.fraction, cfg.seed)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from None
    summary = records_summary(records)
    if out.exists() and not overwrite:
        # Later steps may have used the file: replace it only when asked (the same list is not a change).
        try:
            same = {r.name for r in read_subset_csv(out, dataset)} == {r.name for r in records}
        except DatasetError:
            same = False
        if not same:
            raise click.ClickException(f"{out} exists and lists other images; use --overwrite to replace it "
                                       "(steps that used it would then disagree with it), or another --out")
    # A plain CSV (header first) so any tool reads it; what made it goes to the sidecar manifest.
    write_subset_csv(out, records)
    write_json_atomic(
        subset_manifest_path(out),
        build_manifest(
            "subset",
            config=config_to_dict(cfg),
            seed=cfg.seed,
            sources={"root": dataset.root, "layout": dataset.layout},
            extra={
                "outputs": {out.name: sha256_file(out)},
                "summary": {"subset": summary, "train": records_summary(dataset.train)},
            },
        ),
    )
    click.echo(
        f"{out}: {summary['num_images']:,} of {len(dataset.train):,} training images, "
        f"{summary['num_pids']:,} ids (fraction {cfg.fraction:g}, seed {cfg.seed})"
    )


@main.command("dataset-info")
@click.argument("root", type=click.Path(path_type=Path, file_okay=False))
@click.option("--check-images", is_flag=True, help="Decode every image (slow on the full set).")
def dataset_info_cmd(root: Path, check_images: bool) -> None:
    """Print ROOT's layout and per-split image/id/camera counts as JSON.

    Market-1501 should read train 12,936 images / 751 ids, query 3,368 / 750,
    gallery 15,913 / 751 (750 ids + the distractor pid 0), 6 cameras.
    """
    dataset = _read_dataset(root, check_images)
    info = {
        "root": str(dataset.root),
        "layout": dataset.layout,
        "num_train_pids": dataset.num_train_pids,
        "num_cams": dataset.num_cams,
        "train": records_summary(dataset.train),
        "query": records_summary(dataset.query),
        "gallery": records_summary(dataset.gallery),
    }
    click.echo(json.dumps(info, indent=2))
