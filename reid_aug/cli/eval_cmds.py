"""``reid-aug evaluate``: Rank-k / mAP / mINP of a trained BoT model on query/gallery."""

from __future__ import annotations

from pathlib import Path

import click

from reid_aug.cli.app import main
from reid_aug.data.market import DatasetError
from reid_aug.evaluate import evaluate_model


@main.command("evaluate")
@click.option("--model", "model_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="BoT model folder (config.json + model.safetensors, from train-bot).")
@click.option("--data", "data_root", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="Dataset root with query/ and bounding_box_test/ (Market-1501 layout) or MSMT17 lists.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="metrics file (*.json) or a folder that gets metrics.json.")
@click.option("--rerank", is_flag=True, help="Also report k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3).")
@click.option("--flip", is_flag=True, help="Average features of each image and its mirror (not in BoT's recipe).")
@click.option("--save-features", "features_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write q_feats, g_feats, q/g_pids, q/g_camids, q/g_names to this .npz.")
@click.option("--save-distmat", is_flag=True,
              help="With --save-features: add the (query x gallery) cosine distmat (not re-ranked).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
def evaluate_cmd(model_dir: Path, data_root: Path, out: Path, rerank: bool, flip: bool, features_file: Path | None,
                 save_distmat: bool, batch_size: int, device: str | None) -> None:
    """Evaluate --model on the query/gallery split of --data (Market-1501 protocol).

    Same-identity same-camera gallery images are removed per query, queries without a
    valid match are skipped, distractors stay. Prints one summary line.
    """
    if save_distmat and features_file is None:
        raise click.UsageError("--save-distmat needs --save-features FILE (the matrix goes into that file)")
    try:
        m = evaluate_model(model_dir, data_root, out_path=out, rerank=rerank, batch_size=batch_size,
                           device=device, flip=flip, features_path=features_file, save_distmat=save_distmat)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    line = (f"Rank-1 {100 * m['rank1']:.1f}  Rank-5 {100 * m['rank5']:.1f}  Rank-10 {100 * m['rank10']:.1f}  "
            f"mAP {100 * m['mAP']:.1f}  mINP {100 * m['mINP']:.1f}  "
            f"({m['num_valid_queries']}/{m['num_query']} queries, {m['num_gallery']} gallery)")
    if m["rerank"]:
        line += f"  | re-ranked: Rank-1 {100 * m['rerank']['rank1']:.1f}  mAP {100 * m['rerank']['mAP']:.1f}"
    click.echo(line)
