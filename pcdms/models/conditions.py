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
