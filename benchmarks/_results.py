"""Shared by the benchmark scripts: which tree and device a figure comes from, and the RESULTS.md row.

Scripts run as ``python benchmarks/bench_x.py``, so this folder is on ``sys.path``
and they import it as ``from _results import ...``.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = """# Benchmark results

One row per measurement, appended by the scripts in this folder.

- date: UTC date of the run; commit: `git rev-parse --short HEAD` of the tree measured
  (a `+` marks uncommitted changes); device: CPU model or GPU name, with torch threads.
- benchmark: script and step; figure: the measured value with its unit;
  settings: sizes and options that produced it.

| date | commit | device | benchmark | figure | settings |
|---|---|---|---|---|---|
"""


def commit() -> str:
    """Short HEAD of the repository holding this file, ``+`` if the tree has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def device_name(device: torch.device) -> str:
    """GPU name for a CUDA device; else the CPU model (``/proc/cpuinfo``) and the torch thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch thread(s)"


def append_row(benchmark: str, figure: str, settings: str, device: str) -> None:
    """Append one table row to RESULTS.md (creating it with its header) and echo it."""
    if not RESULTS.is_file():
        RESULTS.write_text(HEADER)
    cells = [f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}", commit(), device, benchmark, figure, settings]
    # A literal "|" would split a cell of the Markdown table.
    row = "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |\n"
    with RESULTS.open("a") as f:
        f.write(row)
    print(row, end="")


def print_json(record: dict) -> None:
    """One machine-readable line with everything measured (stdout)."""
    print(json.dumps(record, sort_keys=True), flush=True)


def resolve_device(parser, device: str | None, threads: int | None) -> torch.device:
    """Apply ``--threads`` and turn ``--device`` (default: cuda if available) into a device."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no CUDA device")
    return dev


def record(results: list[tuple[str, str, str]], device: str, no_write: bool) -> None:
    """Print (``--no-write``) or append to RESULTS.md each (benchmark, figure, settings) row."""
    for bench, figure, setting in results:
        if no_write:
            print(bench, figure, setting)
        else:
            append_row(bench, figure, setting, device)
