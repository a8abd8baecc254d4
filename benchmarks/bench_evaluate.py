"""Time Market-1501-sized evaluation: ``compute_distmat`` + ``evaluate_rank`` on 3,368 x 15,913.

Random features stand in for a model's (the ranking metrics' cost does not depend on how
good the ranking is); pids/camids mimic Market's test split: 750 identities over 6
cameras, ~2,800 distractors (pid 0) in the gallery. Also times numpy's
``np.argsort(distmat, axis=1)`` of the same matrix for reference. Appends one row per timed
step to benchmarks/RESULTS.md (median of --repeats runs).

    python benchmarks/bench_evaluate.py [--threads 1] [--repeats 3] [--device cpu] [--rerank]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from _results import device_name, record
from reid_aug.evaluate import compute_distmat, evaluate_rank

NUM_Q, NUM_G, NUM_PIDS, NUM_DISTRACTORS, DIM = 3368, 15913, 750, 2793, 2048


def market_like_ids(rng: np.random.Generator):
    """(q_pids, g_pids, q_camids, g_camids) shaped like Market's query/gallery split."""
    q_pids = rng.integers(1, NUM_PIDS + 1, NUM_Q)
    g_pids = np.concatenate([rng.integers(1, NUM_PIDS + 1, NUM_G - NUM_DISTRACTORS), np.zeros(NUM_DISTRACTORS, int)])
    return q_pids, rng.permutation(g_pids), rng.integers(0, 6, NUM_Q), rng.integers(0, 6, NUM_G)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the features and distmat live")
    parser.add_argument("--rerank", action="store_true", help="also time k-reciprocal re-ranking (needs ~3 GB RAM)")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    q_pids, g_pids, q_cams, g_cams = market_like_ids(rng)
    gen = torch.Generator().manual_seed(0)
    q_feats = torch.randn(NUM_Q, DIM, generator=gen).to(device)
    g_feats = torch.randn(NUM_G, DIM, generator=gen).to(device)

    def timed(fn):
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return out, statistics.median(times)

    distmat, t_dist = timed(lambda: compute_distmat(q_feats, g_feats, "cosine"))
    metrics, t_rank = timed(lambda: evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50))
    # Reference point: numpy's (unstable, single-threaded) argsort of every row, torchreid's first step.
    dist_np = distmat.cpu().numpy()
    _, t_argsort = timed(lambda: np.argsort(dist_np, axis=1))
    settings = f"{NUM_Q}x{NUM_G}, D={DIM}, {NUM_DISTRACTORS} distractors, median of {args.repeats}"
    results = [
        ("bench_evaluate compute_distmat (cosine)", f"{t_dist:.3f} s", settings),
        ("bench_evaluate evaluate_rank", f"{t_rank:.2f} s", f"{settings}, max_rank 50, chunk 128, ranking on {device.type}"),
        ("bench_evaluate np.argsort(distmat, axis=1) (reference)", f"{t_argsort:.2f} s",
         f"{settings}, float32, numpy {np.__version__} default kind, 1 thread"),
    ]
    if args.rerank:
        from reid_aug.rerank import re_ranking

        q_q = compute_distmat(q_feats, q_feats).cpu()
        g_g = compute_distmat(g_feats, g_feats).cpu()
        q_g = distmat.cpu()
        _, t_rr = timed(lambda: re_ranking(q_g, q_q, g_g))
        results.append(("bench_evaluate re_ranking", f"{t_rr:.1f} s", f"{settings}, k1 20, k2 6, lambda 0.3 (on CPU)"))
    print(f"sanity: {metrics['num_valid_queries']} valid queries, Rank-1 {metrics['rank1']:.4f} (random features)")
    name = device_name(device)
    record(results, name, args.no_write)


if __name__ == "__main__":
    main()
