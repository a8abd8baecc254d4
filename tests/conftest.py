"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests write the toolkit's cache (built-in toy Market, synthesis timings) into their own folder,
    never into the user's ~/.cache/reid-aug."""
    old = os.environ.get("REID_AUG_CACHE")
    os.environ["REID_AUG_CACHE"] = str(tmp_path_factory.mktemp("reid-aug-cache"))
    yield
    if old is None:
        os.environ.pop("REID_AUG_CACHE", None)
    else:
        os.environ["REID_AUG_CACHE"] = old


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (small models: threads cost more than they give), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model_and_market(tmp_path_factory):
    """A random ResNet-18 BoT folder (64x32 input) and a 6-identity toy Market: (model folder, root)."""
    from reid_aug.bot.model import build_bot, save_bot
    from reid_aug.data.toy import make_toy_market

    root = tmp_path_factory.mktemp("eval")
    market = make_toy_market(root / "market", num_ids=6, images_per_id=(2, 3), seed=0)
    torch.manual_seed(0)
    model = build_bot(num_classes=3, backbone="resnet18")
    folder = save_bot(root / "model", model, extra_config={"image_size": [64, 32]})
    return folder, market


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A saved PCDMs pipeline of the tiny preset with random stages and encoders."""
    from pcdms import build_model, get_preset
    from pcdms.encoders import build_encoders
    from pcdms.pipeline import PCDMsPipeline

    tiny = get_preset("tiny")
    torch.manual_seed(0)
    stages = [build_model(stage, tiny).eval() for stage in ("prior", "inpaint", "refine")]
    folder = tmp_path_factory.mktemp("pcdms") / "pipeline"
    PCDMsPipeline(*stages, build_encoders(tiny, allow_random=True), tiny).save_pretrained(folder)
    return folder
