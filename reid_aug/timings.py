"""Measured synthesis speed, kept so that ``synthesize --dry-run`` can say how long a job will take.

Every PCDMs synthesis run records its steady-state seconds per image (the first batch, which
pays for warm-up, is left out when there are others) in ``<cache>/synthesis-timings.json``
(:func:`reid_aug.workspace.cache_dir`), keyed by what decides the speed: the pipeline weights'
hash, device type, dtype, sampler, steps, stage setting, batch size, whether guidance runs
the unconditional branch and the refining strength. A dry run looks its job up there; without
an exact match it scales a timing of the same pipeline, device, dtype, stages, guided stages,
refine strength and batch size by the number of steps (the denoising loop dominates), and says so.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from pcdms.io import write_json_atomic

TIMINGS_FILE = "synthesis-timings.json"


@dataclass(frozen=True)
class TimingKey:
    pipeline_sha256: str
    device: str  # "cpu", "cuda", "mps"
    dtype: str
    scheduler: str
    num_inference_steps: int
    stages: str
    batch_size: int
    guided: str  # the stages run whose guidance_scale != 1 (their unconditional branch runs too), or "none"
    refine_strength: float = 1.0  # below 1 the refining stage runs fewer steps (1.0 without refining)

    def text(self) -> str:
        return "|".join(str(v) for v in asdict(self).values())


def _path():
    from reid_aug.workspace import cache_dir

    return cache_dir() / TIMINGS_FILE


def _read() -> dict[str, Any]:
    path = _path()
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # no timing yet, or a damaged file: estimates are a convenience, never an error
    return data if isinstance(data, dict) else {}


def record_timing(key: TimingKey, seconds_per_image: float, images: int, device_name: str = "") -> None:
    """Store (replace) the timing of ``key``; a cache folder that cannot be written is skipped silently."""
    data = _read()
    data[key.text()] = {**asdict(key), "seconds_per_image": seconds_per_image, "images": images,
                        "device_name": device_name,
                        "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        write_json_atomic(_path(), data)
    except OSError:
        pass


def estimate_seconds_per_image(key: TimingKey) -> tuple[float, str] | None:
    """``(seconds per image, how it was obtained)`` for a job of ``key``, or None when nothing comparable
    was ever timed on this machine."""
    data = _read()
    exact = data.get(key.text())
    if exact is not None:
        return exact["seconds_per_image"], (f"measured {exact['measured'][:10]} on {exact['images']:,} images "
                                            f"({exact.get('device_name') or key.device})")
    same = ("pipeline_sha256", "device", "dtype", "stages", "batch_size", "guided", "refine_strength")
    want = asdict(key)
    # A timing recorded before a field existed holds that field's default (refine_strength: 1.0).
    defaults = {f.name: f.default for f in fields(TimingKey)}
    near = [t for t in data.values() if all(t.get(k, defaults[k]) == want[k] for k in same)]
    if not near:
        return None
    best = min(near, key=lambda t: abs(t["num_inference_steps"] - key.num_inference_steps))
    scaled = best["seconds_per_image"] * key.num_inference_steps / best["num_inference_steps"]
    return scaled, (f"scaled from {best['num_inference_steps']} steps with {best['scheduler']}, measured "
                    f"{best['measured'][:10]} ({best.get('device_name') or key.device})")
