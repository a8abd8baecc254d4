"""Identity filter for synthetic images (beyond the paper): keep the ones a re-ID model still recognises.

A pose-guided generator can drift from its source person (other colours, a
smeared face), and such an image trains BoT on a wrong label. The filter scores
every synthetic image with a BoT model trained on the *real* subset alone (the
standard row's model of the same fraction and seed: it has seen nothing the
augmented run would not see):

- ``score``: cosine similarity of the image's feature to the mean (L2-normalised)
  feature of its source identity's real images, all features centred on the mean
  feature of the real subset;
- ``rank1``: whether that identity is the most similar of all the subset's identities.

Images are kept by a score threshold and/or ``rank1``. Related: DG-Net (Zheng
et al., "Joint Discriminative and Generative Learning for Person
Re-identification", CVPR 2019) labels its generated images with a teacher re-ID
model's predictions instead of trusting the generator; here a re-ID model is
used the same way, but to drop images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from reid_aug.bot.data import load_images
from reid_aug.bot.features import extract_features
from reid_aug.bot.model import load_bot
from reid_aug.data.market import ImageRecord


def identity_scores(
    model_dir,
    real_records: Sequence[ImageRecord],
    synthetic_records: Sequence[ImageRecord],
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> pd.DataFrame:
    """One row per synthetic image: ``name, pid, score, rank1, best_pid``.

    ``model_dir``: a BoT model folder (:func:`reid_aug.bot.model.load_bot`), trained on the real
    subset. ``real_records``: the subset (gives each identity's mean feature). A synthetic image's
    identity is its source's pid; a pid without real images is a ValueError.
    ``score`` in [-1, 1]: cosine similarity to the pid's mean feature (features centred on the real
    images' mean); ``rank1``: the pid is the
    nearest mean of all; ``best_pid``: the nearest.
    """
    real_pids = sorted({r.pid for r in real_records})
    missing = sorted({r.pid for r in synthetic_records} - set(real_pids))
    if missing:
        raise ValueError(f"synthetic images of pid(s) {missing[:5]} have no real image in the subset to compare with")
    model, config = load_bot(model_dir)
    size = tuple(config["image_size"])

    def raw(records):
        images = load_images([r.path for r in records], size, progress=progress)
        return extract_features(model, images, device=device, progress=progress)

    # Centred on the real images' mean feature: what all people share (BNNeck features of a re-ID model
    # have a large common component) would otherwise make every cosine similarity high.
    real_raw = raw(real_records)
    mean = real_raw.mean(0)

    def feats(x):
        return F.normalize(x - mean, dim=1)

    real = feats(real_raw)
    index = {pid: i for i, pid in enumerate(real_pids)}
    labels = torch.as_tensor([index[r.pid] for r in real_records])
    centres = torch.zeros(len(real_pids), real.shape[1]).index_add_(0, labels, real)
    centres = F.normalize(centres, dim=1)
    syn = feats(raw(synthetic_records))
    sims = syn @ centres.T  # (S, P) cosine similarities
    own = torch.as_tensor([index[r.pid] for r in synthetic_records])
    best = sims.argmax(1)
    return pd.DataFrame({
        "name": [r.name for r in synthetic_records],
        "pid": [r.pid for r in synthetic_records],
        "score": sims[torch.arange(len(own)), own].numpy().astype(np.float64).round(6),
        "rank1": (best == own).numpy(),
        "best_pid": [real_pids[i] for i in best.tolist()],
    })


def keep_mask(scores: pd.DataFrame, min_score: float | None = None, rank1: bool = False) -> np.ndarray:
    """Boolean ``(S,)``: images with ``score >= min_score`` (when given) and, with ``rank1``, ranked first."""
    keep = np.ones(len(scores), dtype=bool)
    if min_score is not None:
        keep &= scores["score"].to_numpy() >= min_score
    if rank1:
        keep &= scores["rank1"].to_numpy(dtype=bool)
    return keep


FILTER_STEP = "filter-identity"
SCORES_CSV = "scores.csv"


def filter_folder(synthetic_dir, model_dir, out, min_score: float | None = None, rank1: bool = False,
                  device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Score a complete ``synthesize`` folder (:func:`identity_scores` against its ``subset.csv``) and
    hard-link the kept images into ``out`` with ``scores.csv`` and ``manifest.json``; return the manifest.

    A folder made with the same inputs (synthesis plan, model weights, thresholds) is returned as is;
    one made from other inputs (or left unfinished) is made again. Raises ValueError for an incomplete
    synthesis folder, no criterion, or an ``out`` that holds anything else.
    """
    import os
    import shutil
    from pathlib import Path

    from pcdms.io import sha256_file, write_text_atomic
    from reid_aug.bot.model import WEIGHTS_NAME
    from reid_aug.data.market import read_reid_dataset, read_synthetic_folder
    from reid_aug.data.subset import read_subset_csv
    from reid_aug.manifest import read_manifest, write_manifest

    synthetic_dir, model_dir, out = Path(synthetic_dir), Path(model_dir), Path(out)
    if min_score is None and not rank1:
        raise ValueError("the identity filter needs min_score and/or rank1: what to keep")
    stored = read_manifest(synthetic_dir)
    if stored is None or stored.get("step") != "synthesize" or not stored.get("complete"):
        raise ValueError(f"{synthetic_dir}: not a complete synthesize folder")
    inputs = {"synthetic_plan_sha256": stored.get("plan_sha256"), "model_sha256": sha256_file(model_dir / WEIGHTS_NAME),
              "min_score": min_score, "rank1": rank1}
    old = read_manifest(out) if out.is_dir() else None
    if old is not None and old.get("step") == FILTER_STEP and old.get("inputs") == inputs and old.get("complete"):
        return old
    if out.is_dir() and any(out.iterdir()):
        if old is None or old.get("step") != FILTER_STEP:
            raise ValueError(f"{out} is not empty and not a {FILTER_STEP} folder; choose a new folder")
        shutil.rmtree(out)  # an earlier (or unfinished) filtering of other inputs: derived data, made again
    dataset = read_reid_dataset(stored["sources"]["dataset_root"])
    real = read_subset_csv(synthetic_dir / "subset.csv", dataset)
    trained = read_manifest(model_dir.parent)  # train-bot writes model/ beside its manifest
    if trained is not None and trained.get("step") == "train-bot":
        if trained.get("num_real_images") != len(real) or trained.get("num_synthetic_images"):
            raise ValueError(f"{model_dir} was trained on {trained.get('num_real_images')} real (+ "
                             f"{trained.get('num_synthetic_images') or 0} synthetic) images, not on the "
                             f"{len(real)} real images of {synthetic_dir}'s subset alone; score with the standard "
                             "model of the same subset")
    synthetic = read_synthetic_folder(synthetic_dir)
    scores = identity_scores(model_dir, real, synthetic, device=device, progress=progress)
    scores["kept"] = keep_mask(scores, min_score, rank1)
    out.mkdir(parents=True, exist_ok=True)
    for rec, kept in zip(synthetic, scores["kept"]):
        if kept:
            try:
                os.link(rec.path, out / rec.name)
            except OSError:  # another file system
                shutil.copyfile(rec.path, out / rec.name)
    write_text_atomic(out / SCORES_CSV, scores.to_csv(index=False))
    kept = int(scores["kept"].sum())
    write_manifest(
        out, FILTER_STEP, config={"min_score": min_score, "rank1": rank1}, seed=None,
        sources={"synthetic": synthetic_dir.absolute(), "model": model_dir.absolute()},
        checkpoints={"model": inputs["model_sha256"]},
        extra={"complete": True, "inputs": inputs, "images": len(scores), "kept": kept,
               "kept_fraction": round(kept / max(1, len(scores)), 6),
               "mean_score": round(float(scores["score"].mean()), 6),
               "rank1_fraction": round(float(scores["rank1"].mean()), 6)})
    return read_manifest(out)
