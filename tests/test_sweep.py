"""The fraction sweep end to end on a tiny toy Market: cells, skipping, config guard, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from reid_aug.cli import main
from reid_aug.data.toy import make_toy_market
from reid_aug.layout import cell_dir, subset_path, synthetic_dir
from reid_aug.sweep import ExperimentConfig, IdentityFilterConfig, MethodConfig

CONFIG = """\
fractions: [0.5, 1.0]
seeds: [3]
methods:
  - name: oracle
    synthesis:
      generator: toy-oracle
      per_image: 1
bot:
  backbone: resnet18
  image_size: [32, 16]
  epochs: 1
  batch_size: 16
  num_instances: 4
  warmup_epochs: 1
  milestones: [1]
  padding: 2
  keep_checkpoint: false
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_market(tmp_path_factory.mktemp("sweep") / "toy", num_ids=16, seed=0)


def _run(args: list[str]) -> str:
    torch.set_num_threads(1)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_sweep_runs_every_cell_then_skips_them(toy: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(CONFIG)
    run = tmp_path / "run"
    out = _run(["run", "--config", str(cfg), "--out", str(run), "--data", str(toy), "--device", "cpu"])

    for method in ("standard", "oracle"):
        for fraction in (0.5, 1.0):
            metrics = json.loads((cell_dir(run, method, fraction, 3) / "metrics.json").read_text())
            assert 0.0 <= metrics["rank1"] <= 1.0 and 0.0 <= metrics["mAP"] <= 1.0
    # The augmented cell trained on the subset plus one synthetic image per subset image.
    subset_lines = subset_path(run, 0.5, 3).read_text().splitlines()[1:]
    synthetic = list(synthetic_dir(run, "oracle", 0.5, 3).glob("*.jpg"))
    assert len(synthetic) == len(subset_lines) > 0
    assert "Standard" in out and "oracle" in out and "Published figures" in out
    assert (run / "report" / "curves.png").is_file()
    table = (run / "report" / "table_rank1.csv").read_text()
    assert "oracle" in table

    stamps = {p: p.stat().st_mtime_ns for p in run.glob("runs/*/*/*/metrics.json")}
    again = _run(["run", "--config", str(cfg), "--out", str(run), "--data", str(toy), "--device", "cpu"])
    assert again.count("done, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in run.glob("runs/*/*/*/metrics.json")} == stamps


def test_sweep_refuses_a_changed_config(toy: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    standard_only = CONFIG.split("methods:")[0].replace("[0.5, 1.0]", "[1.0]") + "bot:" + CONFIG.split("bot:")[1]
    cfg.write_text(standard_only)
    run = tmp_path / "run"
    _run(["run", "--config", str(cfg), "--out", str(run), "--data", str(toy), "--device", "cpu"])
    result = CliRunner().invoke(
        main, ["run", "--config", str(cfg), "--out", str(run), "--data", str(toy), "--seeds", "4", "--device", "cpu"]
    )
    assert result.exit_code != 0
    assert "different experiment config" in result.output and "seeds" in result.output


def test_experiment_config_rejects_bad_values(toy: Path) -> None:
    with pytest.raises(ValueError, match="fractions"):
        ExperimentConfig(data=toy, fractions=(0.0, 0.5))
    with pytest.raises(ValueError, match="unique"):
        ExperimentConfig(data=toy, methods=(MethodConfig("a"), MethodConfig("a")))
    with pytest.raises(ValueError, match="reserved"):
        MethodConfig("standard")
    with pytest.raises(ValueError, match="nothing to run"):
        ExperimentConfig(data=toy, standard=False)


def test_unknown_config_key_names_the_file(toy: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(CONFIG + "bogus: 1\n")
    result = CliRunner().invoke(main, ["run", "--config", str(cfg), "--out", str(tmp_path / "r"), "--data", str(toy)])
    assert result.exit_code != 0
    assert "exp.yaml" in result.output and "bogus" in result.output


def test_identity_filtered_method_trains_on_the_kept_images_and_the_report_says_how_many(toy, tmp_path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(CONFIG.replace("fractions: [0.5, 1.0]", "fractions: [0.5]").replace(
        "      per_image: 1\n", "      per_image: 1\n    identity_filter:\n      min_score: 0.0\n"))
    run = tmp_path / "run"
    _run(["run", "--config", str(cfg), "--out", str(run), "--data", str(toy), "--device", "cpu"])
    from reid_aug.layout import filtered_dir

    kept = json.loads((filtered_dir(run, "oracle", 0.5, 3) / "manifest.json").read_text())
    assert kept["step"] == "filter-identity" and 0 < kept["images"]
    bot = json.loads((cell_dir(run, "oracle", 0.5, 3) / "manifest.json").read_text())
    assert bot["num_synthetic_images"] == kept["kept"]
    report = (run / "report" / "report.md").read_text()
    assert f"the identity filter kept {kept['kept']:,} of {kept['images']:,} synthetic images" in report
    with pytest.raises(ValueError, match="standard must be on"):
        ExperimentConfig(data=toy, standard=False,
                         methods=(MethodConfig("m", identity_filter=IdentityFilterConfig(rank1=True)),))


def test_overwrite_with_a_changed_bot_config_retrains_the_finished_cells(toy: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(CONFIG.replace("fractions: [0.5, 1.0]", "fractions: [0.5]").replace("standard: true\n", "")
                   .replace("methods:\n  - name: oracle\n    synthesis:\n      generator: toy-oracle\n      per_image: 1\n",
                            "methods: []\n"))
    run = tmp_path / "run"
    _run(["run", "--config", str(cfg), "--out", str(run), "--data", str(toy), "--device", "cpu"])
    cfg.write_text(cfg.read_text().replace("\n  epochs: 1\n", "\n  epochs: 2\n"))
    out = _run(["run", "--config", str(cfg), "--out", str(run), "--data", str(toy), "--device", "cpu",
                "--overwrite"])
    assert "trained with another BoT config (epochs): training it again" in out and "done, skipped" not in out
    manifest = json.loads((cell_dir(run, "standard", 0.5, 3) / "manifest.json").read_text())
    assert manifest["config"]["epochs"] == 2
    out = _run(["run", "--config", str(cfg), "--out", str(run), "--data", str(toy), "--device", "cpu"])
    assert "done, skipped" in out
