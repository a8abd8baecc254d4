"""``reid-aug train-bot``: train BoT on a real training set (or a subset of it) plus synthetic folders."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from pcdms.io import launcher_rank
from reid_aug.bot.train import BotConfig, train_bot
from reid_aug.cli.app import main
from reid_aug.cli.config import config_to_dict, load_config, normalize_record, read_yaml
from reid_aug.data.market import DatasetError, read_reid_dataset, read_synthetic_folder
from reid_aug.data.subset import read_subset_csv


def _image_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HxW such as 256x128, got {value!r}") from None
    return h, w


@main.command("train-bot")
@click.option("--data", "data_root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Dataset root (Market-1501 layout, DukeMTMC-reID or MSMT17). Without --data and --out: the "
                   "workspace's cell.")
@click.option("--subset", "subset_file", default=None,
              help="Subset list from `reid-aug subset` (default: every training image); in a workspace the "
                   "cell's fraction (default 1).")
@click.option("--method", default=None,
              help="Workspace only: the row to train, 'standard' (real images only, the default) or a method "
                   "whose synthetic images `synthesize` made.")
@click.option("--synthetic", "synthetic_dirs", type=click.Path(path_type=Path, file_okay=False), multiple=True,
              help="Folder of synthetic Market-named images of training identities (repeatable).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Run folder: checkpoint.pt, log.csv, model/, manifest.json (in a workspace: "
                   "runs/<method>/frac<F>/seed<S>/, evaluated into metrics.json).")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="YAML with BotConfig keys (top level, or under `bot:` as in an experiment file).")
@click.option("--backbone", type=click.Choice(["resnet18", "resnet34", "resnet50"]), default=None,
              help=f"Default {BotConfig().backbone}.")
@click.option("--epochs", type=int, default=None, help=f"Default {BotConfig().epochs}.")
@click.option("--batch-size", type=int, default=None, help=f"P x K images per batch (all GPUs together); default {BotConfig().batch_size}.")
@click.option("--image-size", callback=_image_size, default=None, help="Training size HxW; default {}x{}.".format(*BotConfig().image_size))
@click.option("--pretrained", default=None,
              help="Local torchvision ImageNet ResNet .pth (e.g. resnet50-0676ba61.pth), or 'none' for random init.")
@click.option("--synthetic-share", type=float, default=None,
              help="Share of every batch drawn from the synthetic images (default: pool all images).")
@click.option("--seed", type=int, default=None, help=f"Default {BotConfig().seed}.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from OUT/checkpoint.pt, or start over.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep decoded images here (.npy) so re-runs skip decoding.")
@click.option("--tensorboard/--no-tensorboard", default=None,
              help="TensorBoard events in OUT/tensorboard (default: when the tensorboard package is installed).")
@click.option("--dry-run", is_flag=True,
              help="Print the resolved config and the plan (images, identities, iterations per epoch); train nothing.")
def train_bot_cmd(
    data_root: Path | None,
    subset_file: str | None,
    method: str | None,
    synthetic_dirs: tuple[Path, ...],
    out_dir: Path | None,
    config_path: Path | None,
    backbone: str | None,
    epochs: int | None,
    batch_size: int | None,
    image_size: tuple[int, int] | None,
    pretrained: str | None,
    synthetic_share: float | None,
    seed: int | None,
    resume: bool,
    device: str | None,
    cache_dir: Path | None,
    tensorboard: bool | None,
    dry_run: bool,
) -> None:
    """Train a BoT re-ID model (Luo et al. 2019, reid-strong-baseline Market recipe).

    \b
    In a workspace (no --data and no --out; see `reid-aug init`): `reid-aug train-bot` trains and
    evaluates the standard row at 100 %; `--subset 0.4 --method pcdms` the cell of fraction 0.4
    on its real subset plus the images `reid-aug synthesize --subset 0.4` made.
    \b
    Default recipe: ResNet-50, last stride 1, BNNeck, 256x128, P x K = 16 x 4, Adam 3.5e-4,
    warmup 10 epochs, x0.1 at 40 and 70, 120 epochs, label-smoothed CE + triplet + center.
    The source repository's configs/bot_market.yaml (published recipe) and configs/bot_toy.yaml
    (CPU toy) are ready-made --config files; `--dry-run` prints the resolved config.
    """
    overrides = {
        "backbone": backbone,
        "epochs": epochs,
        "batch_size": batch_size,
        "image_size": image_size,
        "pretrained": None if pretrained is None or pretrained.lower() == "none" else pretrained,
        "synthetic_share": synthetic_share,
        "seed": seed,
    }
    if data_root is None and out_dir is None:
        return _workspace_run(subset_file, method, synthetic_dirs, config_path, overrides, pretrained, resume,
                              device, cache_dir, tensorboard, dry_run)
    if data_root is None or out_dir is None:
        raise click.UsageError("give both --data and --out (a one-off run), or neither (the workspace's cell)")
    if method is not None:
        raise click.UsageError("--method names a workspace row; a one-off run takes --synthetic DIR")
    subset_file = Path(subset_file) if subset_file is not None else None
    section = "bot" if config_path is not None and "bot" in read_yaml(config_path) else None
    cfg = load_config(BotConfig, config_path, overrides, section=section)
    if pretrained is not None and pretrained.lower() == "none":
        cfg = dataclasses.replace(cfg, pretrained=None)
    try:
        dataset = read_reid_dataset(data_root)
        records = read_subset_csv(subset_file, dataset) if subset_file is not None else list(dataset.train)
        synthetic = [r for d in synthetic_dirs for r in read_synthetic_folder(d)]
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from None
    sources = {"data": dataset.root}
    if subset_file is not None:
        sources["subset"] = subset_file.absolute()
    from reid_aug.synthesis import SynthesisError, check_synthetic_folder

    for i, d in enumerate(synthetic_dirs):
        try:
            info = check_synthetic_folder(d, (r.name for r in records))
        except SynthesisError as exc:
            raise click.ClickException(str(exc)) from None
        sources[f"synthetic_{i}"] = d.absolute()
        sources[f"synthetic_{i}_plan_sha256"] = info["plan_sha256"]
        if info["step"] is None:
            click.echo(f"note: {d} has no manifest.json: where its images come from is not recorded")
    echo = click.echo if launcher_rank() == 0 else (lambda *_a, **_k: None)
    echo(
        f"BoT {cfg.backbone} on {len(records)} real images / {len({r.pid for r in records})} ids"
        f" + {len(synthetic)} synthetic, {cfg.epochs} epochs -> {out_dir}"
    )
    if cfg.pretrained is None:
        echo("note: no pretrained backbone, training from random weights (the published recipe "
             "starts from ImageNet weights: --pretrained PATH)")
    if dry_run:
        _print_plan(cfg, records, synthetic)
        return
    start = time.perf_counter()
    try:
        model_dir = train_bot(
            cfg, records, out_dir, synthetic_records=synthetic, resume=resume, device=device,
            sources=sources, cache_dir=cache_dir, tensorboard=tensorboard, log=echo,
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise click.ClickException(str(exc)) from None
    if launcher_rank() == 0:  # under torchrun: once, not once per process
        click.echo(f"model in {model_dir} ({time.perf_counter() - start:.1f} s)")


def _workspace_run(subset, method_name, synthetic_dirs, config_path, overrides, pretrained, resume, device,
                   cache_dir, tensorboard, dry_run) -> None:
    """`train-bot` in a workspace: train and evaluate the cell (method, fraction, seed) of its run folder."""
    from reid_aug.cli.synth_cmds import workspace_fraction
    from reid_aug.cli.workspace_cmds import load_workspace, settings_conflict, workspace_record
    from reid_aug.layout import STANDARD, cell_dir
    from reid_aug.data.subset import make_subset
    from reid_aug.sweep import ExperimentConfig, cell_synthetic_images, open_run_dir, train_cell
    from reid_aug.synthesis import SynthesisError

    for flag, given in (("--synthetic", synthetic_dirs), ("--config", config_path), ("--cache-dir", cache_dir),
                        ("--tensorboard", tensorboard is not None), ("--no-resume", not resume)):
        if given:
            raise click.UsageError(f"{flag} is for one-off runs (--data/--out); a workspace cell takes its "
                                   "synthetic images from `synthesize` and its recipe from reid-aug.yaml")
    frac = workspace_fraction(subset, None)
    ws = load_workspace()
    method = ws.method(method_name or STANDARD)
    seed = overrides.pop("seed")
    seed = ws.config.seeds[0] if seed is None else seed
    if overrides.pop("synthetic_share") is not None:
        raise click.UsageError("--synthetic-share: a workspace method's share is `synthetic_share:` in reid-aug.yaml")
    bot_overrides = {k: v for k, v in overrides.items() if v is not None}
    if pretrained is not None:
        bot_overrides["pretrained"] = None if pretrained.lower() == "none" else Path(pretrained)
    changed = sorted(k for k, v in bot_overrides.items() if v != getattr(ws.config.bot, k))
    if changed:
        raise settings_conflict(ws, "the BoT recipe comes", changed, "it", "bot:", "train a one-off run")
    cfg = dataclasses.replace(ws.config, device=device or ws.config.device)
    name = STANDARD if method is None else method.name
    try:
        if dry_run:  # nothing written: the subset is drawn as the cell would draw it
            records = make_subset(read_reid_dataset(cfg.data).train, frac, seed)
            synthetic = ([] if method is None else
                         cell_synthetic_images(ws.root, method, frac, seed, (r.name for r in records)))
            click.echo(f"workspace {ws.root}: {name}, fraction {frac:g}, seed {seed} -> "
                       f"{cell_dir(ws.root, name, frac, seed)}")
            bot = dataclasses.replace(cfg.bot, seed=seed,
                                      synthetic_share=None if method is None else method.synthetic_share)
            _print_plan(bot, records, synthetic)
            return
        dataset = open_run_dir(ws.config, ws.root, workspace_record(ws), normalize=normalize_record(ExperimentConfig))
        metrics = train_cell(cfg, ws.root, dataset, method, frac, seed, echo=click.echo,
                             label=f"workspace {ws.root}: {name} fraction {frac:g} seed {seed}")
    except (DatasetError, SynthesisError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"metrics in {cell_dir(ws.root, name, frac, seed) / 'metrics.json'} "
               f"(Rank-1 {100 * metrics['rank1']:.1f}, mAP {100 * metrics['mAP']:.1f})")


def _print_plan(cfg, records, synthetic) -> None:
    """``--dry-run``: the config train-bot would use (YAML, as ``--config`` takes it) and its plan."""
    import yaml

    from reid_aug.bot.train import training_plan

    try:
        plan = training_plan(cfg, records, synthetic)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("# resolved config\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
    per_epoch = plan["iterations_per_epoch"]
    spread = f"{min(per_epoch)}-{max(per_epoch)}" if min(per_epoch) != max(per_epoch) else str(per_epoch[0])
    click.echo(f"# plan: {plan['real_images']} real images / {plan['identities']} ids + {plan['synthetic_images']} "
               f"synthetic; {spread} iterations per epoch of {plan['images_per_iteration']} images, "
               f"{plan['iterations']} in {cfg.epochs} epochs; lr x{cfg.gamma} from epochs {list(cfg.milestones)}")
