"""Per-sample condition dropout for classifier-free guidance (Ho & Salimans 2022; PCDMs App. B: 10 %).

Training replaces a condition by its *null* value in a random subset of the
batch; sampling evaluates the same network on that exact null value for the
unconditional branch. Each stage defines its null on the model
(``null_condition``) and uses these helpers to drop to it, so both sides
share one definition.
"""

from __future__ import annotations

import torch


def drop_mask(batch: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(B,) bool, True where the condition is dropped; drawn on ``generator``'s device, returned on ``device``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {p}")
    draw_device = generator.device if generator is not None else device
    return (torch.rand(batch, generator=generator, device=draw_device) < p).to(device)


def replace_rows(x: torch.Tensor, null: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``x`` with the rows where ``drop`` (B,) is True taken from ``null`` (same shape as ``x``)."""
    keep = (~drop).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep, x, null.to(dtype=x.dtype))


def condition_masks(
    batch: int, num_conditions: int, p_joint: float, p_extra: float, generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """(num_conditions, B) bool drop masks for training (DESIGN.md §7).

    One draw per sample drops every condition together with probability
    ``p_joint`` (the all-null input the guided sampler's unconditional branch
    uses); each condition is also dropped on its own with probability
    ``p_extra`` (0 = joint drops only). Drawn joint first, then one row per
    condition, so a generator gives the same masks for the same batch size.
    """
    joint = drop_mask(batch, p_joint, generator, device)
    extra = [drop_mask(batch, p_extra, generator, device) for _ in range(num_conditions)]
    return torch.stack([joint | e for e in extra])


def check_masks(masks: torch.Tensor, num_conditions: int, batch: int) -> torch.Tensor:
    """``masks`` as a (num_conditions, B) bool tensor; ``ValueError`` on another shape."""
    if masks.shape != (num_conditions, batch):
        raise ValueError(f"condition masks must be ({num_conditions}, {batch}), got {tuple(masks.shape)}")
    return masks.bool()
