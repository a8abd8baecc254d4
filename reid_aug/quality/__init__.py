"""Image quality of pose-guided generation as the pose-transfer papers report it (DESIGN.md §9).

- :mod:`reid_aug.quality.pixel`: SSIM (community settings), L1, the target-keypoint person mask;
- :mod:`reid_aug.quality.perceptual`: LPIPS (AlexNet v0.1, inputs in [-1, 1]);
- :mod:`reid_aug.quality.fid`: FID, community (torchvision Inception) and standard (TF-Inception);
- :mod:`reid_aug.quality.job`: the ``reid-aug quality`` job over test pairs.
"""

from reid_aug.quality.pixel import apply_mask, l1, pose_mask, ssim

__all__ = ["apply_mask", "l1", "pose_mask", "ssim"]
