"""``reid-aug visualize-ranks``: a PNG of queries and their top-k gallery images (green = match)."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from pcdms.io import atomic_path
from reid_aug.cli.app import main
from reid_aug.data.market import DatasetError, read_reid_dataset
from reid_aug.evaluate import compute_distmat, load_features, model_features
from reid_aug.visualize import paths_by_name, pick_queries, rank_grid


@main.command("visualize-ranks")
@click.option("--model", "model_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="BoT model folder: rank by its features (cosine distance).")
@click.option("--features", "features_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Features .npz from `evaluate --save-features`, instead of --model (its distmat if saved, "
                   "else cosine distance of its features).")
@click.option("--data", "data_root", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="Dataset root with query/ and bounding_box_test/; with --features, images are found by name.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="PNG file to write.")
@click.option("--num-queries", type=click.IntRange(min=1), default=8, show_default=True,
              help="Rows: queries with a valid gallery match, chosen at random.")
@click.option("--topk", type=click.IntRange(min=1), default=10, show_default=True,
              help="Gallery images per row (same-pid same-camera images skipped, as evaluation does).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the choice of queries.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", default=None, help="torch device for --model (default: cuda if available, else cpu).")
def visualize_ranks_cmd(model_dir: Path | None, features_file: Path | None, data_root: Path, out: Path,
                        num_queries: int, topk: int, seed: int, batch_size: int, device: str | None) -> None:
    """Draw --num-queries queries of --data, each beside its --topk nearest gallery images.

    Green border: the query's identity; red: another one (distractors included). Rankings
    come from --model or from a --features file.
    """
    if (model_dir is None) == (features_file is None):
        raise click.UsageError("give exactly one of --model DIR or --features FILE")
    try:
        dataset = read_reid_dataset(data_root)
        if features_file is not None:
            arrays = load_features(features_file)
        else:
            arrays = model_features(model_dir, data_root, batch_size=batch_size, device=device)
        distmat = arrays.get("distmat")
        if distmat is None:
            distmat = compute_distmat(torch.from_numpy(arrays["q_feats"]), torch.from_numpy(arrays["g_feats"]))
        source = features_file or model_dir
        q_paths = paths_by_name(arrays["q_names"], dataset.query, f"{source}: q_names vs {dataset.root}")
        g_paths = paths_by_name(arrays["g_names"], dataset.gallery, f"{source}: g_names vs {dataset.root}")
        ids = [arrays[k] for k in ("q_pids", "g_pids", "q_camids", "g_camids")]
        rows = pick_queries(*ids, num=num_queries, seed=seed)
        grid = rank_grid(distmat, *ids, q_paths, g_paths, rows, topk=topk)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    click.echo(f"wrote {out}: {len(rows)} queries x top-{topk} ({grid.width}x{grid.height} px)")
