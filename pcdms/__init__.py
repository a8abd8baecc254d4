"""pcdms: Progressive Conditional Diffusion Models for pose-guided person image synthesis.

Shen et al., "Advancing Pose-Guided Image Synthesis with Progressive
Conditional Diffusion Models", ICLR 2024. A generic library: poses, the
three stage networks (prior, inpaint, refine), frozen encoders, the sampling
pipeline and checkpoint I/O. It never imports :mod:`reid_aug`.
"""

__version__ = "0.1.0"
