"""reid-aug: pose-guided synthetic data (PCDMs) for person re-identification.

The re-ID application built on the generic :mod:`pcdms` library: dataset
layouts, subsets, synthesis jobs, BoT training, evaluation, sweeps, reports
and the ``reid-aug`` command line.
"""

__version__ = "0.1.0"
