"""BoT re-ID (Luo et al., CVPRW 2019, "Bag of Tricks and A Strong Baseline for Deep Person
Re-identification"): network, losses, P x K sampler, in-memory data path, training loop.

Public API::

    build_bot(num_classes, backbone, last_stride, pretrained, neck_feat) -> BoT
    load_bot(folder, device) -> (BoT in eval mode, config dict)
    train_bot(BotConfig(...), train_records, out_dir, synthetic_records=()) -> model folder
    load_images(paths, size, cache_dir) -> (N, 3, H, W) uint8
    extract_features(model, images_uint8, batch_size, device, flip) -> (N, D) float32
"""

from reid_aug.bot.data import augment_batch, load_images, normalize
from reid_aug.bot.features import extract_features
from reid_aug.bot.losses import CenterLoss, CrossEntropyLabelSmooth, TripletLoss
from reid_aug.bot.model import BoT, build_bot, load_bot, save_bot
from reid_aug.bot.sampler import RandomIdentitySampler
from reid_aug.bot.train import BotConfig, train_bot

__all__ = [
    "BoT",
    "BotConfig",
    "CenterLoss",
    "CrossEntropyLabelSmooth",
    "RandomIdentitySampler",
    "TripletLoss",
    "augment_batch",
    "build_bot",
    "extract_features",
    "load_bot",
    "load_images",
    "normalize",
    "save_bot",
    "train_bot",
]
