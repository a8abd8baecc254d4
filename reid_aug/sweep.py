"""The fraction sweep: subset -> synthesize -> train BoT (standard and augmented) -> evaluate.

Reproduces the protocol of Table 2 in Shen et al. 2024 (PCDMs), itself taken
from PIDM (Bhunia et al., CVPR 2023): seeded subsets of 20-100 % of the real
Market-1501 training images, every identity kept; BoT (Luo et al. 2019)
trained on each subset alone ("standard") and on the subset plus synthetic
images of its own identities; Rank-1/mAP on the untouched query/gallery split.

Everything lives under one run folder (:mod:`reid_aug.layout`); ``metrics.json`` is written last and atomically, so it marks a finished cell:
a re-run skips finished cells and resumes the others (BoT from its
checkpoint, synthesis from the images already written).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pcdms.devices import resolve_device
from pcdms.io import read_json_object

from reid_aug.bot.train import BotConfig, train_bot
from reid_aug.data.market import ReidDataset, read_reid_dataset, read_synthetic_folder
from reid_aug.data.subset import make_subset, read_subset_csv, write_subset_csv
from reid_aug.evaluate import METRICS_NAME, evaluate_model
from reid_aug.layout import STANDARD, cell_dir, filtered_dir, subset_path, synthetic_dir
from reid_aug.manifest import MANIFEST_NAME, read_manifest, write_manifest
from reid_aug.synthesis import (SynthesisConfig, SynthesisError, check_synthetic_folder, config_dict,
                                config_differences, read_synthesis_manifest, synthesize)


@dataclass(frozen=True)
class IdentityFilterConfig:
    """Keep a cell's synthetic images that the standard row's BoT (same fraction and seed, trained on the
    real subset alone) recognises: cosine score >= ``min_score`` and/or own identity ranked first
    (:mod:`reid_aug.identity_filter`)."""

    min_score: float | None = None
    rank1: bool = False

    def __post_init__(self) -> None:
        if self.min_score is None and not self.rank1:
            raise ValueError("identity_filter needs min_score and/or rank1: true")
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"identity_filter.min_score is a cosine similarity in [-1, 1], got {self.min_score}")


@dataclass(frozen=True)
class MethodConfig:
    """One augmentation row of the table: how its synthetic images are made and mixed in."""

    name: str
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    # Share of each BoT batch drawn from the synthetic images; None pools real and synthetic.
    synthetic_share: float | None = None
    # Beyond the paper: train on the synthetic images the standard row's model recognises only.
    identity_filter: IdentityFilterConfig | None = None

    def __post_init__(self) -> None:
        if not self.name or self.name == STANDARD or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"method name {self.name!r} is reserved or not a valid folder name")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole sweep. ``seeds`` drive the subset, the synthesis and BoT of each cell alike."""

    data: Path
    fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    seeds: tuple[int, ...] = (0,)
    standard: bool = True
    methods: tuple[MethodConfig, ...] = ()
    bot: BotConfig = field(default_factory=BotConfig)
    rerank: bool = False
    device: str | None = None
    # Pose annotations of the training images (default: DATA/market-annotation-train.csv).
    poses: Path | None = None

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        if len(set(self.fractions)) != len(self.fractions) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("fractions and seeds must not repeat")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        if not self.standard and not self.methods:
            raise ValueError("nothing to run: standard is off and no augmentation method is given")
        if not self.standard and any(m.identity_filter for m in self.methods):
            raise ValueError("an identity_filter scores with the standard row's models: standard must be on")


def _check_run_manifest(run_dir: Path, config: dict, overwrite: bool,
                        normalize: Callable[[dict], dict] | None = None) -> None:
    """A run folder belongs to one experiment config: mixing two would corrupt the table.

    ``normalize`` rebuilds the stored record with today's defaults (the CLI parses it back into an
    :class:`ExperimentConfig`), so a key added to the toolkit since does not count as a change.
    """
    manifest = read_manifest(run_dir)
    if manifest is None or overwrite:
        return
    old = manifest.get("config")
    if normalize is not None and isinstance(old, dict):
        try:
            old = normalize(old)
        except (ValueError, TypeError):  # a key since removed: compare as stored, the diff names it
            pass
    if old != config:
        changed = sorted(k for k in set(old or {}) | set(config) if (old or {}).get(k) != config.get(k))
        raise ValueError(
            f"{run_dir / MANIFEST_NAME}: this run folder was made with a different experiment config "
            f"(keys that differ: {changed}); use a new run folder, or --overwrite to accept the new config"
        )


