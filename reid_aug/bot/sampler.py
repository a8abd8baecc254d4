"""P x K identity batches for the triplet loss.

Hermans et al. (arXiv 1703.07737, Sec. 3) sample P identities and K images of
each so every anchor has positives and negatives in its batch; BoT uses
P = 16, K = 4. One epoch, as in the reference code: every identity's images are
shuffled and cut into chunks of K (an identity with fewer than K images is
topped up by drawing with replacement; a last incomplete chunk is dropped),
then batches take one chunk from each of P distinct identities drawn at random
among those with chunks left, until fewer than P identities remain.

Every draw comes from ``numpy.random.default_rng([seed, stream, epoch, cycle])``,
so an epoch's batches depend only on the seed and the epoch number: resuming
at an epoch boundary needs no generator state, and all DDP ranks compute the
same global batches, each taking its own slice.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


class RandomIdentitySampler:
    """Yields batches (lists of dataset indices) of ``batch_size // world_size`` images for this rank.

    Args:
        pids: (N,) identity of each dataset index (any hashable ints: labels or pids).
        batch_size: global batch, ``P * K``; must be a multiple of ``num_instances * world_size``.
        num_instances: K, images per identity in a batch.
        seed: base seed; ``stream`` separates independent samplers that share it.
        rank, world_size: DDP rank takes the ``rank``-th contiguous slice of every batch
            (``P / world_size`` whole identities; the metric losses gather the global batch anyway).
    """

    def __init__(
        self,
        pids: Sequence[int],
        batch_size: int,
        num_instances: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        stream: int = 0,
    ):
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        if batch_size < num_instances or batch_size % (num_instances * world_size):
            raise ValueError(
                f"batch size {batch_size} must be a positive multiple of num_instances ({num_instances}) "
                f"x number of processes ({world_size})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.pids = np.asarray(pids, dtype=np.int64)
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.seed, self.stream = int(seed), int(stream)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        groups: dict[int, list[int]] = {}
        for index, pid in enumerate(self.pids.tolist()):
            groups.setdefault(pid, []).append(index)
        self.index_by_pid = {pid: np.asarray(groups[pid], dtype=np.int64) for pid in sorted(groups)}
        if len(self.index_by_pid) < self.num_pids_per_batch:
            raise ValueError(
                f"a batch of {batch_size} = {self.num_pids_per_batch} identities x {num_instances} images "
                f"needs at least {self.num_pids_per_batch} identities, the data has {len(self.index_by_pid)}"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self, epoch: int, cycle: int = 0) -> list[np.ndarray]:
        """All batches of ``epoch`` (each ``(batch_size,)`` indices, K consecutive per identity).

        ``cycle`` > 0 gives further independent passes over the data within one epoch
        (used when a smaller pool must supply batches for a whole epoch of another).
        """
        rng = np.random.default_rng([self.seed, self.stream, int(epoch), int(cycle)])
        k = self.num_instances
        chunks: dict[int, list[np.ndarray]] = {}
        for pid, idxs in self.index_by_pid.items():
            idxs = rng.choice(idxs, size=k, replace=True) if len(idxs) < k else rng.permutation(idxs)
            chunks[pid] = [idxs[i : i + k] for i in range(0, len(idxs) - k + 1, k)]
        available = list(self.index_by_pid)
        batches = []
        while len(available) >= self.num_pids_per_batch:
            chosen = rng.choice(len(available), size=self.num_pids_per_batch, replace=False)
            picked = [available[i] for i in chosen]
            batches.append(np.concatenate([chunks[pid].pop(0) for pid in picked]))
            available = [pid for pid in available if chunks[pid]]
        return batches

    def rank_slice(self, batch: np.ndarray) -> list[int]:
        per_rank = self.batch_size // self.world_size
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches(self.epoch):
            yield self.rank_slice(batch)

    def __len__(self) -> int:
        """Batches in the current epoch (exact; it varies a little from epoch to epoch)."""
        return len(self.global_batches(self.epoch))

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "stream": self.stream, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["seed"], state["stream"]) != (self.seed, self.stream):
            raise ValueError(f"sampler state is for seed/stream {state['seed']}/{state['stream']}, not {self.seed}/{self.stream}")
        self.epoch = int(state["epoch"])


def mixed_epoch_batches(
    real: RandomIdentitySampler, synthetic: RandomIdentitySampler, epoch: int, synthetic_offset: int
) -> list[list[int]]:
    """One epoch of this rank's batches, each = a ``real`` batch + a ``synthetic`` batch.

    The real sampler sets the epoch length; the synthetic one starts new passes
    (cycles) when it runs out. Synthetic indices are shifted by ``synthetic_offset``
    (the synthetic images follow the real ones in one combined image tensor).
    """
    real_batches = real.global_batches(epoch)
    syn_batches: list[np.ndarray] = []
    cycle = 0
    while len(syn_batches) < len(real_batches):
        syn_batches.extend(synthetic.global_batches(epoch, cycle))
        cycle += 1
    return [
        real.rank_slice(r) + [i + synthetic_offset for i in synthetic.rank_slice(s)]
        for r, s in zip(real_batches, syn_batches)
    ]
