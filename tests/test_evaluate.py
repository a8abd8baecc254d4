"""Market-1501 ranking metrics, distance matrices and k-reciprocal re-ranking."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from reid_aug.evaluate import compute_distmat, evaluate_rank
from reid_aug.rerank import re_ranking


def _reference_rank(distmat, q_pids, g_pids, q_camids, g_camids):
    """Per-query loop straight from the protocol's definition (stable order for ties)."""
    aps, inps, firsts = [], [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        hits = (g_pids[order] == q_pids[i])[keep]
        if not hits.any():
            continue
        ranks = np.flatnonzero(hits) + 1  # 1-based ranks of the correct matches
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inps.append(len(ranks) / ranks[-1])
        firsts.append(ranks[0])
    firsts = np.array(firsts)
    return {"mAP": np.mean(aps), "mINP": np.mean(inps), "firsts": firsts, "n": len(aps)}


def _random_case(rng, num_q=150, num_g=900, num_pids=40, ties=False):
    q_pids = rng.integers(1, num_pids, num_q)
    g_pids = rng.integers(0, num_pids + 10, num_g)  # 0 = distractors, some ids never queried
    q_camids, g_camids = rng.integers(0, 6, num_q), rng.integers(0, 6, num_g)
    dist = rng.random((num_q, num_g)).astype(np.float32)
    if ties:
        dist = np.round(dist * 20) / 20  # many equal distances per row
    return dist, q_pids, g_pids, q_camids, g_camids


def test_perfect_ranking_gives_one():
    q_pids, q_cams = np.array([1, 2, 3]), np.array([0, 0, 0])
    g_pids, g_cams = np.array([1, 2, 3, 1, 0]), np.array([1, 2, 3, 4, 1])
    dist = np.array([[0.1, 0.9, 0.9, 0.2, 0.8], [0.9, 0.1, 0.9, 0.9, 0.8], [0.9, 0.9, 0.1, 0.9, 0.8]])
    r = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=3)
    assert r["rank1"] == r["mAP"] == r["mINP"] == 1.0
    assert r["num_valid_queries"] == 3
    np.testing.assert_allclose(r["cmc"], [1.0, 1.0, 1.0])


def test_same_camera_matches_removed_other_same_camera_items_kept():
    # Query pid 1 from camera 0. Gallery: its own same-camera shot (removed), another person
    # in the same camera (kept), then the cross-camera match.
    dist = np.array([[0.1, 0.2, 0.3]])
    g_pids, g_cams = np.array([1, 2, 1]), np.array([0, 0, 1])
    r = evaluate_rank(dist, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=2)
    assert r["rank1"] == 0.0 and r["rank5"] == 1.0
    assert r["mAP"] == pytest.approx(0.5) and r["mINP"] == pytest.approx(0.5)
    np.testing.assert_allclose(r["cmc"], [0.0, 1.0])  # only 2 gallery items survive for this query


def test_distractors_stay_in_the_ranking():
    dist = np.array([[0.05, 0.2]])
    r = evaluate_rank(dist, np.array([7]), np.array([0, 7]), np.array([0]), np.array([1, 2]))
    assert r["rank1"] == 0.0 and r["mAP"] == pytest.approx(0.5)


def test_queries_without_valid_match_are_skipped():
    # Query 0 (pid 5) has only a same-camera match, query 1 (pid 9) none at all: both skipped.
    dist = np.array([[0.1, 0.5, 0.6], [0.3, 0.2, 0.1], [0.9, 0.1, 0.5]])
    q_pids, q_cams = np.array([5, 9, 6]), np.array([0, 0, 0])
    g_pids, g_cams = np.array([5, 6, 8]), np.array([0, 1, 1])
    r = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    assert r["num_valid_queries"] == 1
    assert r["rank1"] == 1.0 and r["mAP"] == 1.0


def test_no_valid_query_is_an_error():
    with pytest.raises(ValueError, match="no query has a correct match"):
        evaluate_rank(np.ones((1, 2)), np.array([1]), np.array([1, 2]), np.array([0]), np.array([0, 1]))