def open_run_dir(cfg: ExperimentConfig, run_dir: str | Path, config_record: dict, overwrite: bool = False,
                 normalize: Callable[[dict], dict] | None = None) -> ReidDataset:
    """Check that ``run_dir`` holds this experiment (or nothing yet), record it there; return the dataset.

    Every command that writes a cell (``run``, and ``synthesize`` / ``train-bot`` in a workspace)
    goes through here, so one run folder never mixes two experiment configs.
    """
    run_dir = Path(run_dir)
    dataset = read_reid_dataset(cfg.data)
    _check_run_manifest(run_dir, config_record, overwrite, normalize)
    write_manifest(
        run_dir,
        "run",
        config=config_record,
        seed=None,
        sources={"data": dataset.root},
        extra={"layout": dataset.layout, "num_train_images": len(dataset.train), "num_train_pids": dataset.num_train_pids},
    )
    return dataset


def ensure_subset(dataset: ReidDataset, run_dir: str | Path, fraction: float, seed: int):
    """(path, records) of the cell's real subset, written on first use (nested across fractions)."""
    path = subset_path(run_dir, fraction, seed)
    if not path.is_file():
        write_subset_csv(path, make_subset(dataset.train, fraction, seed))
    return path, read_subset_csv(path, dataset)


def synthesize_cell(cfg: ExperimentConfig, run_dir: str | Path, dataset: ReidDataset, method: MethodConfig,
                    fraction: float, seed: int, echo: Callable[[str], None] = print,
                    progress: bool = True, overwrite: bool = False, dry_run: bool = False) -> Path | dict:
    """Make (or resume, or find complete) the synthetic images of one cell; return their folder
    (``dry_run``: write nothing, return the plan, see :func:`reid_aug.synthesis.synthesize`)."""
    if dry_run:
        sub_path, records = subset_path(run_dir, fraction, seed), make_subset(dataset.train, fraction, seed)
    else:
        sub_path, records = ensure_subset(dataset, run_dir, fraction, seed)
    syn_cfg = dataclasses.replace(method.synthesis, seed=seed, device=method.synthesis.device or cfg.device)
    # Nested subsets share sources: images the same job made at another fraction are reused.
    others = [synthetic_dir(run_dir, method.name, f, seed) for f in cfg.fractions if f != fraction]
    return synthesize(syn_cfg, dataset, records, synthetic_dir(run_dir, method.name, fraction, seed),
                      poses_csv=cfg.poses, subset_file=sub_path, reuse_from=others, log=echo, progress=progress,
                      overwrite=overwrite, dry_run=dry_run)


def cell_synthetic_images(run_dir: str | Path, method: MethodConfig, fraction: float, seed: int,
                          real_names: Iterable[str]) -> list:
    """The synthetic images of a cell, checked: the folder is complete, made from the cell's real subset
    ``real_names`` only, and with the method's settings (not with other options that would then sit in
    the table under the method's name)."""
    syn_dir = synthetic_dir(run_dir, method.name, fraction, seed)
    stored = read_synthesis_manifest(syn_dir) if syn_dir.is_dir() else None
    if stored is None or not stored.get("complete"):
        raise SynthesisError(f"{syn_dir}: no complete synthetic images of method {method.name!r} at fraction "
                             f"{fraction:g}, seed {seed}; make them first (reid-aug synthesize --subset "
                             f"{fraction:g} --method {method.name})")
    check_synthetic_folder(syn_dir, real_names)
    diffs = config_differences(stored.get("config", {}), config_dict(dataclasses.replace(method.synthesis, seed=seed)))
    if diffs:
        raise SynthesisError(f"{syn_dir} was made with other settings than method {method.name!r} "
                             f"({'; '.join(diffs)}); make it again (reid-aug synthesize --subset {fraction:g} "
                             f"--method {method.name} --overwrite)")
    return read_synthetic_folder(syn_dir)


def _filtered(run_dir, method: MethodConfig, fraction: float, seed: int, device, echo, label) -> list:
    """The cell's synthetic images that pass its identity filter (made once, into ``filtered/``)."""
    from reid_aug.identity_filter import filter_folder

    standard = cell_dir(run_dir, STANDARD, fraction, seed)
    if not (standard / METRICS_NAME).is_file():
        raise SynthesisError(f"the identity filter of method {method.name!r} scores with the standard row's model "
                             f"at fraction {fraction:g}, seed {seed} ({standard / 'model'}); train it first "
                             f"(reid-aug train-bot --subset {fraction:g})")
    f = method.identity_filter
    out = filtered_dir(run_dir, method.name, fraction, seed)
    made = filter_folder(synthetic_dir(run_dir, method.name, fraction, seed), standard / "model", out, f.min_score,
                         f.rank1, device=resolve_device(device))
    echo(f"{label}: identity filter kept {made['kept']:,} of {made['images']:,} synthetic images "
         f"({100 * made['kept_fraction']:.1f} %)")
    return read_synthetic_folder(out)


def _cell_bot_config(cfg: ExperimentConfig, method: MethodConfig | None, seed: int) -> BotConfig:
    bot = dataclasses.replace(cfg.bot, seed=seed)
    return bot if method is None else dataclasses.replace(bot, synthetic_share=method.synthetic_share)


