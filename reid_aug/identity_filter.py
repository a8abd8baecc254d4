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