def test_known_ap_by_hand():
    # Kept ranking (after removing the two same-camera pid-3 entries): hit, miss, hit, miss, miss, hit.
    g_pids = np.array([3, 3, 4, 3, 3, 5, 6, 3, 0])
    g_cams = np.array([1, 0, 1, 2, 0, 1, 1, 4, 2])
    dist = np.array([[0.1, 0.15, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7]])
    r = evaluate_rank(dist, np.array([3]), g_pids, np.array([0]), g_cams, max_rank=7)
    assert r["mAP"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 6) / 3)
    assert r["mINP"] == pytest.approx(3 / 6)
    np.testing.assert_allclose(r["cmc"], np.ones(7))


def test_ties_keep_gallery_order():
    g_pids, g_cams = np.array([2, 1]), np.array([1, 1])
    first = evaluate_rank(np.array([[0.5, 0.5]]), np.array([1]), g_pids, np.array([0]), g_cams)
    assert first["rank1"] == 0.0 and first["mAP"] == pytest.approx(0.5)
    swapped = evaluate_rank(np.array([[0.5, 0.5]]), np.array([1]), g_pids[::-1].copy(), np.array([0]), g_cams)
    assert swapped["rank1"] == 1.0


@pytest.mark.parametrize("ties", [False, True])
def test_matches_reference_loop_and_chunking(ties):
    dist, q_pids, g_pids, q_cams, g_cams = _random_case(np.random.default_rng(1), ties=ties)
    ref = _reference_rank(dist, q_pids, g_pids, q_cams, g_cams)
    for chunk in (1, 17, 1000):
        r = evaluate_rank(torch.from_numpy(dist), q_pids, g_pids, q_cams, g_cams, max_rank=20, chunk_size=chunk)
        assert r["num_valid_queries"] == ref["n"]
        assert r["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
        assert r["mINP"] == pytest.approx(ref["mINP"], abs=1e-12)
        expected_cmc = [(ref["firsts"] <= k).mean() for k in range(1, 21)]
        np.testing.assert_allclose(r["cmc"], expected_cmc, atol=1e-12)
        assert r["rank5"] == pytest.approx(expected_cmc[4]) and r["rank10"] == pytest.approx(expected_cmc[9])
        assert 0.0 <= r["mINP"] <= r["mAP"] <= 1.0


def _sort_based_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, chunk_size=128):
    """The former ``evaluate_rank``: a stable argsort of every row, then masks in rank order.

    Kept as the reference the faster per-hit ranking must reproduce exactly.
    """
    dist = torch.as_tensor(distmat)
    dist = dist if dist.dtype.is_floating_point else dist.double()
    q_pids, g_pids, q_camids, g_camids = (torch.as_tensor(np.asarray(x)).long()
                                          for x in (q_pids, g_pids, q_camids, g_camids))
    num_q, num_g = dist.shape
    first_hits = torch.zeros(num_g, dtype=torch.int64)
    ap_sum = inp_sum = 0.0
    num_valid = 0
    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        order = torch.sort(dist[start:stop], dim=1, stable=True).indices
        match = g_pids[order] == q_pids[start:stop, None]
        same_cam = match & (g_camids[order] == q_camids[start:stop, None])
        good = match & ~same_cam
        num_rel = good.sum(1)
        valid = num_rel > 0
        if not bool(valid.any()):
            continue
        good, same_cam, num_rel = good[valid], same_cam[valid], num_rel[valid]
        pos = torch.cumsum(~same_cam, dim=1) - 1
        rows, cols = good.nonzero(as_tuple=True)
        hit_pos = pos[rows, cols]
        hit_ordinal = torch.cumsum(good, dim=1)[rows, cols]
        prec = hit_ordinal.double() / (hit_pos + 1).double()
        ap = torch.zeros(len(num_rel), dtype=torch.float64).index_add_(0, rows, prec) / num_rel.double()
        first = torch.full_like(num_rel, num_g).scatter_reduce_(0, rows, hit_pos, "amin")
        last = torch.full_like(num_rel, -1).scatter_reduce_(0, rows, hit_pos, "amax")
        first_hits += torch.bincount(first, minlength=num_g)
        ap_sum += float(ap.sum())
        inp_sum += float((num_rel.double() / (last + 1).double()).sum())
        num_valid += int(valid.sum())
    if num_valid == 0:
        return {"num_valid_queries": 0}
    cum = torch.cumsum(first_hits, 0).double() / num_valid
    return {"cmc": cum[: min(max_rank, num_g)].numpy(), "mAP": ap_sum / num_valid, "mINP": inp_sum / num_valid,
            "rank1": float(cum[0]), "rank5": float(cum[min(5, num_g) - 1]), "rank10": float(cum[min(10, num_g) - 1]),
            "num_valid_queries": num_valid}


