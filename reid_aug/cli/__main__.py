"""``python -m reid_aug.cli``: the same as the ``reid-aug`` command."""

from reid_aug.cli import main

main()
