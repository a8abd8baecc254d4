"""``reid-aug filter-identity``: keep the synthetic images a BoT model trained on the real subset recognises."""

from __future__ import annotations

from pathlib import Path

import click

from pcdms.io import sha256_file, write_text_atomic
from reid_aug.cli.app import main
from reid_aug.data.market import DatasetError, read_image_folder, read_reid_dataset
from reid_aug.data.subset import read_subset_csv
from reid_aug.manifest import read_manifest, write_manifest

STEP = "filter-identity"


@main.command("filter-identity")
@click.argument("synthetic_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--model", "model_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="BoT model folder trained on the same real subset (e.g. runs/standard/frac0.4/seed0/model).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder for the kept images (hard links), scores.csv and manifest.json.")
@click.option("--min-score", type=float, default=None, help="Keep images with cosine similarity >= this.")
@click.option("--rank1", is_flag=True, help="Keep only images whose own identity ranks first among the subset's.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an earlier filter-identity folder.")
def filter_identity_cmd(synthetic_dir: Path, model_dir: Path, out: Path, min_score: float | None, rank1: bool,
                        device: str, overwrite: bool) -> None:
    """Score every image of SYNTHETIC_DIR (a complete `synthesize` folder) against its source identity
    and link the kept ones into OUT, which `train-bot --synthetic OUT` then uses.

    \b
    score: cosine similarity of the image's BoT feature to the mean feature of its identity's real
    images in the subset (SYNTHETIC_DIR/subset.csv); rank1: that identity is the nearest of all.
    OUT/scores.csv has every image with its score, rank1 and whether it was kept; the manifest
    states the kept fraction.
    """
    import os

    import pandas as pd

    from reid_aug.identity_filter import identity_scores, keep_mask

    if min_score is None and not rank1:
        raise click.UsageError("give --min-score X and/or --rank1: what to keep")
    stored = read_manifest(synthetic_dir)
    if stored is None or stored.get("step") != "synthesize" or not stored.get("complete"):
        raise click.ClickException(f"{synthetic_dir}: not a complete synthesize folder (manifest.json says "
                                   f"{'nothing' if stored is None else repr(stored.get('step')) + ', complete ' + str(stored.get('complete'))})")
    old = read_manifest(out) if out.is_dir() else None
    if out.is_dir() and any(out.iterdir()) and not (overwrite and old is not None and old.get("step") == STEP):
        raise click.ClickException(f"{out} is not empty; choose a new folder"
                                   + (" or use --overwrite" if old is not None and old.get("step") == STEP else ""))
    try:
        dataset = read_reid_dataset(stored["sources"]["dataset_root"])
        real = read_subset_csv(synthetic_dir / "subset.csv", dataset)
        synthetic = read_image_folder(synthetic_dir, relabel=False, keep_distractors=False)
        scores = identity_scores(model_dir, real, synthetic, device=device, progress=True)
    except (DatasetError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    scores["kept"] = keep_mask(scores, min_score, rank1)
    if overwrite and out.is_dir():
        for p in out.iterdir():
            if p.is_file():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for rec, kept in zip(synthetic, scores["kept"]):
        if kept:
            try:
                os.link(rec.path, out / rec.name)
            except OSError:  # another file system: copy
                import shutil

                shutil.copyfile(rec.path, out / rec.name)
    write_text_atomic(out / "scores.csv", scores.to_csv(index=False))
    kept = int(scores["kept"].sum())
    write_manifest(out, STEP, config={"min_score": min_score, "rank1": rank1}, seed=None,
                   sources={"synthetic": synthetic_dir.absolute(), "model": model_dir.absolute()},
                   checkpoints={"model": sha256_file(model_dir / "model.safetensors")},
                   extra={"complete": True, "images": len(scores), "kept": kept,
                          "kept_fraction": round(kept / max(1, len(scores)), 6),
                          "mean_score": round(float(pd.to_numeric(scores["score"]).mean()), 6),
                          "rank1_fraction": round(float(scores["rank1"].mean()), 6)})
    click.echo(f"{out}: kept {kept:,} of {len(scores):,} synthetic images ({100 * kept / max(1, len(scores)):.1f} %); "
               f"mean score {scores['score'].mean():.3f}, own identity first for {100 * scores['rank1'].mean():.1f} %")
