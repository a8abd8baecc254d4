"""Stage checkpoints as diffusers-style folders: ``config.json`` + ``model.safetensors``.

``config.json`` holds the stage name, the preset name and the full stage
config, so :func:`load_model` rebuilds the exact network (custom sizes
included) and loads the weights strictly. Each file is written atomically.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pcdms.io import atomic_path, read_json_object, write_json_atomic
from pcdms.models import STAGES, build_stage
from pcdms.presets import PriorConfig, UNetStageConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def config_from_dict(cls: type, data: dict, source: str = "config") -> typing.Any:
    """Rebuild the frozen dataclass ``cls`` from JSON data (lists back to tuples); unknown or missing keys raise."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected an object for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} keys {unknown}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        # JSON has no tuples; every sequence field of the configs is a tuple.
        if isinstance(value, list) and _is_tuple_type(hints[key]):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{source}: {err}") from None


def _is_tuple_type(hint: typing.Any) -> bool:
    if typing.get_origin(hint) is tuple:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_tuple_type(a) for a in typing.get_args(hint))
    return False


def _stage_config_cls(stage: str) -> type:
    return PriorConfig if stage == "prior" else UNetStageConfig


def save_model(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``model`` (built by :func:`pcdms.build_model`) to ``folder``; returns the folder.

    Weights are stored in their current dtype; tensors are copied to CPU.
    """
    for attr in ("stage", "config", "preset_name"):
        if not hasattr(model, attr):
            raise ValueError(f"save_model: model has no .{attr}; build it with pcdms.build_model / build_stage")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if any(v.is_meta for v in state.values()):
        raise ValueError("save_model: model has meta tensors (no data); materialise it before saving")
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "stage": model.stage})
    # config.json last: its presence marks a complete checkpoint.
    write_json_atomic(
        folder / CONFIG_NAME,
        {
            "format_version": FORMAT_VERSION,
            "stage": model.stage,
            "preset": model.preset_name,
            "config": dataclasses.asdict(model.config),
        },
    )
    return folder


def read_config(folder: str | os.PathLike) -> tuple[str, str, PriorConfig | UNetStageConfig]:
    """(stage, preset name, stage config) from ``folder/config.json``; clear errors for bad files."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint config missing: {path} (a folder written by pcdms save_model)")
    data = read_json_object(path)
    stage = data.get("stage")
    if stage not in STAGES:
        raise ValueError(f"{path}: 'stage' must be one of {list(STAGES)}, got {stage!r}")
    if "config" not in data:
        raise ValueError(f"{path}: no 'config' entry")
    config = config_from_dict(_stage_config_cls(stage), data["config"], source=str(path))
    return stage, str(data.get("preset", "custom")), config


def load_model(
    folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Rebuild the network saved in ``folder`` and load its weights strictly, in eval mode.

    ``dtype`` casts floating-point weights (``None`` keeps the stored dtype).
    """
    stage, preset_name, config = read_config(folder)
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights missing: {weights}")
    state = load_file(str(weights), device=str(device))
    # Skip random init: build on meta, then take the stored tensors as the parameters.
    with torch.device("meta"):
        model = build_stage(stage, config, preset_name)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{weights}: weights do not match the {stage} config in {CONFIG_NAME}: {err}") from None
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{weights}: no stored values for {left}")
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()