def test_identical_to_sort_based_ranking_with_ties():
    """Random cases full of ties (few distinct values), same-camera matches, distractors, queries
    without a valid match and galleries shorter than max_rank: every figure equals the stable-sort one."""
    rng = np.random.default_rng(12)
    for case in range(60):
        num_q, num_g = int(rng.integers(1, 40)), int(rng.integers(1, 120 if case % 3 else 12))
        num_pids = int(rng.integers(1, 8))
        q_pids = rng.integers(0, num_pids, num_q)
        g_pids = rng.integers(0, num_pids + 2, num_g)  # 0: distractors; num_pids+1: never queried
        q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
        dist = rng.integers(0, int(rng.integers(1, 6)), (num_q, num_g))  # integer distances: many ties
        if case % 4 == 1:
            dist = dist.astype(np.float32)
        elif case % 4 == 2:
            dist = torch.from_numpy(dist).half()
        elif case % 4 == 3:
            dist = dist / 7.0  # float64
        ref = _sort_based_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20)
        if ref["num_valid_queries"] == 0:
            with pytest.raises(ValueError, match="no query has a correct match"):
                evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20)
            continue
        for chunk in (1, 7, 128):
            ours = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20, chunk_size=chunk)
            assert ours["num_valid_queries"] == ref["num_valid_queries"]
            np.testing.assert_array_equal(ours["cmc"], ref["cmc"])
            for key in ("rank1", "rank5", "rank10"):
                assert ours[key] == ref[key]
            assert ours["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
            assert ours["mINP"] == pytest.approx(ref["mINP"], abs=1e-12)


def test_max_rank_clamped_to_gallery_size():
    r = evaluate_rank(np.array([[0.3, 0.1, 0.2]]), np.array([1]), np.array([2, 1, 3]), np.array([0]), np.array([1, 1, 1]))
    assert len(r["cmc"]) == 3 and r["rank10"] == 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.ones(3), [1], [1, 2, 3], [0], [0, 1, 2]), "2-D"),
        ((np.ones((1, 3)), [1, 2], [1, 2, 3], [0], [0, 1, 2]), "q_pids"),
        ((np.ones((1, 3)), [1], [1.0, 2.0, 3.0], [0], [0, 1, 2]), "integer"),
        ((np.full((1, 3), np.nan), [1], [1, 2, 3], [0], [0, 1, 2]), "NaN"),
    ],
)
def test_bad_input_errors(args, message):
    with pytest.raises(ValueError, match=message):
        evaluate_rank(*args)


def _torchreid_file(*candidates: str) -> Path:
    """The first of ``candidates`` (paths inside the torchreid package) that exists; skip without torchreid.

    torchreid 0.2.5 lives outside the venv (the Makefile's test target puts it on PYTHONPATH).
    """
    spec = importlib.util.find_spec("torchreid")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchreid is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    pytest.skip(f"no {' or '.join(candidates)} under {root}")


def _load_by_file(name: str, path: Path):
    """One torchreid module loaded by file: its package __init__ pulls in cv2, gdown, ... we don't need."""
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cython evaluation is unavailable"
        mod_spec.loader.exec_module(module)
    return module


