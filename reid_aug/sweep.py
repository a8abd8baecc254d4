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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from reid_aug.bot.train import BotConfig, train_bot
from reid_aug.data.market import ReidDataset, read_image_folder, read_reid_dataset
from reid_aug.data.subset import make_subset, read_subset_csv, write_subset_csv
from reid_aug.evaluate import METRICS_NAME, evaluate_model
from reid_aug.layout import STANDARD, cell_dir, subset_path, synthetic_dir
from reid_aug.manifest import MANIFEST_NAME, read_manifest, write_manifest
from reid_aug.synthesis import SynthesisConfig, synthesize

@dataclass(frozen=True)
class MethodConfig:
    """One augmentation row of the table: how its synthetic images are made and mixed in."""

    name: str
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    # Share of each BoT batch drawn from the synthetic images; None pools real and synthetic.
    synthetic_share: float | None = None

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


def _check_run_manifest(run_dir: Path, config: dict, overwrite: bool) -> None:
    """A run folder belongs to one experiment config: mixing two would corrupt the table."""
    manifest = read_manifest(run_dir)
    if manifest is None or overwrite:
        return
    old = manifest.get("config")
    if old != config:
        changed = sorted(k for k in set(old or {}) | set(config) if (old or {}).get(k) != config.get(k))
        raise ValueError(
            f"{run_dir / MANIFEST_NAME}: this run folder was made with a different experiment config "
            f"(keys that differ: {changed}); use a new run folder, or --overwrite to accept the new config"
        )


def _ensure_subset(dataset: ReidDataset, run_dir: Path, fraction: float, seed: int):
    path = subset_path(run_dir, fraction, seed)
    if not path.is_file():
        write_subset_csv(path, make_subset(dataset.train, fraction, seed))
    return path, read_subset_csv(path, dataset)


def run_experiment(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    config_record: dict,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) every cell of the sweep under ``run_dir``; return ``run_dir``.

    ``config_record`` is the plain-data form of ``cfg`` stored in the run manifest
    (the CLI builds it with ``config_to_dict``).
    """
    run_dir = Path(run_dir)
    dataset = read_reid_dataset(cfg.data)
    _check_run_manifest(run_dir, config_record, overwrite)
    write_manifest(
        run_dir,
        "run",
        config=config_record,
        seed=None,
        sources={"data": dataset.root},
        extra={"layout": dataset.layout, "num_train_images": len(dataset.train), "num_train_pids": dataset.num_train_pids},
    )
    arms: list[MethodConfig | None] = ([None] if cfg.standard else []) + list(cfg.methods)
    cells = [(seed, fraction, arm) for seed in cfg.seeds for fraction in cfg.fractions for arm in arms]
    for i, (seed, fraction, arm) in enumerate(cells, 1):
        name = STANDARD if arm is None else arm.name
        out = cell_dir(run_dir, name, fraction, seed)
        label = f"[{i}/{len(cells)}] {name} fraction {fraction:g} seed {seed}"
        if (out / METRICS_NAME).is_file():
            echo(f"{label}: done, skipped")
            continue
        sub_path, records = _ensure_subset(dataset, run_dir, fraction, seed)
        synthetic = []
        bot_cfg = dataclasses.replace(cfg.bot, seed=seed)
        if arm is not None:
            echo(f"{label}: synthesizing ({arm.synthesis.generator})")
            syn_cfg = dataclasses.replace(arm.synthesis, seed=seed)
            # Nested subsets share sources: images the same job made at another fraction are reused.
            others = [synthetic_dir(run_dir, name, f, seed) for f in cfg.fractions if f != fraction]
            syn_dir = synthesize(
                syn_cfg, dataset, records, synthetic_dir(run_dir, name, fraction, seed), subset_file=sub_path,
                reuse_from=others, log=echo,
            )
            synthetic = read_image_folder(syn_dir, relabel=False, keep_distractors=False)
            bot_cfg = dataclasses.replace(bot_cfg, synthetic_share=arm.synthetic_share)
        echo(f"{label}: training BoT on {len(records)} real + {len(synthetic)} synthetic images")
        train_bot(
            bot_cfg,
            records,
            out,
            synthetic_records=synthetic,
            resume=True,
            device=cfg.device,
            sources={"data": dataset.root, "subset": sub_path},
        )
        metrics = evaluate_model(out / "model", cfg.data, out_path=out / METRICS_NAME, rerank=cfg.rerank, device=cfg.device)
        echo(f"{label}: Rank-1 {100 * metrics['rank1']:.1f}  mAP {100 * metrics['mAP']:.1f}")
    return run_dir
