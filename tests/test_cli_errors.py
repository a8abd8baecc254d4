"""Failures a user meets end in one line naming the cause, never a traceback, and leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from reid_aug.cli import main
from reid_aug.data.toy import make_toy_market


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_market(tmp_path_factory.mktemp("errors") / "toy", num_ids=6, seed=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line_and_writes_nothing(toy, tmp_path, tiny_model_and_market):
    model, _ = tiny_model_and_market
    commands = {
        "train-bot": ["train-bot", "--data", str(toy), "--out", str(tmp_path / "bot"), "--epochs", "1"],
        "evaluate": ["evaluate", "--model", str(model), "--data", str(toy), "--out", str(tmp_path / "ev")],
        "synthesize": ["synthesize", "--data", str(toy), "--subset", "0.5", "--out", str(tmp_path / "syn"),
                       "--pipeline", "builtin:toy"],
    }
    for name, args in commands.items():
        result = CliRunner().invoke(main, [*args, "--device", "cuda"])
        assert result.exit_code == 1, (name, result.output)
        assert "torch sees no CUDA device" in result.output and "Traceback" not in result.output, name
    assert sorted(p.name for p in tmp_path.iterdir()) == []
