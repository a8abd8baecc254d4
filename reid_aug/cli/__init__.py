"""The ``reid-aug`` command line: every step of the data flow is a sub-command.

Command modules register on the group in :mod:`reid_aug.cli.app`; the import
order here is the order ``reid-aug --help`` lists them in (the data flow).
"""

from reid_aug.cli.app import main
from reid_aug.cli import workspace_cmds  # noqa: F401  init
from reid_aug.cli import toy_cmds  # noqa: F401  make-toy-market
from reid_aug.cli import data_cmds  # noqa: F401  subset, dataset-info
from reid_aug.cli import synth_cmds  # noqa: F401  synthesize
from reid_aug.cli import filter_cmds  # noqa: F401  filter-identity
from reid_aug.cli import bot_cmds  # noqa: F401  train-bot
from reid_aug.cli import eval_cmds  # noqa: F401  evaluate
from reid_aug.cli import visualize_cmds  # noqa: F401  visualize-ranks
from reid_aug.cli import quality_cmds  # noqa: F401  quality
from reid_aug.cli import report_cmds  # noqa: F401  report
from reid_aug.cli import experiment_cmds  # noqa: F401  run, demo
from reid_aug.cli import pcdms_cmds  # noqa: F401  pcdms-info, convert-official
from reid_aug.cli import train_pcdms_cmds  # noqa: F401  train-pcdms, make-coarse

__all__ = ["main"]
