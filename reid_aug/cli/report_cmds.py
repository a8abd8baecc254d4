"""reid-aug report commands."""

from reid_aug.cli.app import main  # noqa: F401
