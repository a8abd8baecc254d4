"""The three PCDMs stage networks (Shen et al., ICLR 2024, Sec. 3.2-3.4).

- ``prior``   :class:`PosePriorTransformer` predicts the target's CLIP image embedding;
- ``inpaint`` :class:`InpaintModel` inpaints the target half of a [source | target] canvas;
- ``refine``  :class:`RefineModel` refines the coarse target image.

Each carries its frozen config (``model.config``), its stage name
(``model.stage``) and the preset it was built from (``model.preset_name``),
which is what :mod:`pcdms.checkpoint` saves. Stages 2 and 3 start from
Stable Diffusion 2.1-base with :func:`init_from_stable_diffusion`.
"""

from __future__ import annotations

import torch
from torch import nn

from pcdms.models.inpaint import InpaintModel
from pcdms.models.prior import PosePriorTransformer
from pcdms.models.refine import RefineModel
from pcdms.models.sd_init import init_from_stable_diffusion
from pcdms.presets import Preset, PriorConfig, UNetStageConfig, get_preset

STAGES = ("prior", "inpaint", "refine")


def build_stage(stage: str, config: PriorConfig | UNetStageConfig, preset_name: str = "custom") -> nn.Module:
    """The ``stage`` network for an explicit stage config, randomly initialised."""
    if stage == "prior":
        if not isinstance(config, PriorConfig):
            raise ValueError(f"stage 'prior' needs a PriorConfig, got {type(config).__name__}")
        model: nn.Module = PosePriorTransformer(config)
    elif stage in ("inpaint", "refine"):
        if not isinstance(config, UNetStageConfig):
            raise ValueError(f"stage {stage!r} needs a UNetStageConfig, got {type(config).__name__}")
        model = InpaintModel(config) if stage == "inpaint" else RefineModel(config)
    else:
        raise ValueError(f"unknown PCDMs stage {stage!r}; choose one of {list(STAGES)}")
    model.stage = stage
    model.preset_name = preset_name
    return model


def build_model(stage: str, preset: str | Preset = "tiny") -> nn.Module:
    """A randomly initialised stage network ("prior" | "inpaint" | "refine") of ``preset``.

    Works under ``with torch.device("meta"):`` (no weights are read or
    computed from data), which is how parameter counts of the paper size
    are taken without allocating memory.
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    if stage not in STAGES:
        raise ValueError(f"unknown PCDMs stage {stage!r}; choose one of {list(STAGES)}")
    return build_stage(stage, getattr(preset, stage), preset.name)


def stage_parameter_counts(preset: str | Preset = "tiny") -> dict[str, dict]:
    """Per stage: ``{"total": n, "parts": {child module: n}}``, counted on the meta device (no memory)."""
    counts = {}
    with torch.device("meta"):
        for stage in STAGES:
            model = build_model(stage, preset)
            parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
            parts.update({name: p.numel() for name, p in model.named_parameters(recurse=False)})
            counts[stage] = {"total": sum(p.numel() for p in model.parameters()), "parts": parts}
    return counts


__all__ = [
    "STAGES",
    "InpaintModel",
    "PosePriorTransformer",
    "RefineModel",
    "build_model",
    "build_stage",
    "init_from_stable_diffusion",
    "stage_parameter_counts",
]
