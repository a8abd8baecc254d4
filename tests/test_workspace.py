"""The workspace: `init`, and synthesize / train-bot / report / run bare in the folder of reid-aug.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from reid_aug.cli import main
from reid_aug.data.toy import make_toy_market
from reid_aug.layout import STANDARD, cell_dir, subset_path, synthetic_dir
from tests.test_sweep import CONFIG


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_market(tmp_path_factory.mktemp("ws") / "toy", num_ids=16, seed=0)


def _invoke(args: list[str], ok: bool = True) -> str:
    torch.set_num_threads(1)
    result = CliRunner().invoke(main, args)
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    return result.output


@pytest.fixture()
def workspace(toy: Path, tmp_path: Path, monkeypatch) -> Path:
    """A workspace whose reid-aug.yaml names the toy data by a relative path; commands run in a subfolder."""
    root = tmp_path / "ws"
    (root / "notes").mkdir(parents=True)
    (root / "data").symlink_to(toy)
    (root / "reid-aug.yaml").write_text("data: data\ndevice: cpu\n" + CONFIG)
    monkeypatch.chdir(root / "notes")
    return root


def test_the_short_commands_share_the_sweep_cells(workspace: Path) -> None:
    out = _invoke(["synthesize", "--subset", "0.5", "--dry-run"])
    assert "nothing written" in out and "to make" in out
    assert sorted(p.name for p in workspace.iterdir()) == ["data", "notes", "reid-aug.yaml"]
    out = _invoke(["synthesize", "--subset", "0.5"])
    assert "method oracle, fraction 0.5, seed 3" in out
    syn = synthetic_dir(workspace, "oracle", 0.5, 3)
    assert json.loads((syn / "manifest.json").read_text())["complete"] is True
    assert subset_path(workspace, 0.5, 3).is_file()

    _invoke(["train-bot", "--subset", "0.5", "--method", "oracle"])
    _invoke(["train-bot", "--subset", "0.5"])
    for method in ("oracle", "standard"):
        assert (cell_dir(workspace, method, 0.5, 3) / "metrics.json").is_file()
    # Again: neither trained nor evaluated a second time, and it says so.
    metrics = cell_dir(workspace, STANDARD, 0.5, 3) / "metrics.json"
    before = metrics.stat().st_mtime_ns
    out = _invoke(["train-bot", "--subset", "0.5"])
    assert "already trained" in out and "already evaluated" in out and "Rank-1" in out
    assert metrics.stat().st_mtime_ns == before
    bot = json.loads((cell_dir(workspace, "oracle", 0.5, 3) / "manifest.json").read_text())
    assert bot["num_synthetic_images"] == json.loads((syn / "manifest.json").read_text())["counts"]["images"] > 0

    report = _invoke(["report"])
    assert "full experiment config: " in report and '"fractions"' not in report  # the JSON stays in report.md
    assert "Full experiment config" in (workspace / "report" / "report.md").read_text()
    table = report[report.index("## Ours: Rank-1"):report.index("## Ours: mAP")]
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == [
        "Standard", "oracle"]
    # `run` is the loop over the same cells: what the single commands made, it skips.
    out = _invoke(["run", "--fractions", "0.5"])
    assert out.count("done, skipped") == 2 and "BoT on" not in out


def test_workspace_errors_are_one_line(workspace: Path) -> None:
    out = _invoke(["train-bot", "--subset", "0.5", "--method", "oracle"], ok=False)
    assert "no complete synthetic images" in out and "reid-aug synthesize --subset 0.5 --method oracle" in out
    assert "not a method" in _invoke(["train-bot", "--method", "pcdms"], ok=False)
    assert "both --data and --out" in _invoke(["train-bot", "--out", "x"], ok=False)
    assert "a subset CSV needs --data/--out" in _invoke(["synthesize", "--subset", str(workspace / "reid-aug.yaml")],
                                                        ok=False)
    (workspace / "reid-aug.yaml").write_text((workspace / "reid-aug.yaml").read_text() + "colour: blue\n")
    out = _invoke(["synthesize", "--subset", "0.5"], ok=False)
    assert "reid-aug.yaml" in out and "colour" in out


def test_init_writes_a_workspace_the_commands_load(toy: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _invoke(["init", "--data", str(toy)])
    data = yaml.safe_load((tmp_path / "reid-aug.yaml").read_text())
    assert data["data"] == str(toy.absolute()) and data["methods"][0]["synthesis"]["pipeline"] == "builtin:toy"
    assert "exists" in _invoke(["init"], ok=False)
    _invoke(["init", "--force"])
    assert yaml.safe_load((tmp_path / "reid-aug.yaml").read_text())["data"] == "builtin:toy-market"
    # A real (non-toy) dataset gets the paper's experiment with every key written out.
    real = tmp_path / "market"
    for sub in ("bounding_box_train", "bounding_box_test", "query"):
        (real / sub).mkdir(parents=True)
    (tmp_path / "real").mkdir()
    monkeypatch.chdir(tmp_path / "real")
    out = _invoke(["init", "--data", str(real), "--device", "cpu"])
    assert "no --pipeline" in out
    data = yaml.safe_load((tmp_path / "real" / "reid-aug.yaml").read_text())
    assert data["bot"]["backbone"] == "resnet50" and data["methods"][0]["synthesis"]["num_inference_steps"] == 50


def test_without_a_workspace_file_the_builtin_toy_data_is_made_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("REID_AUG_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    out = _invoke(["train-bot", "--subset", "0.2", "--dry-run"])
    assert "no reid-aug.yaml here or above" in out and "making the built-in toy Market once" in out
    assert "iterations per epoch" in out
    out = _invoke(["train-bot", "--subset", "0.2", "--dry-run"])
    assert "making the built-in toy Market" not in out
    assert (tmp_path / "cache" / "toy-market-seed0-ids100" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # a dry run writes nothing in the workspace


def test_a_run_record_from_before_a_new_key_is_not_a_changed_config(workspace: Path) -> None:
    _invoke(["synthesize", "--subset", "0.5"])
    manifest = json.loads((workspace / "manifest.json").read_text())
    for method in manifest["config"]["methods"]:
        del method["synthesis"]["strategy"]  # as written by a version without target-pose strategies
    (workspace / "manifest.json").write_text(json.dumps(manifest))
    syn = synthetic_dir(workspace, "oracle", 0.5, 3) / "manifest.json"
    stored = json.loads(syn.read_text())
    del stored["config"]["strategy"]
    syn.write_text(json.dumps(stored))
    assert "nothing to do" in _invoke(["synthesize", "--subset", "0.5"])
    _invoke(["train-bot", "--subset", "0.5"])
    (workspace / "reid-aug.yaml").write_text((workspace / "reid-aug.yaml").read_text().replace("epochs: 1", "epochs: 2"))
    out = _invoke(["train-bot", "--subset", "0.5"], ok=False)
    assert "different experiment config" in out and "'bot'" in out


def test_a_workspace_cell_is_made_with_the_workspace_settings_only(workspace: Path) -> None:
    """Options that would change a cell's recipe are refused in a workspace (they would sit in its table
    under the workspace's settings), and train-bot refuses a synthetic folder made otherwise."""
    out = _invoke(["synthesize", "--subset", "0.5", "--per-image", "2"], ok=False)
    assert "per_image would differ from method 'oracle'" in out
    out = _invoke(["train-bot", "--subset", "0.5", "--epochs", "3"], ok=False)
    assert "epochs would differ" in out
    _invoke(["synthesize", "--subset", "0.5", "--device", "cpu"])  # where it runs is not the recipe
    syn = synthetic_dir(workspace, "oracle", 0.5, 3) / "manifest.json"
    stored = json.loads(syn.read_text())
    stored["config"]["per_image"] = 2  # as if made by a one-off job with other settings
    syn.write_text(json.dumps(stored))
    out = _invoke(["train-bot", "--subset", "0.5", "--method", "oracle"], ok=False)
    assert "made with other settings than method 'oracle' (per_image: 2 -> 1)" in out
    out = _invoke(["train-bot", "--subset", "0.5", "--method", "oracle", "--dry-run"], ok=False)
    assert "made with other settings" in out


def test_train_bot_dry_run_counts_the_cells_synthetic_images(workspace: Path) -> None:
    assert "make them first" in _invoke(["train-bot", "--subset", "0.5", "--method", "oracle", "--dry-run"], ok=False)
    _invoke(["synthesize", "--subset", "0.5"])
    made = json.loads((synthetic_dir(workspace, "oracle", 0.5, 3) / "manifest.json").read_text())["counts"]
    out = _invoke(["train-bot", "--subset", "0.5", "--method", "oracle", "--dry-run"])
    assert f"+ {made['images']} synthetic" in out and made["generated_this_run"] == made["images"]