# BoT settings that do not change a finished model (logging, loading, what is kept on disk).
_BOT_EXECUTION_KEYS = ("log_every", "num_workers", "keep_checkpoint")


def _changed_bot_keys(out: Path, expected: BotConfig) -> list[str]:
    """Keys in which the finished cell ``out`` was trained otherwise than ``expected`` says."""
    stored = (read_manifest(out) or {}).get("config") or {}
    now = json.loads(json.dumps(dataclasses.asdict(expected), default=str))
    return sorted(k for k in now if k not in _BOT_EXECUTION_KEYS and stored.get(k) != now[k])


def train_cell(cfg: ExperimentConfig, run_dir: str | Path, dataset: ReidDataset, method: MethodConfig | None,
               fraction: float, seed: int, echo: Callable[[str], None] = print, label: str = "") -> dict:
    """Train and evaluate BoT for one cell (``method`` None: the standard row); return its metrics.

    An augmented cell trains on its synthetic folder, which must be complete: call
    :func:`synthesize_cell` first (``run`` does; in a workspace, ``reid-aug synthesize``).
    """
    name = STANDARD if method is None else method.name
    out = cell_dir(run_dir, name, fraction, seed)
    label = label or f"{name} fraction {fraction:g} seed {seed}"
    sub_path, records = ensure_subset(dataset, run_dir, fraction, seed)
    bot_cfg = _cell_bot_config(cfg, method, seed)
    synthetic = []
    if method is not None:
        synthetic = cell_synthetic_images(run_dir, method, fraction, seed, (r.name for r in records))
        if method.identity_filter is not None:
            synthetic = _filtered(run_dir, method, fraction, seed, cfg.device, echo, label)
    echo(f"{label}: BoT on {len(records)} real + {len(synthetic)} synthetic images")
    train_bot(bot_cfg, records, out, synthetic_records=synthetic, resume=True, device=cfg.device,
              sources={"data": dataset.root, "subset": sub_path}, log=lambda msg: echo(f"{label}: {msg}"))
    # train_bot deletes metrics.json whenever it trains, so one still here scored this very model.
    metrics = _current_metrics(out / METRICS_NAME, cfg.rerank)
    if metrics is None:
        metrics = evaluate_model(out / "model", cfg.data, out_path=out / METRICS_NAME, rerank=cfg.rerank,
                                 device=cfg.device)
    else:
        echo(f"{label}: already evaluated ({out / METRICS_NAME})")
    echo(f"{label}: Rank-1 {100 * metrics['rank1']:.1f}  mAP {100 * metrics['mAP']:.1f}")
    return metrics


def _current_metrics(path: Path, rerank: bool) -> dict | None:
    """The metrics in ``path`` if they were computed with the same re-ranking setting, else None."""
    if not path.is_file():
        return None
    metrics = read_json_object(path)
    return metrics if (metrics.get("rerank") is not None) == rerank else None


def run_experiment(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    config_record: dict,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
    normalize: Callable[[dict], dict] | None = None,
) -> Path:
    """Run (or resume) every cell of the sweep under ``run_dir``; return ``run_dir``.

    ``config_record`` is the plain-data form of ``cfg`` stored in the run manifest
    (the CLI builds it with ``config_to_dict``). Cells that ``synthesize`` / ``train-bot``
    made in the same run folder (a workspace) are found done and skipped.
    """
    run_dir = Path(run_dir)
    dataset = open_run_dir(cfg, run_dir, config_record, overwrite, normalize)
    arms: list[MethodConfig | None] = ([None] if cfg.standard else []) + list(cfg.methods)
    cells = [(seed, fraction, arm) for seed in cfg.seeds for fraction in cfg.fractions for arm in arms]
    for i, (seed, fraction, arm) in enumerate(cells, 1):
        name = STANDARD if arm is None else arm.name
        label = f"[{i}/{len(cells)}] {name} fraction {fraction:g} seed {seed}"
        out = cell_dir(run_dir, name, fraction, seed)
        if (out / METRICS_NAME).is_file():
            changed = _changed_bot_keys(out, _cell_bot_config(cfg, arm, seed))
            if not changed:
                echo(f"{label}: done, skipped")
                continue
            if not overwrite:
                raise ValueError(f"{out} was trained with another BoT config (keys that differ: {changed}); "
                                 "use --overwrite to train it again")
            echo(f"{label}: trained with another BoT config ({', '.join(changed)}): training it again")
            shutil.rmtree(out)
        if arm is not None:
            echo(f"{label}: synthesizing ({arm.synthesis.generator})")
            synthesize_cell(cfg, run_dir, dataset, arm, fraction, seed, echo)
        train_cell(cfg, run_dir, dataset, arm, fraction, seed, echo, label)
    return run_dir
