"""The BoT training configuration and its learning-rate schedule.

Defaults are the published Market-1501 recipe of Luo et al., "Bag of Tricks and
A Strong Baseline for Deep Person Re-identification" (CVPRW 2019), as its
reference code (reid-strong-baseline, ``softmax_triplet_with_center.yml``) runs it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from reid_aug.bot.model import BACKBONES, NECK_FEATS


@dataclass(frozen=True)
class BotConfig:
    """BoT training recipe; the defaults are the published Market-1501 recipe (with center loss),
    except ``pretrained`` (a local torchvision ResNet ``.pth``; None = random init)."""

    backbone: str = "resnet50"
    last_stride: int = 1
    neck_feat: str = "after"  # test feature: after the BNNeck (recipe) or before it
    pretrained: str | None = None
    image_size: tuple[int, int] = (256, 128)  # (H, W)
    epochs: int = 120
    batch_size: int = 64  # P x K, global over all processes
    num_instances: int = 4  # K
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    warmup_epochs: int = 10
    warmup_factor: float = 0.01
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = 0.1
    label_smooth: float = 0.1
    triplet_margin: float = 0.3
    center_loss_weight: float = 5e-4  # 0 turns the center loss off
    center_lr: float = 0.5
    flip_prob: float = 0.5
    padding: int = 10
    erase_prob: float = 0.5
    synthetic_share: float | None = None  # share of every batch that is synthetic; None pools all images
    # Pooled real + synthetic: "all" = an epoch passes over every image once (longer epochs, more
    # optimizer steps than the standard run); "real" = an epoch has as many batches as the real
    # subset alone gives, so an augmented run makes the standard run's optimizer steps and drops
    # its lr at the same steps: a gain is then not just longer training.
    epoch_steps: str = "all"
    seed: int = 0
    # Mixed precision (train.autocast_dtype): bfloat16 autocast on CUDA (float16 + loss scaling where
    # bf16 is missing) and on CPUs with native bf16 (AVX512-BF16/AMX); float32 elsewhere.
    amp: bool = True
    channels_last: bool = True  # CUDA only
    num_workers: int = 0  # image decoding threads; 0 = one per CPU (at most 16)
    log_every: int = 20  # iterations between progress-bar updates
    keep_checkpoint: bool = True  # keep checkpoint.pt after the final model is written

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.neck_feat not in NECK_FEATS:
            raise ValueError(f"neck_feat must be one of {list(NECK_FEATS)}, got {self.neck_feat!r}")
        if self.last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}")
        if len(self.image_size) != 2 or min(self.image_size) < 16:
            raise ValueError(f"image_size must be (H, W), each >= 16, got {self.image_size}")
        if self.epochs < 1 or self.num_instances < 1 or self.batch_size < 1:
            raise ValueError("epochs, batch_size and num_instances must be >= 1")
        if self.batch_size % self.num_instances or self.batch_size // self.num_instances < 2:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of num_instances ({self.num_instances}) "
                "holding at least 2 identities (the triplet loss needs negatives)"
            )
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must increase, got {self.milestones}")
        if self.lr <= 0 or self.weight_decay < 0 or self.center_lr <= 0 or self.center_loss_weight < 0:
            raise ValueError("lr and center_lr must be > 0, weight_decay and center_loss_weight >= 0")
        if self.warmup_epochs < 0 or not 0 < self.warmup_factor <= 1:
            raise ValueError("warmup_epochs must be >= 0 and warmup_factor in (0, 1]")
        for name in ("flip_prob", "erase_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.epoch_steps not in ("all", "real"):
            raise ValueError(f"epoch_steps must be 'all' or 'real', got {self.epoch_steps!r}")
        if self.synthetic_share is not None:
            p = self.batch_size // self.num_instances
            n_syn = round(self.synthetic_share * p)
            if not 0 < self.synthetic_share < 1 or not 1 <= n_syn <= p - 1:
                raise ValueError(
                    f"synthetic_share {self.synthetic_share} gives {n_syn} of the {p} identities of a batch; "
                    f"it must leave between 1 and {p - 1} synthetic identities (or be null to pool all images)"
                )
        if self.seed < 0 or self.num_workers < 0 or self.log_every < 1 or self.padding < 0:
            raise ValueError("seed, num_workers and padding must be >= 0, log_every >= 1")

    @property
    def num_pids_per_batch(self) -> int:
        return self.batch_size // self.num_instances


def lr_factor(epoch: int, cfg: BotConfig) -> float:
    """Multiplier of ``cfg.lr`` during 0-based ``epoch``.

    The reference code (reid-strong-baseline) steps its WarmupMultiStepLR at the START of
    every epoch, so 1-based epoch ``t`` trains at ``f(t)``: linear
    ``warmup_factor * (1 - t/W) + t/W`` for ``t < W`` (0.109 at t = 1, 1.0 from t = W = 10
    on), times ``gamma`` for each milestone ``<= t``: x0.1 from t = 40 (0-based ``epoch``
    39), x0.01 from t = 70 (``epoch`` 69). The paper's Eq. for lr(t) has 3.5e-4 for
    10 < t <= 40, 3.5e-5 for 40 < t <= 70 and 3.5e-6 for 70 < t <= 120, so its steps come
    one epoch LATER (t = 41 and 71) than here; this follows the code, which produced the
    published numbers. The warmup is the code's too (the paper's also rises linearly over
    t <= 10).
    """
    t = epoch + 1
    warm = 1.0
    if t < cfg.warmup_epochs:
        alpha = t / cfg.warmup_epochs
        warm = cfg.warmup_factor * (1.0 - alpha) + alpha
    return warm * cfg.gamma ** bisect.bisect_right(list(cfg.milestones), t)
