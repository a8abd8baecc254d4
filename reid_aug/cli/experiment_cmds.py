"""Experiment commands: ``run`` (the whole fraction sweep) and ``demo`` (the sweep on the toy Market)."""

from __future__ import annotations

import contextlib
from importlib import resources
from pathlib import Path

import click

from reid_aug.cli.app import main
from reid_aug.cli.config import config_to_dict, load_config, normalize_record
from reid_aug.data.market import DatasetError
from reid_aug.data.toy import make_toy_market, read_toy_manifest
from reid_aug.report import make_report
from reid_aug.sweep import ExperimentConfig, run_experiment

DEMO_CONFIG = "demo.yaml"


def _comma_list(text: str | None, cast: type) -> tuple | None:
    """``"0.2,0.4" -> (0.2, 0.4)``; None (option not given) stays None so the config's value holds."""
    if text is None:
        return None
    try:
        return tuple(cast(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {cast.__name__} values, got {text!r}") from None


def _run_and_report(cfg: ExperimentConfig, out: Path, overwrite: bool, record: dict | None = None) -> None:
    try:
        run_experiment(cfg, out, record or config_to_dict(cfg), overwrite=overwrite, echo=click.echo,
                       normalize=normalize_record(ExperimentConfig))
    except (DatasetError, ValueError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from None
    paths = make_report(out)
    click.echo("")
    click.echo(Path(paths["markdown"]).read_text())
    click.echo(f"report written to {Path(paths['markdown']).parent}")


@main.command("run")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Experiment YAML (e.g. configs/experiment_market.yaml in the source repository; `reid-aug init` "
                   "writes one). Without --config and --out: the workspace.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None, help="Run folder.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Dataset root (overrides the config).")
@click.option("--fractions", default=None, help="Comma-separated real-data fractions, e.g. 0.2,0.4,1.0.")
@click.option("--seeds", default=None, help="Comma-separated seeds, e.g. 0,1,2.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--overwrite", is_flag=True, help="Accept a changed config for an existing run folder.")
def run_cmd(config_path: Path, out: Path, data: Path | None, fractions: str | None, seeds: str | None,
            device: str | None, overwrite: bool) -> None:
    """Run the fraction sweep: subset -> synthesize -> train-bot (standard and augmented) -> evaluate.

    Each (method, fraction, seed) cell lands in OUT/runs/<method>/frac<F>/seed<S>/ with its
    metrics.json; a re-run skips finished cells and resumes the others. Ends with the report.
    In a workspace (no --config and no --out): its reid-aug.yaml and folder, so cells that
    synthesize / train-bot already made are skipped.
    """
    if config_path is None and out is None:
        import dataclasses

        from reid_aug.cli.workspace_cmds import load_workspace, workspace_record

        if data is not None:
            raise click.UsageError("--data: a workspace's dataset is `data:` in its reid-aug.yaml")
        ws = load_workspace()
        # --fractions/--seeds pick cells of the workspace's experiment; the run folder keeps its config.
        try:
            cfg = dataclasses.replace(ws.config, device=device or ws.config.device,
                                      fractions=_comma_list(fractions, float) or ws.config.fractions,
                                      seeds=_comma_list(seeds, int) or ws.config.seeds)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        _run_and_report(cfg, ws.root, overwrite, record=workspace_record(ws))
        return
    if config_path is None or out is None:
        raise click.UsageError("give both --config and --out, or neither (the workspace)")
    cfg = load_config(
        ExperimentConfig, config_path,
        {"data": data, "fractions": _comma_list(fractions, float), "seeds": _comma_list(seeds, int), "device": device},
    )
    _run_and_report(cfg, out, overwrite)


@main.command("demo")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("demo"), show_default=True,
              help="Folder for the toy dataset (OUT/toy-market) and the run (OUT/run).")
@click.option("--ids", type=int, default=100, show_default=True, help="Identities in the toy Market.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Experiment YAML instead of the built-in reid_aug/configs/demo.yaml.")
@click.option("--fractions", default=None, help="Comma-separated fractions (default: the config's).")
@click.option("--device", default=None, help="cpu, cuda ... (default: cuda if available).")
def demo_cmd(out: Path, ids: int, config_path: Path | None, fractions: str | None, device: str | None) -> None:
    """The whole toolkit end to end on the built-in toy Market, then the report.

    Renders the toy dataset (seed 0) unless OUT/toy-market already holds it, then runs the
    sweep of the built-in demo config: rows 'standard' (real subset only) and 'pcdms' (the
    subset plus one image per real image drawn by the shipped toy PCDMs generator,
    builtin:toy, trained with train-pcdms on a toy Market of another seed; its CLIP and
    DINOv2 are random frozen stand-ins, so it is a toy, not the paper's model).
    """
    toy = out / "toy-market"
    # The config is checked before anything is rendered: a typo must not cost the rendering first.
    with contextlib.ExitStack() as stack:
        if config_path is None:
            config_path = stack.enter_context(resources.as_file(resources.files("reid_aug.configs") / DEMO_CONFIG))
        cfg = load_config(ExperimentConfig, config_path,
                          {"data": str(toy), "fractions": _comma_list(fractions, float), "device": device})
    manifest = read_toy_manifest(toy)
    if manifest is None or manifest.get("config", {}).get("num_ids") != ids or manifest.get("seed") != 0:
        click.echo(f"rendering the toy Market ({ids} identities) into {toy}")
        make_toy_market(toy, num_ids=ids, seed=0, overwrite=manifest is not None, progress=True)
    else:
        click.echo(f"toy Market already in {toy}")
    _run_and_report(cfg, out / "run", overwrite=False)
