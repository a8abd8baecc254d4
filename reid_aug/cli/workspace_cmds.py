"""``reid-aug init`` and how the bare commands find their workspace (see :mod:`reid_aug.workspace`)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import click
import yaml

from pcdms.io import write_text_atomic
from reid_aug.bot.config import BotConfig
from reid_aug.cli.app import main
from reid_aug.cli.config import ConfigError, config_to_dict, load_config
from reid_aug.data.toy import read_toy_manifest
from reid_aug.layout import STANDARD
from reid_aug.sweep import ExperimentConfig, MethodConfig
from reid_aug.synthesis import SynthesisConfig
from reid_aug.workspace import WORKSPACE_FILE, builtin_toy_market, find_workspace

DEMO_CONFIG = "demo.yaml"
BUILTIN_TOY_DATA = "builtin:toy-market"  # `data:` value: the built-in toy Market, made once into the cache


@dataclass(frozen=True)
class Workspace:
    """``root``: the run folder of the workspace; ``file``: its reid-aug.yaml (None: built-in defaults)."""

    root: Path
    file: Path | None
    config: ExperimentConfig

    def method(self, name: str) -> MethodConfig | None:
        """The method called ``name`` (None for ``standard``); a clear error for an unknown one."""
        if name == STANDARD:
            return None
        for method in self.config.methods:
            if method.name == name:
                return method
        known = [STANDARD] + [m.name for m in self.config.methods]
        raise click.BadParameter(f"{name!r} is not a method of {self.file or 'the built-in workspace'} "
                                 f"(known: {', '.join(known)})", param_hint="--method")


def _demo_config_text() -> str:
    return (resources.files("reid_aug.configs") / DEMO_CONFIG).read_text()


def settings_conflict(ws: Workspace, settings: str, changed, differ_from: str, key: str,
                      one_off: str) -> click.UsageError:
    """The error for command-line settings that differ from the workspace's: a cell made with them
    would sit in the table under the workspace's settings. ``settings`` names them with their verb
    ("the BoT recipe comes"), ``key`` is where they live in reid-aug.yaml, ``one_off`` the command
    form that takes them."""
    return click.UsageError(
        f"in a workspace {settings} from {ws.file or 'the built-in workspace'}; {', '.join(changed)} would differ "
        f"from {differ_from} and mix into its table. Set them under {key} in {WORKSPACE_FILE}"
        f"{'' if ws.file else ' (`reid-aug init` writes one here)'}, or {one_off} (--data ROOT --out DIR)")


def load_workspace(echo=click.echo, overrides: dict | None = None) -> Workspace:
    """The workspace of the current folder: its reid-aug.yaml (here or in a parent), or the built-in one.

    ``data`` and ``poses`` written as relative paths are relative to the file's folder;
    ``data: builtin:toy-market`` is the built-in toy Market. Errors name the file.
    """
    file = find_workspace()
    with contextlib.ExitStack() as stack:
        if file is None:
            source = stack.enter_context(resources.as_file(resources.files("reid_aug.configs") / DEMO_CONFIG))
            root = Path.cwd().absolute()
            echo(f"no {WORKSPACE_FILE} here or above: workspace {root} with the built-in toy data and generator "
                 "(reid-aug init writes one to edit)")
            cfg = load_config(ExperimentConfig, source, {"data": BUILTIN_TOY_DATA, **(overrides or {})})
        else:
            root = file.parent
            cfg = load_config(ExperimentConfig, file, overrides)
    if str(cfg.data) == BUILTIN_TOY_DATA:
        cfg = dataclasses.replace(cfg, data=builtin_toy_market(echo))
    elif not cfg.data.is_absolute():
        cfg = dataclasses.replace(cfg, data=root / cfg.data)
    if cfg.poses is not None and not cfg.poses.is_absolute():
        cfg = dataclasses.replace(cfg, poses=root / cfg.poses)
    return Workspace(root, file, cfg)


def workspace_record(ws: Workspace) -> dict:
    """The experiment config as the run manifest stores it (the same record ``run`` writes)."""
    return config_to_dict(ws.config)


@main.command("init")
@click.option("--data", "data_root", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Dataset root (Market-1501 layout; default: the built-in toy Market).")
@click.option("--poses", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="Pose annotations of the training images (default DATA/market-annotation-train.csv).")
@click.option("--pipeline", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Trained PCDMs generator folder (default for the toy data: builtin:toy).")
@click.option("--clip-checkpoint", type=click.Path(path_type=Path, exists=True), default=None,
              help="OpenCLIP ViT-H/14 checkpoint.")
@click.option("--dino", "dino_path", type=click.Path(path_type=Path, exists=True), default=None,
              help="DINOv2 transformers folder.")
@click.option("--vae", "vae_path", type=click.Path(path_type=Path, exists=True), default=None,
              help="SD 2.1-base folder (or a bare VAE folder).")
@click.option("--pretrained", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="torchvision ImageNet ResNet-50 .pth for BoT.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--force", is_flag=True, help="Replace an existing reid-aug.yaml.")
def init_cmd(data_root, poses, pipeline, clip_checkpoint, dino_path, vae_path, pretrained, device, force) -> None:
    """Write reid-aug.yaml here: the workspace the bare commands use.

    \b
    Without --data: the built-in toy Market and toy generator with the demo's recipe.
    With a real dataset: the paper's experiment (fractions 0.2-1.0, PCDMs with DDIM 50 steps,
    guidance 2.0; BoT with the published Market recipe) with the paths given; edit the file
    for the rest. Then, in this folder or below:
      reid-aug synthesize --subset 0.4
      reid-aug train-bot --subset 0.4 --method pcdms
      reid-aug train-bot --subset 0.4
      reid-aug report
    """
    target = Path.cwd() / WORKSPACE_FILE
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists; edit it, or use --force to replace it")
    data = data_root.absolute() if data_root is not None else None
    toy = data is None or read_toy_manifest(data) is not None
    if toy:
        if any(v is not None for v in (clip_checkpoint, dino_path, vae_path, pretrained)):
            raise click.UsageError("--clip-checkpoint/--dino/--vae/--pretrained belong to a real dataset's workspace; "
                                   "the toy workspace uses the shipped toy generator's stand-in encoders")
        text = _demo_config_text()
        # The demo file has no data key (`demo` fills it in): put the workspace's in front.
        head = [f"data: {data if data is not None else BUILTIN_TOY_DATA}"]
        if poses is not None:
            head.append(f"poses: {poses.absolute()}")
        if device is not None:
            head.append(f"device: {device}")
        if pipeline is not None:
            text = text.replace("pipeline: builtin:toy", f"pipeline: {pipeline.absolute()}")
        text = "\n".join(head) + "\n" + text
    else:
        synthesis = SynthesisConfig(pipeline=pipeline, clip_checkpoint=clip_checkpoint, dino_path=dino_path,
                                    vae_path=vae_path)
        cfg = ExperimentConfig(data=data, poses=poses, methods=(MethodConfig("pcdms", synthesis),),
                               bot=BotConfig(pretrained=pretrained), device=device)
        text = ("# The paper's Table-2 experiment with the published BoT recipe; every key is listed.\n"
                + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    header = ("# reid-aug workspace: the bare commands (synthesize, train-bot, report, run) in this folder\n"
              "# or below take their defaults from here; command-line options override them.\n")
    write_text_atomic(target, header + text)
    try:
        load_config(ExperimentConfig, target)
    except ConfigError as exc:  # never leave a file the next command cannot read
        target.unlink()
        raise click.ClickException(f"could not write a valid workspace file: {exc}") from None
    click.echo(f"wrote {target}")
    if not toy and pipeline is None:
        click.echo("note: no --pipeline: set methods[0].synthesis.pipeline to a trained PCDMs folder before "
                   "`reid-aug synthesize`")
