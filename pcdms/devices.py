"""Which torch device a command runs on."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device``; None: CUDA when available, else the CPU.

    Raises ValueError (one line, for the command line to print) for a name torch does not know,
    or a CUDA / MPS device this machine does not have, before anything is loaded or written.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device name (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA device (no GPU, no driver, "
                             "or a CPU-only torch build); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but MPS is not available here; use --device cpu")
    return dev


def has_native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (so bf16 is worth using for speed).

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: AVX512-BF16 or AMX; without them oneDNN
    emulates bf16 and it is far slower than float32 (the toy PCDMs pipeline: 41.6 s in float32,
    more than 8 minutes in bf16 for 64 images on 2 AVX2-only EPYC cores). Other devices: False.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return False
