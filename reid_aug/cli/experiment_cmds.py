"""reid-aug experiment commands."""

from reid_aug.cli.app import main  # noqa: F401
