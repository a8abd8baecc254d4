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


def test_images_of_every_mode_load_as_8bit_rgb(tmp_path):
    """A 16-bit grey PNG is scaled (PIL's plain convert would clip it to white); others convert as PIL does."""
    import numpy as np
    from PIL import Image

    from pcdms.encoders import load_image_uint8
    from reid_aug.bot.data import load_images

    ramp = (np.arange(128 * 64, dtype=np.uint32).reshape(128, 64) * 8).astype(np.uint16)  # 0 .. 65528
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    expected = np.round(ramp / 257).astype(np.uint8)
    for loaded in (load_images([tmp_path / "grey16.png"], (128, 64), progress=False)[0],
                   load_image_uint8(tmp_path / "grey16.png", (128, 64))):
        assert loaded.dtype == torch.uint8 and loaded.shape == (3, 128, 64)
        assert np.array_equal(loaded[0].numpy(), expected) and np.array_equal(loaded[0], loaded[2])
    rgba = Image.new("RGBA", (64, 128), (10, 20, 30, 0))
    rgba.save(tmp_path / "rgba.png")
    assert load_image_uint8(tmp_path / "rgba.png", (128, 64))[:, 0, 0].tolist() == [10, 20, 30]
    Image.fromarray(np.full((128, 64), 300.0, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="float.tif: F image with values up to 300"):
        load_image_uint8(tmp_path / "float.tif", (128, 64))


def test_messages_a_person_understands(toy, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["subset", str(toy), "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 2 and "missing option '--fraction'" in res.output and "__init__" not in res.output
    bad = tmp_path / "demo.yaml"
    bad.write_text("fractions: [0.5]\nmethodz: []\n")
    res = runner.invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--config", str(bad)])
    assert res.exit_code == 2 and "methodz" in res.output
    assert not (tmp_path / "demo").exists()  # checked before the toy dataset is rendered
    res = runner.invoke(main, ["synthesize", "--data", str(toy), "--subset", "0.5", "--out", str(tmp_path / "o"),
                               "--generator", "toy-oracle", "--poses", str(toy / "market-annotation-train.csv")])
    assert res.exit_code == 2 and "reads no pose file" in res.output and not (tmp_path / "o").exists()


def test_train_bot_refuses_unfinished_or_leaking_synthetic_folders(toy, tmp_path):
    import json

    from reid_aug.data.market import read_reid_dataset
    from reid_aug.data.subset import make_subset, write_subset_csv

    runner = CliRunner()
    dataset = read_reid_dataset(toy)
    small, large = tmp_path / "small.csv", tmp_path / "large.csv"
    write_subset_csv(small, make_subset(dataset.train, 0.3, seed=0))
    write_subset_csv(large, make_subset(dataset.train, 0.8, seed=0))
    for name, sub in (("syn-small", small), ("syn-large", large)):
        res = runner.invoke(main, ["synthesize", "--data", str(toy), "--subset", str(sub), "--out", str(tmp_path / name),
                                   "--generator", "toy-oracle"])
        assert res.exit_code == 0, res.output
    train = ["train-bot", "--data", str(toy), "--subset", str(small), "--epochs", "1", "--backbone", "resnet18",
             "--image-size", "32x16", "--batch-size", "8", "--device", "cpu", "--dry-run"]
    res = runner.invoke(main, [*train, "--synthetic", str(tmp_path / "syn-large"), "--out", str(tmp_path / "a")])
    assert res.exit_code == 1 and "outside the training subset" in res.output and "leak" in res.output
    manifest = json.loads((tmp_path / "syn-small" / "manifest.json").read_text())
    (tmp_path / "syn-small" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    res = runner.invoke(main, [*train, "--synthetic", str(tmp_path / "syn-small"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 1 and "unfinished" in res.output
    (tmp_path / "syn-small" / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(main, [*train, "--synthetic", str(tmp_path / "syn-small"), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output


def test_one_output_folder_one_writer_and_no_stale_metrics(toy, tmp_path):
    from pcdms.io import folder_lock

    args = ["train-bot", "--data", str(toy), "--out", str(tmp_path / "bot"), "--epochs", "1", "--backbone",
            "resnet18", "--image-size", "32x16", "--batch-size", "8", "--device", "cpu"]
    with folder_lock(tmp_path / "bot"):  # as another process training into the same folder would
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "being written by another reid-aug process" in res.output
    assert not (tmp_path / "bot").exists()
    assert CliRunner().invoke(main, args).exit_code == 0
    (tmp_path / "bot" / "metrics.json").write_text("{}")  # an evaluation of the model below
    assert CliRunner().invoke(main, [*args, "--no-resume"]).exit_code == 0
    assert not (tmp_path / "bot" / "metrics.json").exists()  # it described the model the new run replaced


def test_subset_out_is_not_silently_replaced(toy, tmp_path):
    runner = CliRunner()
    args = ["subset", str(toy), "--out", str(tmp_path / "s.csv")]
    assert runner.invoke(main, [*args, "--fraction", "0.5"]).exit_code == 0
    assert runner.invoke(main, [*args, "--fraction", "0.5"]).exit_code == 0  # the same list: fine
    res = runner.invoke(main, [*args, "--fraction", "0.7"])
    assert res.exit_code == 1 and "--overwrite" in res.output
    assert runner.invoke(main, [*args, "--fraction", "0.7", "--overwrite"]).exit_code == 0


def test_a_full_disk_is_one_line_naming_the_file(toy, tmp_path, monkeypatch):
    import errno

    from PIL import Image

    def full(self, fp, *args, **kwargs):  # what PIL raises when the disk fills: no file name in the error
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    res = CliRunner().invoke(main, ["synthesize", "--data", str(toy), "--subset", "0.5", "--out", str(tmp_path / "o"),
                                    "--generator", "toy-oracle"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    line = [l for l in res.output.splitlines() if l.startswith("Error:")][0]
    assert str(tmp_path / "o") in line and line.endswith("No space left on device")


def test_a_random_file_is_not_a_pytorch_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(bytes(range(7, 250)) * 20)
    res = CliRunner().invoke(main, ["convert-official", str(tmp_path / "x.pt"), "--stage", "inpaint", "--out",
                                    str(tmp_path / "out")])
    assert res.exit_code == 1 and "not a PyTorch checkpoint" in res.output and "trust" not in res.output
    assert not (tmp_path / "out").exists()


def test_models_and_folders_that_do_not_belong(toy, tmp_path, tiny_model_and_market):
    import shutil

    model, _ = tiny_model_and_market
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:500])
    res = CliRunner().invoke(main, ["evaluate", "--model", str(broken), "--data", str(toy), "--out",
                                    str(tmp_path / "ev"), "--device", "cpu"])
    assert res.exit_code == 1 and "unreadable weights" in res.output and "model.safetensors" in res.output
    syn = tmp_path / "syn"
    assert CliRunner().invoke(main, ["synthesize", "--data", str(toy), "--subset", "0.5", "--out", str(syn),
                                     "--generator", "toy-oracle"]).exit_code == 0
    before = (syn / "manifest.json").read_text()
    res = CliRunner().invoke(main, ["train-bot", "--data", str(toy), "--out", str(syn), "--epochs", "1"])
    assert res.exit_code == 1 and "holds the output of 'synthesize'" in res.output
    assert (syn / "manifest.json").read_text() == before


@pytest.mark.parametrize("leave", [True, False])
def test_an_error_during_a_progress_bar_starts_on_its_own_line(leave):
    import click
    from tqdm import tqdm

    from reid_aug.cli.app import _FlowOrderGroup

    group = _FlowOrderGroup()

    @group.command("work")
    def work() -> None:
        bar = tqdm(total=10, desc="working", leave=leave)  # not closed: the failure interrupts it
        bar.update(3)
        raise click.ClickException("image 4 is unreadable")

    res = CliRunner().invoke(group, ["work"])
    assert res.exit_code == 1
    tail = res.output[res.output.rindex("Error: image 4 is unreadable") - 1:]
    assert tail[0] in "\n\r", repr(res.output)  # not glued to the bar's "3/10 [...]"


def test_ctrl_c_says_how_to_resume_and_exits_130():
    from reid_aug.cli.app import _FlowOrderGroup

    group = _FlowOrderGroup()

    @group.command("work")
    def work() -> None:
        raise KeyboardInterrupt

    res = CliRunner().invoke(group, ["work"])
    assert res.exit_code == 130 and "run the same command again to resume" in res.output
    assert "Aborted!" not in res.output