def _torchreid_rank_module():
    # torchreid-pip 0.2.5 / deep-person-reid layouts
    path = _torchreid_file("reid/metrics/rank.py", "metrics/rank.py")
    module = _load_by_file("_torchreid_rank", path)
    compiled = sorted(path.parent.glob("rank_cylib/rank_cy*.so")) + sorted(path.parent.glob("rank_cylib/rank_cy*.pyd"))
    cython = None
    if compiled:
        loader = importlib.machinery.ExtensionFileLoader("rank_cy", str(compiled[0]))
        cy_spec = importlib.util.spec_from_loader("rank_cy", loader)
        cython = importlib.util.module_from_spec(cy_spec)
        loader.exec_module(cython)
    return module, cython


def test_identical_to_torchreid():
    tr_rank, tr_cython = _torchreid_rank_module()
    rng = np.random.default_rng(7)
    for _ in range(3):
        dist, q_pids, g_pids, q_cams, g_cams = _random_case(rng, num_q=300, num_g=1500, num_pids=60)
        ours = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50)
        cmc, mAP = tr_rank.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, 50, use_cython=False)
        np.testing.assert_allclose(ours["cmc"], cmc, atol=1e-6)
        assert ours["mAP"] == pytest.approx(mAP, abs=1e-6)
        if tr_cython is not None:
            cmc_cy, mAP_cy = tr_cython.evaluate_cy(
                dist, q_pids.astype(np.int64), g_pids.astype(np.int64), q_cams.astype(np.int64),
                g_cams.astype(np.int64), 50, False,
            )
            np.testing.assert_allclose(ours["cmc"], cmc_cy, atol=1e-6)
            assert ours["mAP"] == pytest.approx(mAP_cy, abs=1e-6)


def test_compute_distmat_cosine_and_euclidean():
    rng = np.random.default_rng(0)
    q, g = torch.from_numpy(rng.normal(size=(4, 8))).float(), torch.from_numpy(rng.normal(size=(6, 8))).float()
    cos = compute_distmat(q, g, "cosine")
    expected = 1 - torch.nn.functional.cosine_similarity(q[:, None], g[None], dim=2)
    torch.testing.assert_close(cos, expected, atol=1e-5, rtol=0)
    assert compute_distmat(q, q, "cosine").diagonal().abs().max() < 1e-5
    euc = compute_distmat(q, g, "euclidean")
    torch.testing.assert_close(euc, torch.cdist(q, g) ** 2, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="metric"):
        compute_distmat(q, g, "manhattan")
    with pytest.raises(ValueError, match="same D"):
        compute_distmat(q, g[:, :5])


# ---- k-reciprocal re-ranking -------------------------------------------------------------------


def _dense_re_ranking(q_g, q_q, g_g, k1, k2, lam, strict=True):
    """Zhong et al. 2017 written as plainly as possible (dense, per-element loops); small N only.

    ``strict``: expansion needs overlap > 2/3 (the authors' code); False: >= 2/3 (the paper's text).
    """
    num_q = q_g.shape[0]
    d = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64)
    n = len(d)
    d = d / d.max(1, keepdims=True)
    knn = [[p] + [j for j in np.argsort(d[p], kind="stable") if j != p][:k1] for p in range(n)]

    def recip(p, k):
        return {g for g in knn[p][: k + 1] if p in knn[g][: k + 1]}

    v = np.zeros((n, n))
    for p in range(n):
        base = recip(p, k1)
        full = set(base)
        for q in base:
            cand = recip(q, int(round(k1 / 2)))
            if (3 * len(base & cand) > 2 * len(cand)) if strict else (3 * len(base & cand) >= 2 * len(cand)):
                full |= cand
        idx = sorted(full)
        v[p, idx] = np.exp(-d[p, idx]) / np.exp(-d[p, idx]).sum()
    if k2 > 1:
        v = np.stack([v[knn[p][:k2]].mean(0) for p in range(n)])
    jac = np.array([[1 - np.minimum(v[i], v[num_q + j]).sum() / np.maximum(v[i], v[num_q + j]).sum()
                     for j in range(q_g.shape[1])] for i in range(num_q)])
    return (1 - lam) * jac + lam * d[:num_q, num_q:]


