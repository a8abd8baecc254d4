"""``reid-aug report``: the Table-2 comparison of a fraction sweep."""

from __future__ import annotations

from pathlib import Path

import click

from reid_aug.cli.app import main
from reid_aug.report import ReportError, make_report, without_config_block


@main.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), required=False)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder for the report files (default RUN_DIR/report).")
def report_cmd(run_dir: Path | None, out: Path | None) -> None:
    """Tabulate RUN_DIR/runs/<method>/frac<F>/seed<S>/metrics.json as the paper's Table 2.

    Without RUN_DIR: the workspace (the folder of reid-aug.yaml here or above, else this folder).
    Writes report.md, results.csv, table_rank1.csv, table_mAP.csv, table.tex and curves.png,
    then prints the markdown. The paper's published figures are shown in their own block.
    Any other folder (one evaluate/train-bot folder, or a folder of them): one row per
    metrics.json found in it or below, as report.md and results.csv. Results of `reid-aug
    quality` in RUN_DIR/quality*/ add the image-quality tables (PCDMs Table 1 and the stage
    ablation) with the paper's published Market rows.
    """
    if run_dir is None:
        from reid_aug.workspace import find_workspace

        file = find_workspace()
        run_dir = file.parent if file is not None else Path.cwd()
    try:
        paths = make_report(run_dir, out)
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None
    text = without_config_block(paths["markdown"].read_text(), f"(full experiment config: {paths['markdown']})")
    click.echo(text, nl=False)
    click.echo(f"wrote {', '.join(p.name for p in paths.values())} to {paths['markdown'].parent}", err=True)
