"""The benchmark scripts still run against today's code (smallest settings, nothing recorded).

They are not timed here: speed targets live in benchmarks/RESULTS.md. This only catches a script
that no longer fits the library it measures (a renamed argument, a stage boundary that moved).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--no-write"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.parametrize("extra", [["--preset", "tiny"],
                                   ["--pipeline", "builtin:toy", "--guidance", "2,2,1", "--refine-strength", "0.5"]])
def test_bench_pcdms_times_every_stage(extra):
    out = _run("bench_pcdms.py", *extra, "--batch", "2", "--steps", "2", "--repeats", "1", "--threads", "1",
               "--device", "cpu")
    for line in ("stage 1 prior", "stage 2 inpaint", "stage 3 refine", "full pipeline"):
        assert f"bench_pcdms {line}" in out
    if "--refine-strength" in extra:
        assert "CFG w 2.0,2.0,1.0, refine strength 0.5, weights builtin:toy" in out


def test_bench_train_pcdms_runs():
    out = _run("bench_train_pcdms.py", "--preset", "tiny", "--stage", "inpaint", "--batch", "2", "--steps", "1",
               "--warmup", "0", "--threads", "1", "--device", "cpu")
    assert "steps/s" in out and "preset tiny, stage inpaint" in out