def _clustered(rng, num_q, num_g, num_pids, noise, dim=16):
    centers = rng.normal(size=(num_pids, dim))
    q_pids = rng.integers(0, num_pids, num_q) + 1
    g_pids = np.concatenate([np.arange(num_pids), rng.integers(0, num_pids, num_g - num_pids)]) + 1
    q = torch.tensor(centers[q_pids - 1] + noise * rng.normal(size=(num_q, dim))).float()
    g = torch.tensor(centers[g_pids - 1] + noise * rng.normal(size=(num_g, dim))).float()
    q_cams, g_cams = rng.integers(0, 6, num_q), rng.integers(0, 6, num_g)
    return q, g, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("metric, k1, k2", [("cosine", 20, 6), ("euclidean", 6, 1), ("cosine", 8, 3)])
def test_re_ranking_matches_dense_definition(metric, k1, k2):
    q, g, *_ = _clustered(np.random.default_rng(3), 12, 40, 8, noise=0.8)
    blocks = [compute_distmat(a, b, metric).numpy() for a, b in ((q, g), (q, q), (g, g))]
    ours = re_ranking(*blocks, k1=k1, k2=k2, lambda_value=0.3, chunk_size=5)
    assert isinstance(ours, np.ndarray) and ours.shape == (12, 40) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _dense_re_ranking(*blocks, k1, k2, 0.3), atol=1e-5)


def _symmetric_blocks(rng, num_q, num_g, num_pids=5, dim=8):
    """(q_g, q_q, g_g) float32 squared Euclidean distances cut from one exactly symmetric matrix.

    Exact symmetry matters: torchreid normalises by column maxima, this code by row maxima.
    """
    n = num_q + num_g
    x = rng.normal(size=(num_pids, dim))[rng.integers(0, num_pids, n)] + 0.7 * rng.normal(size=(n, dim))
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    d = ((d + d.T) / 2).astype(np.float32)
    np.fill_diagonal(d, 0.0)
    return d[:num_q, num_q:], d[:num_q, :num_q], d[num_q:, num_q:]


def test_re_ranking_identical_to_torchreid():
    path = _torchreid_file("reid/utils/rerank.py", "utils/rerank.py")
    tr_rerank = _load_by_file("_torchreid_rerank", path).re_ranking
    rng = np.random.default_rng(11)
    for num_q, num_g, k1, k2 in [(10, 30, 4, 1), (10, 30, 5, 2), (12, 40, 6, 3), (20, 60, 20, 6), (30, 120, 20, 6)]:
        blocks = _symmetric_blocks(rng, num_q, num_g)
        # Small clustered sets hold many overlaps of exactly 2/3 of a candidate set (|R(q, k1/2)| = 3, 6,
        # ...): the paper's ">=" reads them differently, so each case exercises the strict test.
        if num_q + num_g <= 40:
            paper = _dense_re_ranking(*blocks, k1, k2, 0.3, strict=False)
            assert np.abs(paper - _dense_re_ranking(*blocks, k1, k2, 0.3)).max() > 1e-3
        ours = re_ranking(*blocks, k1=k1, k2=k2, lambda_value=0.3)
        # torchreid squares its inputs (written for plain Euclidean distances).
        theirs = tr_rerank(*(np.sqrt(b.astype(np.float64)) for b in blocks), k1=k1, k2=k2, lambda_value=0.3)
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_re_ranking_is_a_valid_distance_and_helps_clustered_data():
    q, g, q_pids, g_pids, q_cams, g_cams = _clustered(np.random.default_rng(0), 60, 400, 40, noise=1.0, dim=32)
    q_g, q_q, g_g = (compute_distmat(a, b) for a, b in ((q, g), (q, q), (g, g)))
    rr = re_ranking(q_g, q_q, g_g)
    assert isinstance(rr, torch.Tensor) and rr.shape == q_g.shape
    assert torch.isfinite(rr).all() and rr.min() >= 0 and rr.max() <= 1 + 1e-6
    before = evaluate_rank(q_g, q_pids, g_pids, q_cams, g_cams)
    after = evaluate_rank(rr, q_pids, g_pids, q_cams, g_cams)
    assert after["mAP"] >= before["mAP"]
    # lambda = 1 keeps only the (row-normalised) original distance: same ranking as before.
    only_original = re_ranking(q_g, q_q, g_g, lambda_value=1.0)
    assert evaluate_rank(only_original, q_pids, g_pids, q_cams, g_cams)["mAP"] == pytest.approx(before["mAP"])


