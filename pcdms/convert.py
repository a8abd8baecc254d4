"""Convert the official PCDMs release (tencent-ailab/PCDMs) into :mod:`pcdms` stage networks.

The released checkpoints (DeepFashion only) are DeepSpeed files
``mp_rank_00_model_states.pt`` whose weights sit under ``["module"]``:
stage 1 is ``Stage1_PriorTransformer``'s state dict, stages 2 and 3 are the
training wrapper ``SDModel`` (``unet.*``, ``pose_proj.*`` for stage 2,
``image_proj_model_p.*``). Our modules use the same names, so conversion is
unwrapping plus a strict check of every key and shape against the
``paper`` network; anything unmapped, missing or mis-shaped is an error
that lists it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from pcdms.io import read_torch_file
from pcdms.models import STAGES, build_model
from pcdms.presets import Preset

# Non-persistent buffers that some diffusers versions did write into state dicts; they carry no weights.
_IGNORED_KEYS = {"prior": ("causal_attention_mask",), "inpaint": (), "refine": ()}
_MAX_LISTED = 30


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def unwrap_official(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The module state dict inside a released file (``["module"]``), without a DDP ``module.`` prefix."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"official checkpoint must be a dict, got {type(checkpoint).__name__}")
    state = checkpoint["module"] if isinstance(checkpoint.get("module"), Mapping) else checkpoint
    non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        listed = _listing(sorted(map(str, non_tensors)))
        raise ValueError(f"official checkpoint: entries that are not tensors (is this a weights file?): {listed}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def from_official(
    state_dict: Mapping, stage: str, preset: str | Preset = "paper"
) -> dict[str, torch.Tensor]:
    """Our state dict for ``stage`` from an official one (whole DeepSpeed file dict or its ``module``).

    The result loads with ``build_model(stage, preset).load_state_dict(out, strict=True)``.
    Raises ``ValueError`` listing unexpected keys, missing keys and shape mismatches.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown PCDMs stage {stage!r}; choose one of {list(STAGES)}")
    state = unwrap_official(state_dict)
    for key in _IGNORED_KEYS[stage]:
        state.pop(key, None)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(stage, preset).state_dict().items()}
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != expected[k]
    )
    problems = []
    if unexpected:
        problems.append(f"unmapped keys in the file: {_listing(unexpected)}")
    if missing:
        problems.append(f"keys the {stage} model needs but the file lacks: {_listing(missing)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        name = preset if isinstance(preset, str) else preset.name
        raise ValueError(f"official {stage} checkpoint does not match preset {name!r}; " + "; ".join(problems))
    return {k: state[k] for k in expected}


def read_official_file(path: str | os.PathLike, trust_pickle: bool = False) -> Mapping:
    """``torch.load`` a released file on CPU, with ``weights_only=True`` unless ``trust_pickle``.

    DeepSpeed files may pickle non-tensor objects (optimizer or config
    entries) that the safe loader refuses; ``trust_pickle=True`` runs the
    file's pickle code, so only use it on files from a source you trust.
    """
    return read_torch_file(path, "the release's mp_rank_00_model_states.pt for the stage", trust_pickle)


def load_official(
    path: str | os.PathLike,
    stage: str,
    preset: str | Preset = "paper",
    dtype: torch.dtype | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """The ``stage`` network with weights from a released file, in eval mode on CPU.

    ``dtype`` casts floating-point weights (``None`` keeps the file's dtype,
    typically fp16 for DeepSpeed runs).
    """
    state = from_official(read_official_file(path, trust_pickle), stage, preset)
    # Skip random init of ~1e9 parameters: build on meta and adopt the file's tensors.
    with torch.device("meta"):
        model = build_model(stage, preset)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()
