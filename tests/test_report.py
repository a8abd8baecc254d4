"""The Table-2 report: strict run-folder scan, mean ± std tables, markdown / CSV / LaTeX / PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from reid_aug.report import ReportError, collect_results, make_report

# (method, fraction, seed) -> (rank1, mAP) as fractions
CELLS = {
    ("standard", 0.2, 0): (0.30, 0.10),
    ("standard", 0.2, 1): (0.34, 0.14),
    ("standard", 1.0, 0): (0.90, 0.80),
    ("standard", 1.0, 1): (0.92, 0.82),
    ("pcdms", 0.2, 0): (0.50, 0.30),
    ("pcdms", 0.2, 1): (0.54, 0.36),
    ("pcdms", 1.0, 0): (0.95, 0.85),  # one seed only
}


def _write_cell(run: Path, method: str, fraction: float, seed: int, rank1: float, mAP: float, **extra) -> Path:
    cell = run / "runs" / method / f"frac{fraction:g}" / f"seed{seed}"
    cell.mkdir(parents=True, exist_ok=True)
    metrics = {"rank1": rank1, "mAP": mAP, "mINP": mAP / 2, "rank5": rank1, "rank10": rank1,
               "protocol": "market1501: test protocol", "distance": "cosine", "flip": False,
               "num_valid_queries": 10, **extra}
    (cell / "metrics.json").write_text(json.dumps(metrics))
    (cell / "log.csv").write_text("epoch,loss\n")  # other run files sit beside metrics.json
    return cell


def _make_run(tmp_path: Path, manifest: bool = True) -> Path:
    run = tmp_path / "run"
    for (method, fraction, seed), (r1, m) in CELLS.items():
        _write_cell(run, method, fraction, seed, r1, m)
    (run / "runs" / "pcdms" / "frac1" / "seed1").mkdir()  # unfinished: no metrics.json
    if manifest:
        config = {"data": "/data/Market-1501", "fractions": [0.2, 1.0], "seeds": [0, 1],
                  "methods": [{"name": "pcdms", "synthesis": {"generator": "pcdms"}}],
                  "bot": {"backbone": "resnet50", "epochs": 120, "image_size": [256, 128]}}
        (run / "manifest.json").write_text(json.dumps(
            {"step": "run", "config": config, "sources": {"data": "/data/Market-1501"}, "layout": "market1501",
             "num_train_images": 12936, "num_train_pids": 751}))
    return run


def test_collect_results_reads_every_finished_cell(tmp_path):
    df = collect_results(_make_run(tmp_path))
    assert len(df) == len(CELLS)
    assert list(df["method"].unique()) == ["standard", "pcdms"]  # standard first
    row = df[(df.method == "pcdms") & (df.fraction == 0.2) & (df.seed == 1)].iloc[0]
    assert row.rank1 == pytest.approx(0.54) and row.mAP == pytest.approx(0.36) and row.mINP == pytest.approx(0.18)
    assert set(df.fraction) == {0.2, 1.0}
    assert df["rerank_rank1"].isna().all()


@pytest.mark.parametrize(
    "bad, message",
    [
        ("runs/standard/frac0.20/seed0", "frac0.2"),
        ("runs/standard/frac1.5/seed0", "fraction folder"),
        ("runs/standard/fraction0.2/seed0", "fraction folder"),
        ("runs/standard/frac0.2/s0", "seed folder"),
        ("runs/standard/frac0.2/seed01", "seed folder"),
    ],
)
def test_unexpected_folder_names_are_errors(tmp_path, bad, message):
    run = _make_run(tmp_path)
    (run / bad).mkdir(parents=True)
    with pytest.raises(ReportError, match=message) as err:
        collect_results(run)
    assert str(run / bad.rsplit("/", 1)[0]) in str(err.value) or str(run / bad) in str(err.value)


def test_stray_file_and_bad_metrics_are_errors(tmp_path):
    run = _make_run(tmp_path)
    (run / "runs" / "notes.txt").write_text("x")
    with pytest.raises(ReportError, match="notes.txt"):
        collect_results(run)
    (run / "runs" / "notes.txt").unlink()
    cell = _write_cell(run, "standard", 0.4, 0, 76.7, 0.5)  # a percentage where a fraction belongs
    with pytest.raises(ReportError, match=r"frac0.4/seed0/metrics.json: 'rank1' must be a fraction"):
        collect_results(run)
    (cell / "metrics.json").write_text("{not json")
    with pytest.raises(ReportError, match="unreadable"):
        collect_results(run)
    with pytest.raises(ReportError, match="no runs folder"):
        collect_results(tmp_path / "elsewhere")


def test_make_report_tables_and_files(tmp_path):
    run = _make_run(tmp_path)
    paths = make_report(run, tmp_path / "out")
    assert set(paths) == {"markdown", "results_csv", "table_rank1_csv", "table_map_csv", "latex", "plot"}
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in paths.values())

    md = paths["markdown"].read_text()
    ours, published = md.split("## Published figures (Shen et al. 2024, Table 2; Rank-1 only; PIDM protocol)")
    # Rank-1 standard at 20 %: 30 and 34 -> 32.0 ± 2.8 (sample std); pcdms at 100 % has one seed -> no ±.
    assert "| Standard | 32.0 ± 2.8 | 91.0 ± 1.4 |" in ours
    assert "| PCDMs | 52.0 ± 2.8 | 95.0 |" in ours
    assert "| PCDMs | 33.0 ± 4.2 | 85.0 |" in ours  # mAP table
    assert "63.8" not in ours and "| PCDMs | 63.8 | 67.1 | 73.3 | 76.4 | 80.3 |" in published
    assert "| Standard | 33.4 | 56.6 | 64.9 | 69.2 | 76.7 |" in published
    assert "94.1" in published and "85.9" in published
    assert "7 finished cells, 1 unfinished" in ours
    assert "/data/Market-1501" in ours and "backbone=resnet50" in ours and "market1501: test protocol" in ours
    assert "- Budget: real and synthetic images pooled and every image seen once per epoch" in ours

    long = pd.read_csv(paths["results_csv"])
    assert len(long) == 7 and {"method", "fraction", "seed", "rank1", "mAP", "mINP"} <= set(long.columns)
    wide = pd.read_csv(paths["table_rank1_csv"]).set_index("method")
    assert wide.loc["standard", "frac0.2_mean_pct"] == pytest.approx(32.0)
    assert wide.loc["standard", "frac0.2_std_pct"] == pytest.approx(2.8284, abs=1e-3)
    assert wide.loc["pcdms", "frac1_n"] == 1 and pd.isna(wide.loc["pcdms", "frac1_std_pct"])
    wide_map = pd.read_csv(paths["table_map_csv"]).set_index("method")
    assert wide_map.loc["pcdms", "frac0.2_mean_pct"] == pytest.approx(33.0)

    tex = paths["latex"].read_text()
    for token in ("\\toprule", "\\midrule", "\\bottomrule", "20\\%", "32.0 $\\pm$ 2.8", "\\emph{mAP}"):
        assert token in tex

    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 200
    assert not list((tmp_path / "out").glob(".*tmp*"))  # atomic writes leave no temp files


@pytest.mark.parametrize("bot, share, expected", [
    ({"epoch_steps": "real"}, None, "so augmented runs make the Standard run's optimizer steps and drop the lr"),
    ({"epoch_steps": "all"}, None, "augmented runs make **more optimizer steps** than Standard"),
    ({}, 0.5, "a fixed share of every batch is synthetic (0.5)"),
])
def test_report_states_the_budget_rule(tmp_path, bot, share, expected):
    run = _make_run(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["bot"].update(bot)
    manifest["config"]["methods"][0]["synthetic_share"] = share
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert expected in make_report(run, tmp_path / "out")["markdown"].read_text()


def test_report_without_manifest_says_so_and_default_out_dir(tmp_path):
    run = _make_run(tmp_path, manifest=False)
    paths = make_report(run)
    assert paths["markdown"].parent == run / "report"
    assert "Run manifest: **missing**" in paths["markdown"].read_text()


def test_report_with_no_finished_cell_is_an_error(tmp_path):
    (tmp_path / "run" / "runs" / "standard" / "frac0.2" / "seed0").mkdir(parents=True)
    with pytest.raises(ReportError, match="no finished cell"):
        make_report(tmp_path / "run")


def test_rerank_figures_are_collected(tmp_path):
    run = tmp_path / "run"
    _write_cell(run, "standard", 0.2, 0, 0.3, 0.1, rerank={"rank1": 0.4, "mAP": 0.25})
    df = collect_results(run)
    assert df.loc[0, "rerank_rank1"] == pytest.approx(0.4) and df.loc[0, "rerank_mAP"] == pytest.approx(0.25)


def test_report_cli_prints_markdown(tmp_path):
    from click.testing import CliRunner

    from reid_aug.cli import main

    run = _make_run(tmp_path)
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "| Standard | 32.0 ± 2.8 | 91.0 ± 1.4 |" in result.output
    assert (tmp_path / "cli" / "curves.png").is_file()
    (tmp_path / "empty").mkdir()
    bad = CliRunner().invoke(main, ["report", str(tmp_path / "empty")])
    assert bad.exit_code != 0 and "no metrics.json in it or below" in bad.output


def test_report_on_single_folders(tmp_path):
    from click.testing import CliRunner

    from reid_aug.cli import main

    one = tmp_path / "bot"
    one.mkdir()
    (one / "metrics.json").write_text(json.dumps({"rank1": 0.5, "mAP": 0.25, "mINP": 0.1, "protocol": "market1501"}))
    result = CliRunner().invoke(main, ["report", str(one)])
    assert result.exit_code == 0, result.output
    assert "| `.` | 50.0 | 25.0 | 10.0 |" in result.output and "market1501" in result.output
    # A folder of evaluated models, one row each; the report's own folder is not read back.
    _write_cell(tmp_path / "many", "a", 0.2, 0, 0.3, 0.1)
    (tmp_path / "many" / "b").mkdir()
    (tmp_path / "many" / "b" / "metrics.json").write_text(json.dumps({"rank1": 0.9, "mAP": 0.8}))
    (one / "report" / "x").mkdir(parents=True)  # a report's own folder is never read back
    (one / "report" / "x" / "metrics.json").write_text(json.dumps({"rank1": 0.1, "mAP": 0.1}))
    assert "1 evaluated model(s)" in make_report(one)["markdown"].read_text()
    paths = make_report(tmp_path / "many" / "runs" / "a", tmp_path / "out_a")
    text = paths["markdown"].read_text()
    assert "| `frac0.2/seed0` | 30.0 | 30.0 | 30.0 | 10.0 | 5.0 |" in text and "1 evaluated model(s)" in text
    table = pd.read_csv(make_report(tmp_path / "many")["results_csv"])  # has runs/: the Table-2 report
    assert len(table) == 1
    with pytest.raises(ReportError, match="'rank1' must be a fraction"):
        (one / "metrics.json").write_text(json.dumps({"rank1": 50, "mAP": 0.25}))
        make_report(one)