def test_re_ranking_bad_input():
    d = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    with pytest.raises(ValueError, match="disagree"):
        re_ranking(d, np.zeros((3, 3)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        re_ranking(-d, np.zeros((3, 3)), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="k1"):
        re_ranking(d, np.zeros((3, 3)), np.zeros((5, 5)), k1=20)


# ---- evaluate_model end to end -----------------------------------------------------------------


def test_evaluate_model_end_to_end(tiny_model_and_market, tmp_path):
    import json

    from pcdms.io import sha256_file
    from reid_aug.bot.data import load_images
    from reid_aug.bot.features import extract_features
    from reid_aug.bot.model import load_bot
    from reid_aug.data.market import read_reid_dataset
    from reid_aug.evaluate import PROTOCOL, evaluate_model

    folder, market = tiny_model_and_market
    m = evaluate_model(folder, market, out_path=tmp_path / "cell", rerank=True, batch_size=4, device="cpu")
    on_disk = json.loads((tmp_path / "cell" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    dataset = read_reid_dataset(market)
    assert m["num_query"] == len(dataset.query) and m["num_gallery"] == len(dataset.gallery)
    assert m["protocol"] == PROTOCOL and m["model_sha256"] == sha256_file(folder / "model.safetensors")  # as train-bot records it
    assert m["rank1_pct"] == pytest.approx(100 * m["rank1"]) and m["mAP_pct"] == pytest.approx(100 * m["mAP"])
    k1 = min(20, m["num_query"] + m["num_gallery"] - 1)  # the toy set may hold fewer than 21 images
    assert m["rerank"]["params"] == {"k1": k1, "k2": min(6, k1 + 1), "lambda_value": 0.3}
    assert 0.0 <= m["rerank"]["mAP"] <= 1.0

    # Same numbers as doing each step by hand: the ids reach evaluate_rank in image order.
    model, _ = load_bot(folder, "cpu")
    q = extract_features(model, load_images([r.path for r in dataset.query], (64, 32), progress=False))
    g = extract_features(model, load_images([r.path for r in dataset.gallery], (64, 32), progress=False))
    by_hand = evaluate_rank(compute_distmat(q, g), [r.pid for r in dataset.query], [r.pid for r in dataset.gallery],
                            [r.camid for r in dataset.query], [r.camid for r in dataset.gallery])
    assert m["mAP"] == pytest.approx(by_hand["mAP"]) and m["cmc"] == pytest.approx(by_hand["cmc"].tolist())

    flipped = evaluate_model(folder, market, out_path=tmp_path / "flip.json", flip=True, device="cpu")
    assert (tmp_path / "flip.json").is_file() and flipped["flip"] is True and flipped["rerank"] is None


def test_evaluate_model_needs_image_size(tiny_model_and_market, tmp_path):
    import json
    import shutil

    from reid_aug.evaluate import evaluate_model

    folder, market = tiny_model_and_market
    broken = shutil.copytree(folder, tmp_path / "model")
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["image_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="image_size"):
        evaluate_model(broken, market, device="cpu")


def test_evaluate_cli_prints_summary(tiny_model_and_market, tmp_path):
    from click.testing import CliRunner

    from reid_aug.cli import main

    folder, market = tiny_model_and_market
    result = CliRunner().invoke(main, ["evaluate", "--model", str(folder), "--data", str(market),
                                       "--out", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Rank-1" in result.output and "mAP" in result.output and (tmp_path / "metrics.json").is_file()


def test_evaluate_cli_saves_features_that_reproduce_the_metrics(tiny_model_and_market, tmp_path):
    import json

    from click.testing import CliRunner

    from reid_aug.cli import main
    from reid_aug.data.market import read_reid_dataset
    from reid_aug.evaluate import FEATURE_KEYS

    folder, market = tiny_model_and_market
    feats_file = tmp_path / "feats.npz"
    result = CliRunner().invoke(main, ["evaluate", "--model", str(folder), "--data", str(market), "--out",
                                       str(tmp_path / "m.json"), "--device", "cpu", "--save-features",
                                       str(feats_file), "--save-distmat"])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["features_file"] == str(feats_file.absolute())
    with np.load(feats_file, allow_pickle=False) as npz:  # plain numpy reads it: no pickled objects
        arrays = dict(npz)
    assert set(arrays) == {*FEATURE_KEYS, "distmat"}

    dataset = read_reid_dataset(market)
    num_q, num_g, dim = len(dataset.query), len(dataset.gallery), m["feature_dim"]
    assert arrays["q_feats"].shape == (num_q, dim) and arrays["g_feats"].shape == (num_g, dim)
    assert arrays["distmat"].shape == (num_q, num_g)
    for p, split in (("q", dataset.query), ("g", dataset.gallery)):
        assert arrays[f"{p}_names"].tolist() == [r.name for r in split]
        assert arrays[f"{p}_pids"].tolist() == [r.pid for r in split]
        assert arrays[f"{p}_camids"].tolist() == [r.camid for r in split]

    distmat = compute_distmat(torch.from_numpy(arrays["q_feats"]), torch.from_numpy(arrays["g_feats"]))
    np.testing.assert_allclose(arrays["distmat"], distmat.numpy(), atol=1e-6)
    again = evaluate_rank(distmat, arrays["q_pids"], arrays["g_pids"], arrays["q_camids"], arrays["g_camids"])
    assert again["mAP"] == pytest.approx(m["mAP"]) and again["mINP"] == pytest.approx(m["mINP"])
    assert again["cmc"].tolist() == pytest.approx(m["cmc"])

    # Without --save-distmat the file holds only the named arrays; --save-distmat alone is refused.
    result = CliRunner().invoke(main, ["evaluate", "--model", str(folder), "--data", str(market), "--out",
                                       str(tmp_path), "--device", "cpu", "--save-features", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "f") as npz:
        assert set(npz.files) == set(FEATURE_KEYS)
    result = CliRunner().invoke(main, ["evaluate", "--model", str(folder), "--data", str(market), "--out",
                                       str(tmp_path), "--save-distmat"])
    assert result.exit_code != 0 and "--save-features" in result.output


def test_features_file_errors(tmp_path):
    from reid_aug.evaluate import load_features, save_features

    arrays = {"q_feats": np.ones((2, 3), np.float32), "g_feats": np.ones((4, 3), np.float32),
              "q_pids": [1, 2], "g_pids": [1, 2, 2, 0], "q_camids": [0, 0], "g_camids": [1, 1, 2, 0],
              "q_names": ["a.jpg", "b.jpg"], "g_names": ["c.jpg", "d.jpg", "e.jpg", "f.jpg"]}
    save_features(tmp_path / "ok.npz", arrays)
    assert load_features(tmp_path / "ok.npz")["g_names"].tolist() == arrays["g_names"]
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_features(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"text\.npz: not a features \.npz"):
        load_features(tmp_path / "text.npz")
    with pytest.raises(ValueError, match="missing q_names"):
        save_features(tmp_path / "x.npz", {k: v for k, v in arrays.items() if k != "q_names"})
    with pytest.raises(ValueError, match="g_pids must be a 1-D integer array of length 4"):
        save_features(tmp_path / "x.npz", {**arrays, "g_pids": [1, 2]})
    with pytest.raises(ValueError, match=r"distmat must have shape \(2, 4\)"):
        save_features(tmp_path / "x.npz", {**arrays, "distmat": np.zeros((4, 2))})
    assert not (tmp_path / "x.npz").exists()
