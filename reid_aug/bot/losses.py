"""The three BoT losses: label-smoothed ID loss, batch-hard triplet loss, center loss.

BoT (Luo et al., CVPRW 2019) trains with ``L = L_ID + L_triplet + beta * L_center``:
the ID loss on the classifier logits (after the BNNeck), the triplet and center
losses on the pooled feature before it. All losses compute in float32, also
under autocast, because distances of 2048-d features overflow float16.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class CrossEntropyLabelSmooth(nn.Module):
    """Cross entropy against smoothed targets ``(1 - eps) * onehot + eps / C``.

    Label smoothing: Szegedy et al., "Rethinking the Inception Architecture for
    Computer Vision" (CVPR 2016), Sec. 7; BoT uses ``eps = 0.1``.
    ``forward(logits (B, C), targets (B,) int64) -> ()``, the mean over the batch.
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1):
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label smoothing epsilon must be in [0, 1), got {epsilon}")
        self.num_classes = num_classes
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)
        smooth = torch.full_like(log_probs, self.epsilon / self.num_classes)
        smooth.scatter_add_(1, targets[:, None], torch.full_like(log_probs[:, :1], 1.0 - self.epsilon))
        return -(smooth * log_probs).sum(1).mean()


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(M, D), (N, D) -> (M, N)`` Euclidean distances; squared distances clamp at 1e-12 before the sqrt
    so the gradient stays finite on (near-)identical pairs."""
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1)[None, :] - 2.0 * (x @ y.T)
    return d2.clamp(min=1e-12).sqrt()


def hard_example_mining(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each anchor of ``dist (B, B)``: (farthest positive, closest negative), each ``(B,)``.

    The anchor itself counts as a positive (distance ~0), so an identity seen once
    in the batch has ``dist_ap`` ~ 0; an anchor without negatives gets ``dist_an = inf``.
    """
    same = labels[:, None] == labels[None, :]
    dist_ap = dist.masked_fill(~same, float("-inf")).amax(1)
    dist_an = dist.masked_fill(same, float("inf")).amin(1)
    return dist_ap, dist_an


class TripletLoss(nn.Module):
    """Batch-hard triplet loss with a margin on Euclidean distances.

    Hermans, Beyer and Leibe, "In Defense of the Triplet Loss for Person
    Re-Identification" (arXiv 1703.07737, 2017), Eq. 5 (batch hard): for every anchor,
    ``max(0, margin + max_pos d(a, p) - min_neg d(a, n))``, averaged over the batch.
    BoT uses margin 0.3 on the un-normalised pooled feature.
    ``forward(feats (B, D), labels (B,)) -> ()``.
    """

    def __init__(self, margin: float = 0.3):
        super().__init__()
        if margin <= 0:
            raise ValueError(f"triplet margin must be > 0, got {margin}")
        self.margin = margin

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        feats = feats.float()
        dist_ap, dist_an = hard_example_mining(euclidean_dist(feats, feats), labels)
        return F.relu(dist_ap - dist_an + self.margin).mean()


class CenterLoss(nn.Module):
    """Center loss: the squared distance of each feature to the center of its class.

    Wen et al., "A Discriminative Feature Learning Approach for Deep Face
    Recognition" (ECCV 2016), Eq. 2, as BoT implements it: ``sum_i ||x_i - c_{y_i}||^2 / B``
    (no 1/2), centers initialised from N(0, 1) and learned by their own SGD optimiser
    (BoT: lr 0.5, gradients rescaled by ``1 / weight`` so the loss weight does not slow
    the centers down). ``centers``: ``(num_classes, feat_dim)``.
    ``forward(feats (B, D), labels (B,)) -> ()``.
    """

    def __init__(self, num_classes: int, feat_dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d2 = (feats.float() - self.centers[labels]).pow(2).sum(1)
        return d2.clamp(1e-12, 1e12).mean()


def gather_batch(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch ``(world * B, D), (world * B,)`` from every DDP rank's ``(B, D), (B,)``, rank order.

    Metric losses need the whole batch: with DDP each rank holds ``P / world`` identities, so mining
    triplets per rank finds fewer (or no) negatives, and a rank with one identity has none at all.
    fast-reid gathers for the same reason. The gather is differentiable:
    every rank computes the same global loss and sends each other rank the gradient for its features,
    so after DDP's gradient averaging the update equals one process's on the whole batch
    (``W`` ranks x ``1/W`` average). Without a process group it returns its inputs.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return feats, labels
    all_labels = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(all_labels, labels.contiguous())
    return _GatherFeatures.apply(feats.contiguous()), torch.cat(all_labels)


class _GatherFeatures(torch.autograd.Function):
    """All-gather along dim 0 with a gradient: backward sums every rank's gradient of the gathered tensor
    and keeps this rank's rows. (torch.distributed.nn's all_gather does this but is deprecated, and
    the replacement it names is private; all_reduce also works on gloo, which lacks reduce_scatter.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = (dist.get_rank() * x.shape[0], x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start, n = ctx.rows
        return grad[start:start + n]
