"""Re-ID evaluation: distance matrices, CMC / mAP / mINP under the Market-1501 protocol, model runs.

Market-1501 protocol (Zheng et al., ICCV 2015), as torchreid's ``eval_market1501``
implements it: for each query, gallery images with the query's pid AND camera
are removed (same-camera matches are too easy); a query left without any
correct gallery match is skipped; everything else stays in the ranking,
distractors (pid 0) included. Junk (pid -1) is dropped by the data layer; a
-1 that still reaches here is ranked like any other pid, as torchreid does.

mINP (Ye et al., "Deep Learning for Person Re-identification: A Survey and
Outlook", TPAMI 2021): per query, INP = |correct matches| / (rank of the
hardest correct match), averaged over valid queries.

The ranking code is vectorised over chunks of queries and never argsorts a row:
it finds the rank of each correct match directly (:func:`_hit_ranks`), so the
full Market size (3,368 x 15,913) takes ~0.3 s on two CPU cores.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pcdms.devices import resolve_device
from pcdms.io import atomic_path, sha256_file, write_json_atomic

METRICS_NAME = "metrics.json"
#: Arrays of a features file (torchreid's names); ``distmat`` (Q, G) is optional.
FEATURE_KEYS = ("q_feats", "g_feats", "q_pids", "g_pids", "q_camids", "g_camids", "q_names", "g_names")
PROTOCOL = (
    "market1501: same-pid-same-camera gallery entries removed, "
    "queries without valid match skipped, distractors kept"
)


def _as_tensor_1d(values: Any, name: str, length: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values)) if not isinstance(values, torch.Tensor) else values
    if t.dim() != 1 or t.numel() != length:
        raise ValueError(f"{name}: expected a 1-D array of length {length}, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise ValueError(f"{name}: expected integer ids, got dtype {t.dtype}")
    return t.to(torch.int64)


def _sorted_rows(d: torch.Tensor) -> torch.Tensor:
    """Each row of ``d`` sorted ascending, values only (so the sort need not be stable).

    On CPU numpy's sort (SIMD-vectorised on x86, ~10x torch's) on float32/float64; other float
    dtypes are widened to float32 first, which keeps their order and their ties exactly.
    """
    if d.device.type != "cpu":
        return torch.sort(d, dim=1).values
    if d.dtype not in (torch.float32, torch.float64):
        d = d.float()
    return torch.from_numpy(np.sort(d.numpy(), axis=1))


def _hit_ranks(d: torch.Tensor, good: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """0-based ranks of the correct matches ("hits") of each row, in its ranking without the removed entries.

    ``d`` (c, G) distances; ``good`` / ``removed`` (c, G) masks of the hits and of the removed
    (same pid, same camera) entries; every row has a hit. Returns (c, H) int64, H = most hits
    in a row, each row ascending, padded with G.

    Ranking = a stable sort of the row, so the rank of hit h among all G entries is
    #{j: d_j < d_h} + #{j < h: d_j == d_h}. The first term is a binary search of d_h in the
    row sorted by value (no indices needed), the second is counted directly for the few hits
    whose distance occurs more than once in the row; removed entries ahead of the hit, by the
    same rule, are then subtracted. This costs one value sort per row plus O(hits x log G),
    instead of a stable argsort and gathers over the whole row.
    """
    num_rows, num_g = d.shape
    num_rel = good.sum(1)
    rows, cols = good.nonzero(as_tuple=True)  # row-major: a row's hits in gallery order
    slot = torch.arange(len(rows), device=d.device) - (torch.cumsum(num_rel, 0) - num_rel)[rows]
    hit_d = torch.full((num_rows, int(num_rel.max())), float("inf"), dtype=d.dtype, device=d.device)
    hit_d[rows, slot] = d[rows, cols]
    hit_j = torch.full(hit_d.shape, num_g, dtype=torch.int64, device=d.device)
    hit_j[rows, slot] = cols

    srt = _sorted_rows(d)
    hit_s = hit_d.to(srt.dtype)
    ranks = torch.searchsorted(srt, hit_s)  # entries strictly closer than the hit
    num_equal = torch.searchsorted(srt, hit_s, right=True) - ranks  # includes the hit itself
    # The loops below work in blocks that keep memory within a few (c, G) arrays, whatever the data.
    # Stable ties: equal distances earlier in the gallery rank ahead.
    tie_r, tie_k = (num_equal > 1).nonzero(as_tuple=True)
    col = torch.arange(num_g, device=d.device)
    for i in range(0, len(tie_r), num_rows):
        r, k = tie_r[i:i + num_rows], tie_k[i:i + num_rows]
        ahead = (d[r] == hit_d[r, k, None]) & (col < hit_j[r, k, None])
        ranks[r, k] += ahead.sum(1)
    # Removed entries (a few per row) that rank ahead of a hit do not count.
    rem_r, rem_j = removed.nonzero(as_tuple=True)
    step = num_rows * num_g // hit_d.shape[1]  # (step, H) comparisons at once
    for i in range(0, len(rem_r), step):
        r, j = rem_r[i:i + step], rem_j[i:i + step, None]
        rem_d = d[r, j[:, 0], None]
        ahead = (rem_d < hit_d[r]) | ((rem_d == hit_d[r]) & (j < hit_j[r]))
        ranks.index_add_(0, r, -ahead.long())
    ranks.masked_fill_(hit_j == num_g, num_g)  # padding slots
    return torch.sort(ranks, dim=1).values


def evaluate_rank(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Sequence[int] | np.ndarray | torch.Tensor,
    g_pids: Sequence[int] | np.ndarray | torch.Tensor,
    q_camids: Sequence[int] | np.ndarray | torch.Tensor,
    g_camids: Sequence[int] | np.ndarray | torch.Tensor,
    max_rank: int = 50,
    chunk_size: int = 128,
) -> dict[str, Any]:
    """CMC, mAP and mINP of a query x gallery distance matrix, Market-1501 protocol.

    Args:
        distmat: (Q, G) distances, smaller = more similar; NaN is an error.
        q_pids, q_camids: (Q,) integer ids of the queries; g_pids, g_camids: (G,).
        max_rank: length of the returned CMC curve; clamped to G (as torchreid does).
        chunk_size: queries ranked at once; bounds memory at ~20 bytes x chunk_size x G.

    Returns a dict of fractions in [0, 1]: ``cmc`` (np.float64 array of length
    ``min(max_rank, G)``, ``cmc[k-1]`` = Rank-k), ``mAP``, ``mINP``, ``rank1``,
    ``rank5``, ``rank10`` (Rank-k for k beyond G is 1.0), plus
    ``num_valid_queries`` (queries with at least one valid match).

    Ties: the gallery is ordered by a STABLE sort, so equal distances keep gallery
    order. torchreid uses ``np.argsort``'s default (introsort, or a SIMD sort in
    numpy >= 2 on some CPUs), whose order among ties is unspecified, so with ties
    torchreid's own figures depend on the numpy build. Without ties in a query's
    row, results equal torchreid's ``evaluate_rank`` (CMC and mAP to float
    rounding; torchreid 0.2.5 has no mINP).
    A row whose valid ranking is shorter than ``max_rank`` (tiny galleries) counts
    as matched at every rank past its end; torchreid fails on such ragged rows.

    Method: the metrics need only the 0-based rank of each correct match in the
    ranking without the removed entries: CMC counts each valid query's first
    one, AP = mean over its matches of (k-th match) / (rank + 1), INP = matches /
    (last match's rank + 1). Those ranks come from a value-only sort of each row
    plus a binary search per match (ties and removals counted exactly), which
    gives the same figures as the stable-argsort loop of torchreid's
    ``eval_market1501`` at a fraction of its cost.
    """
    dist = distmat if isinstance(distmat, torch.Tensor) else torch.as_tensor(np.asarray(distmat))
    if dist.dim() != 2:
        raise ValueError(f"distmat: expected a 2-D (num_query, num_gallery) matrix, got shape {tuple(dist.shape)}")
    if not dist.dtype.is_floating_point:
        dist = dist.double()
    dist = dist.detach()
    num_q, num_g = dist.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f"distmat: empty matrix of shape {(num_q, num_g)}")
    if torch.isnan(dist).any():
        raise ValueError("distmat: contains NaN distances (broken features?)")
    if int(max_rank) < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # Ranking runs where distmat lives (a GPU sorts much faster); ids follow it.
    q_pids_t = _as_tensor_1d(q_pids, "q_pids", num_q).to(dist.device)
    g_pids_t = _as_tensor_1d(g_pids, "g_pids", num_g).to(dist.device)
    q_cams_t = _as_tensor_1d(q_camids, "q_camids", num_q).to(dist.device)
    g_cams_t = _as_tensor_1d(g_camids, "g_camids", num_g).to(dist.device)
    max_rank = min(int(max_rank), num_g)

    # first_hits[r]: valid queries whose first correct match sits at 0-based rank r.
    first_hits = torch.zeros(num_g, dtype=torch.int64, device=dist.device)
    ap_sum = inp_sum = 0.0
    num_valid = 0
    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        match = g_pids_t[None, :] == q_pids_t[start:stop, None]
        removed = match & (g_cams_t[None, :] == q_cams_t[start:stop, None])
        good = match & ~removed  # correct matches that survive the removal
        valid = good.any(1)
        if not bool(valid.any()):
            continue
        d, good, removed = dist[start:stop][valid], good[valid], removed[valid]
        ranks = _hit_ranks(d, good, removed)  # (c, H): 0-based ranks of each row's hits, ascending
        num_rel = good.sum(1)
        ordinal = torch.arange(1, ranks.shape[1] + 1, device=dist.device)  # the k-th hit of its row
        # AP = mean over hits of precision at the hit's rank (padding slots contribute 0).
        prec = torch.where(ordinal <= num_rel[:, None], ordinal.double() / (ranks + 1).double(), 0.0)
        ap = prec.sum(1) / num_rel.double()
        last = ranks.gather(1, (num_rel - 1)[:, None])[:, 0]
        inp = num_rel.double() / (last + 1).double()
        first_hits += torch.bincount(ranks[:, 0], minlength=num_g)
        ap_sum += float(ap.sum())
        inp_sum += float(inp.sum())
        num_valid += int(valid.sum())

    if num_valid == 0:
        raise ValueError("no query has a correct match in the gallery (after same-camera removal); check the pids")
    cum = torch.cumsum(first_hits, 0).double().cpu() / num_valid  # cum[k-1] = Rank-k
    cmc = cum[:max_rank].numpy()

    def rank_k(k: int) -> float:
        return float(cum[min(k, num_g) - 1])

    return {
        "cmc": cmc,
        "mAP": ap_sum / num_valid,
        "mINP": inp_sum / num_valid,
        "rank1": rank_k(1),
        "rank5": rank_k(5),
        "rank10": rank_k(10),
        "num_valid_queries": num_valid,
    }


def compute_distmat(q_feats: torch.Tensor, g_feats: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """(Q, D) x (G, D) features -> (Q, G) float32 distances.

    ``cosine``: 1 - cos(q, g) in [0, 2] (BoT's test distance, features L2-normalised).
    ``euclidean``: SQUARED Euclidean distance, as BoT's and torchreid's code compute
    it (same ranking as the plain distance; the scale matters only for re-ranking).
    """
    q = torch.as_tensor(q_feats).float()
    g = torch.as_tensor(g_feats).float().to(q.device)
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(
            f"features: expected (Q, D) and (G, D) with the same D, got {tuple(q.shape)} and {tuple(g.shape)}"
        )
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        g = torch.nn.functional.normalize(g, dim=1)
        return (1.0 - q @ g.T).clamp_(0.0, 2.0)
    if metric == "euclidean":
        d = q.pow(2).sum(1, keepdim=True) + g.pow(2).sum(1)[None, :] - 2.0 * (q @ g.T)
        return d.clamp_min_(0.0)
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def _check_features(arrays: dict[str, Any], source: str) -> dict[str, np.ndarray]:
    """The FEATURE_KEYS (+ ``distmat``) of ``arrays`` as numpy arrays, shapes and dtypes checked."""
    missing = [k for k in FEATURE_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)} (a features file holds {', '.join(FEATURE_KEYS)})")
    out = {k: np.asarray(v.cpu().numpy() if isinstance(v, torch.Tensor) else v)
           for k, v in arrays.items() if k in (*FEATURE_KEYS, "distmat")}
    for p in ("q", "g"):
        feats = out[f"{p}_feats"]
        if feats.ndim != 2 or feats.dtype.kind != "f":
            raise ValueError(f"{source}: {p}_feats must be a 2-D float array, got {feats.dtype} {feats.shape}")
        for key, kind in ((f"{p}_pids", "iu"), (f"{p}_camids", "iu"), (f"{p}_names", "U")):
            if out[key].shape != (len(feats),) or out[key].dtype.kind not in kind:
                raise ValueError(f"{source}: {key} must be a 1-D {'string' if kind == 'U' else 'integer'} array "
                                 f"of length {len(feats)}, got {out[key].dtype} {out[key].shape}")
    shape = (len(out["q_feats"]), len(out["g_feats"]))
    if out["q_feats"].shape[1] != out["g_feats"].shape[1]:
        raise ValueError(f"{source}: q_feats and g_feats differ in dimension "
                         f"({out['q_feats'].shape[1]} vs {out['g_feats'].shape[1]})")
    if "distmat" in out and out["distmat"].shape != shape:
        raise ValueError(f"{source}: distmat must have shape {shape} (query x gallery), got {out['distmat'].shape}")
    return out


def save_features(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """Write query/gallery features and labels to a ``.npz`` at ``path`` (atomically), torchreid's names.

    ``arrays``: ``q_feats`` (Q, D) / ``g_feats`` (G, D) float; ``q_pids``, ``q_camids`` (Q,) and
    ``g_pids``, ``g_camids`` (G,) integers (camids 0-based); ``q_names`` / ``g_names`` image file
    names (str); optional ``distmat`` (Q, G). No pickled objects: ``np.load`` reads it anywhere.
    Raises ValueError naming ``path`` if an array is missing or mis-shaped.
    """
    checked = _check_features(arrays, str(path))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **checked)  # to a file object: np.savez would append ".npz" to a bare file name


def load_features(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a features file written by :func:`save_features` (``evaluate --save-features``).

    Returns the arrays by name (see :func:`save_features`; ``distmat`` only if saved).
    Raises FileNotFoundError or ValueError naming ``path`` if it is missing, not an ``.npz``,
    or lacks / mis-shapes an array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a features .npz file ({exc})") from None
    return _check_features(arrays, str(path))


def _metrics_file(out_path: str | os.PathLike) -> Path:
    """``x.json`` is the file itself; anything else is a folder that gets ``metrics.json``."""
    out = Path(out_path)
    return out if out.suffix == ".json" else out / METRICS_NAME


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in metrics.items()}
    out["rank1_pct"] = 100.0 * metrics["rank1"]
    out["mAP_pct"] = 100.0 * metrics["mAP"]
    return out


def _weights_name() -> str:
    from reid_aug.bot.model import WEIGHTS_NAME  # lazily, as _extract imports the model: evaluation alone needs no BoT

    return WEIGHTS_NAME


def _device(device: str | torch.device | None) -> torch.device:
    return resolve_device(device)


def _labels(dataset) -> dict[str, np.ndarray]:
    """``q_``/``g_`` pids, camids and file names of the query and gallery records, in record order."""
    out = {}
    for p, split in (("q", dataset.query), ("g", dataset.gallery)):
        out[f"{p}_pids"] = np.array([r.pid for r in split], dtype=np.int64)
        out[f"{p}_camids"] = np.array([r.camid for r in split], dtype=np.int64)
        out[f"{p}_names"] = np.array([r.name for r in split], dtype=str)
    return out


def _extract(model_folder: Path, dataset, dev: torch.device, batch_size: int, flip: bool):
    """(q_feats, g_feats, image_size): BNNeck features (CPU float32) of query and gallery."""
    # Imported here: the BoT package pulls in torchvision, which the ranking metrics don't need.
    from reid_aug.bot.data import load_images
    from reid_aug.bot.features import extract_features
    from reid_aug.bot.model import CONFIG_NAME, load_bot

    model, config = load_bot(model_folder, dev)
    size = config.get("image_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"{model_folder / CONFIG_NAME}: 'image_size' must be [height, width], got {size!r}")
    feats = []
    for split in (dataset.query, dataset.gallery):
        images = load_images([r.path for r in split], tuple(size))
        feats.append(extract_features(model, images, batch_size, dev, flip=flip, progress=True))
        del images
    return feats[0], feats[1], list(size)


def model_features(
    model_folder: str | os.PathLike,
    dataset_root: str | os.PathLike,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    flip: bool = False,
) -> dict[str, np.ndarray]:
    """Query/gallery BNNeck features of a saved BoT model on ``dataset_root``, as :func:`evaluate_model` extracts them.

    Returns the FEATURE_KEYS arrays (:func:`save_features`): ``q_feats`` (Q, D) and ``g_feats`` (G, D)
    float32, ids and file names in the dataset's record order. Raises DatasetError for a bad
    dataset root, ValueError for a model folder without a valid ``image_size``.
    """
    from reid_aug.data.market import read_reid_dataset

    dataset = read_reid_dataset(dataset_root)
    q_feats, g_feats, _ = _extract(Path(model_folder), dataset, _device(device), batch_size, flip)
    return {"q_feats": q_feats.numpy(), "g_feats": g_feats.numpy(), **_labels(dataset)}


def evaluate_model(
    model_folder: str | os.PathLike,
    dataset_root: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    rerank: bool = False,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    flip: bool = False,
    features_path: str | os.PathLike | None = None,
    save_distmat: bool = False,
) -> dict[str, Any]:
    """Evaluate a saved BoT model on the query/gallery split of ``dataset_root``.

    Decodes query and gallery once at the model's ``image_size``, extracts BNNeck
    features, ranks by cosine distance and scores with :func:`evaluate_rank`
    (plus k-reciprocal re-ranking, :mod:`reid_aug.rerank`, when ``rerank``).

    ``out_path``: a ``.json`` file, or a folder that gets ``metrics.json`` (written
    atomically, so its presence marks a finished evaluation). Returns the same dict:
    metric fractions at the top level (``rank1``, ``mAP``, ``mINP``, ``cmc`` list ...),
    ``rank1_pct`` / ``mAP_pct``, the re-ranked metrics under ``rerank`` (else None),
    sizes, the model folder's SHA-256, the dataset root and the protocol string.

    ``features_path``: also write the features, ids and image names there (:func:`save_features`,
    before the metrics file), with the (Q, G) cosine ``distmat`` (not re-ranked) if ``save_distmat``;
    the metrics record the path under ``features_file``.
    """
    from reid_aug.data.market import read_reid_dataset

    if save_distmat and features_path is None:
        raise ValueError("save_distmat needs features_path (the distance matrix goes into the features file)")
    model_folder = Path(model_folder)
    dev = _device(device)
    dataset = read_reid_dataset(dataset_root)
    q_feats, g_feats, size = _extract(model_folder, dataset, dev, batch_size, flip)
    labels = _labels(dataset)
    q_pids, g_pids, q_camids, g_camids = (labels[k] for k in ("q_pids", "g_pids", "q_camids", "g_camids"))

    distmat = compute_distmat(q_feats.to(dev), g_feats.to(dev), "cosine")
    result = _summary(evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids))
    reranked = None
    if rerank:
        from reid_aug.rerank import re_ranking

        q_q = compute_distmat(q_feats, q_feats, "cosine")
        g_g = compute_distmat(g_feats, g_feats, "cosine")
        # The paper's k1 = 20, k2 = 6, lambda = 0.3; k1 shrinks only for toy sets of <= 20 images.
        k1 = min(20, len(q_pids) + len(g_pids) - 1)
        params = {"k1": k1, "k2": min(6, k1 + 1), "lambda_value": 0.3}
        rr = re_ranking(distmat.cpu(), q_q, g_g, **params)
        del g_g
        reranked = _summary(evaluate_rank(rr, q_pids, g_pids, q_camids, g_camids))
        reranked["params"] = params
    if features_path is not None:
        arrays = {"q_feats": q_feats, "g_feats": g_feats, **labels}
        if save_distmat:
            arrays["distmat"] = distmat
        save_features(features_path, arrays)
    result.update(
        {
            "rerank": reranked,
            "num_query": len(dataset.query),
            "num_gallery": len(dataset.gallery),
            "protocol": PROTOCOL,
            "distance": "cosine",
            "flip": bool(flip),
            "feature_dim": int(q_feats.shape[1]),
            "image_size": size,
            "model": str(model_folder.absolute()),
            # The weights file's hash, as train-bot's manifest records it: a metrics file matches its model.
            "model_sha256": sha256_file(Path(model_folder) / _weights_name()),
            "dataset_root": str(dataset.root),
            "layout": dataset.layout,
            "device": str(dev),
            "features_file": str(Path(features_path).absolute()) if features_path is not None else None,
        }
    )
    if out_path is not None:
        write_json_atomic(_metrics_file(out_path), result)
    return result
