"""``reid-aug make-toy-market``: render the toy Market-1501 stand-in (see :mod:`reid_aug.data.toy`)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from reid_aug.cli.app import main
from reid_aug.cli.config import config_to_dict, load_config
from reid_aug.data.toy import ToyConfig, generate_toy_market, read_toy_manifest


@main.command("make-toy-market")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--ids", "num_ids", type=int, default=None,
              help="Number of identities, half train half test (default 100).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="YAML with ToyConfig keys (num_ids, images_per_id, num_cameras, ...).")
@click.option("--overwrite", is_flag=True, help="Replace a complete toy Market already at OUT.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Render in this many processes (the same files for any number).")
def make_toy_market_cmd(out: Path, num_ids: int | None, seed: int, config_path: Path | None, overwrite: bool,
                        workers: int) -> None:
    """Render a toy dataset laid out exactly like Market-1501 into OUT.

    \b
    OUT/bounding_box_train/  bounding_box_test/  query/   128x64 JPEGs, Market names
    OUT/market-annotation-{train,test}.csv               exact keypoints (COCO-18)
    OUT/market-pairs-{train,test}.csv                    same-identity pairs
    OUT/manifest.json
    """
    cfg = load_config(ToyConfig, config_path, {"num_ids": num_ids})
    try:
        existing = read_toy_manifest(out)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if existing is not None and not overwrite:
        same = existing.get("seed") == seed and existing.get("config") == config_to_dict(cfg)
        if same:
            click.echo(f"{out} already holds this toy Market (same config and seed); nothing to do.")
            return
        raise click.ClickException(
            f"{out} already holds a toy Market with a different config or seed; use --overwrite or another OUT"
        )
    start = time.perf_counter()
    try:
        generate_toy_market(out, cfg, seed=seed, overwrite=overwrite, progress=True, workers=workers)
    except (FileExistsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    counts = read_toy_manifest(out)["counts"]
    click.echo(
        f"toy Market in {out} ({time.perf_counter() - start:.1f} s): "
        f"train {counts['bounding_box_train']} images / {counts['train_ids']} ids; "
        f"query {counts['query']}, gallery {counts['bounding_box_test']} "
        f"(incl. {counts['distractors']} distractors, {counts['junk']} junk) / {counts['test_ids']} ids"
    )


