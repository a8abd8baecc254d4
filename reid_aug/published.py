"""Figures published in the papers this toolkit reproduces, for side-by-side display only.

They are never mixed with measured results: the report prints them in their own
clearly labelled block. Numbers are copied from the papers as printed (percent).
"""

from __future__ import annotations

from types import MappingProxyType

#: Shen et al., "Advancing Pose-Guided Image Synthesis with Progressive Conditional
#: Diffusion Models", ICLR 2024, Table 2: Rank-1 (%) of BoT on Market-1501 trained on a
#: fraction of the real training images (+ synthetic images of the same identities),
#: "adhering to the PIDM protocol" (Bhunia et al., CVPR 2023). mAP was not reported.
TABLE2_SOURCE = "Shen et al. 2024, Table 2; Rank-1 only; PIDM protocol"
TABLE2_FRACTIONS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
TABLE2_RANK1 = MappingProxyType(
    {
        "Standard": (33.4, 56.6, 64.9, 69.2, 76.7),
        "PTN": (55.6, 57.3, 67.1, 72.5, 76.8),
        "GFLA": (57.3, 59.7, 67.6, 73.2, 76.8),
        "DPTN": (58.1, 62.6, 69.0, 74.2, 77.1),
        "PIDM": (61.3, 64.8, 71.6, 75.3, 78.4),
        "PCDMs": (63.8, 67.1, 73.3, 76.4, 80.3),
    }
)

#: Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person Re-identification",
#: CVPRW 2019: BoT (ResNet-50, 256x128, all tricks) on the full Market-1501 training set,
#: without re-ranking, in percent.
BOT_SOURCE = "Luo et al. 2019 (BoT), Market-1501, full training set, no re-ranking"
BOT_MARKET = MappingProxyType(
    {
        "BoT without center loss": {"rank1": 94.1, "mAP": 85.7},
        "BoT with center loss": {"rank1": 94.5, "mAP": 85.9},
    }
)

#: Shen et al. 2024, Table 1, Market-1501 at 128x64: (SSIM, LPIPS, FID) of each method on the
#: test pairs of the PIDM/PATN split.
TABLE1_SOURCE = "Shen et al. 2024, Table 1; Market-1501, 128x64"
TABLE1_MARKET = MappingProxyType(
    {
        "Def-GAN": (0.2683, 0.2994, 25.364),
        "PTN": (0.2821, 0.3196, 22.657),
        "GFLA": (0.2883, 0.2817, 19.751),
        "DPTN": (0.2854, 0.2711, 18.995),
        "PIDM": (0.3054, 0.2415, 14.451),
        "PCDMs": (0.3169, 0.2238, 13.897),
    }
)

#: Our method folder names -> the row names the papers use.
DISPLAY_NAMES = MappingProxyType(
    {"standard": "Standard", "pcdms": "PCDMs", "pidm": "PIDM", "dptn": "DPTN", "gfla": "GFLA", "ptn": "PTN"}
)


def display_name(method: str) -> str:
    """``"pcdms" -> "PCDMs"``; unknown folder names are shown as they are."""
    return DISPLAY_NAMES.get(method, method)
