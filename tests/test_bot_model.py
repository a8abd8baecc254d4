"""BoT network, losses, sampler, data path and feature extraction (tiny, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from reid_aug.bot import data as bot_data
from reid_aug.bot.data import IMAGENET_MEAN, augment_batch, load_images, normalize
from reid_aug.bot.features import extract_features
from reid_aug.bot.losses import CenterLoss, CrossEntropyLabelSmooth, TripletLoss
from reid_aug.bot.model import build_bot, load_bot, save_bot
from reid_aug.bot.sampler import RandomIdentitySampler, mixed_epoch_batches


def test_resnet50_751_parameter_count():
    with torch.device("meta"):
        model = build_bot(751)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.backbone) == 23_508_032
    assert count(model.bottleneck) == 2 * 2048
    assert count(model.classifier) == 751 * 2048
    assert count(model) == 25_050_176


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_last_stride_one_doubles_the_final_map(backbone):
    with torch.device("meta"):
        x = torch.empty(1, 3, 256, 128)
        assert build_bot(5, backbone, last_stride=1).backbone(x).shape[-2:] == (16, 8)
        assert build_bot(5, backbone, last_stride=2).backbone(x).shape[-2:] == (8, 4)


def test_train_and_eval_outputs_and_bnneck():
    torch.manual_seed(0)
    model = build_bot(7, "resnet18")
    x = torch.randn(4, 3, 64, 32)
    logits, global_feat = model.train()(x)
    assert logits.shape == (4, 7) and global_feat.shape == (4, 512)
    assert model.classifier.bias is None
    assert 0.0005 < model.classifier.weight.std().item() < 0.002
    bn = model.bottleneck
    assert not bn.bias.requires_grad and torch.all(bn.bias == 0)
    model.eval()
    feat = model(x)
    with torch.no_grad():
        pooled = model.pool(model.backbone(x)).flatten(1)
    torch.testing.assert_close(feat, bn(pooled))  # eval feature is after the BNNeck
    before = build_bot(7, "resnet18", neck_feat="before")
    before.load_state_dict(model.state_dict())
    torch.testing.assert_close(before.eval()(x), pooled)


def test_bn_bias_stays_zero_under_training():
    torch.manual_seed(0)
    model = build_bot(3, "resnet18").train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=5e-4)
    logits, _ = model(torch.randn(4, 3, 32, 16))
    logits.sum().backward()
    opt.step()
    assert torch.all(model.bottleneck.bias == 0)
    assert all(p is not model.bottleneck.bias for g in opt.param_groups for p in g["params"])


def test_pretrained_loads_local_torchvision_weights(tmp_path):
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    model = build_bot(3, "resnet18", pretrained=path)
    torch.testing.assert_close(model.backbone.layer3[1].conv2.weight, net.layer3[1].conv2.weight)
    with pytest.raises(ValueError, match="not torchvision resnet50 weights"):
        build_bot(3, "resnet50", pretrained=path)


def test_pretrained_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "resnet50-0676ba61.pth"
    with pytest.raises(FileNotFoundError) as info:
        build_bot(3, "resnet50", pretrained=missing)
    msg = str(info.value)
    assert str(missing) in msg and "download.pytorch.org/models/resnet50-0676ba61.pth" in msg


def test_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = build_bot(4, "resnet18").eval()
    save_bot(tmp_path / "m", model, {"pids": [2, 5, 9, 11], "image_size": [32, 16]})
    loaded, config = load_bot(tmp_path / "m")
    assert config["pids"] == [2, 5, 9, 11] and config["num_classes"] == 4 and config["backbone"] == "resnet18"
    x = torch.randn(2, 3, 32, 16)
    torch.testing.assert_close(loaded(x), model(x))
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_bot(tmp_path / "m")


def test_label_smoothed_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.5]])
    targets = torch.tensor([0, 2])
    loss = CrossEntropyLabelSmooth(3, epsilon=0.1)(logits, targets)
    expected = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        q = [0.1 / 3 + (0.9 if c == t else 0.0) for c in range(3)]
        expected += -sum(qc * (v - log_z) for qc, v in zip(q, row))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)
    plain = CrossEntropyLabelSmooth(3, epsilon=0.0)(logits, targets)
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)


def test_batch_hard_triplet_by_hand():
    # 1-D points: anchors' hardest positive / closest negative worked out by hand.
    feats = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    loss = TripletLoss(margin=0.3)(feats, labels)
    # anchor 0: 3 - 1 + .3; anchor 1: 3 - 2 + .3; anchor 2: 9 - 1 + .3; anchor 3: 9 - 7 + .3
    assert loss.item() == pytest.approx((2.3 + 1.3 + 8.3 + 2.3) / 4, rel=1e-5)
    easy = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.1, 0.0]])
    assert TripletLoss(0.3)(easy, labels).item() == 0.0


def test_center_loss_by_hand():
    loss_fn = CenterLoss(num_classes=2, feat_dim=2)
    with torch.no_grad():
        loss_fn.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    feats = torch.tensor([[3.0, 4.0], [1.0, 2.0]])
    assert loss_fn(feats, torch.tensor([0, 1])).item() == pytest.approx((25.0 + 1.0) / 2)


def _pid_list(counts):
    return [pid for pid, n in counts.items() for _ in range(n)]


def test_identity_sampler_p_by_k_and_deterministic():
    pids = _pid_list({10: 5, 11: 4, 12: 2, 13: 8, 14: 1, 15: 4})
    sampler = RandomIdentitySampler(pids, batch_size=8, num_instances=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) >= 2
    for batch in batches:
        assert len(batch) == 8
        chunk_pids = [{pids[i] for i in batch[j : j + 4]} for j in (0, 4)]
        assert all(len(s) == 1 for s in chunk_pids) and chunk_pids[0] != chunk_pids[1]
    # 12 (2 images) and 14 (1 image) are topped up with replacement to K = 4.
    for batch in batches:
        for j in (0, 4):
            if pids[batch[j]] == 14:
                assert len(set(batch[j : j + 4])) == 1
    again = RandomIdentitySampler(pids, batch_size=8, num_instances=4, seed=3)
    assert list(again) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    other_seed = RandomIdentitySampler(pids, batch_size=8, num_instances=4, seed=4)
    assert list(other_seed) != batches


def test_identity_sampler_rank_slices_cover_the_global_batch():
    pids = _pid_list({i: 6 for i in range(8)})
    full = RandomIdentitySampler(pids, 16, 4, seed=0)
    ranks = [list(RandomIdentitySampler(pids, 16, 4, seed=0, rank=r, world_size=2)) for r in range(2)]
    for g, a, b in zip(full, *ranks):
        assert a + b == g and len(a) == 8
        assert len({pids[i] for i in a}) == 2  # whole identities per rank
    with pytest.raises(ValueError, match="multiple"):
        RandomIdentitySampler(pids, 12, 4, world_size=2)
    with pytest.raises(ValueError, match="at least 5 identities"):
        RandomIdentitySampler(_pid_list({1: 4, 2: 4}), 20, 4)


def test_mixed_batches_take_a_fixed_share_from_the_synthetic_pool():
    real = RandomIdentitySampler(_pid_list({i: 8 for i in range(6)}), 12, 4, seed=0)
    syn = RandomIdentitySampler(_pid_list({i: 1 for i in range(3)}), 4, 4, seed=0, stream=1)
    batches = mixed_epoch_batches(real, syn, epoch=0, synthetic_offset=48)
    assert len(batches) == len(real.global_batches(0))  # real images set the epoch length
    for batch in batches:
        assert len(batch) == 16
        assert all(i < 48 for i in batch[:12]) and all(i >= 48 for i in batch[12:])
    assert mixed_epoch_batches(real, syn, 0, 48) == batches


def test_augment_shapes_ranges_and_determinism():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 16), dtype=torch.uint8, generator=g)
    out1 = augment_batch(images, torch.Generator().manual_seed(5))
    out2 = augment_batch(images, torch.Generator().manual_seed(5))
    out3 = augment_batch(images, torch.Generator().manual_seed(6))
    assert out1.shape == (6, 3, 32, 16) and out1.dtype == torch.float32
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    lo = (0 - max(IMAGENET_MEAN)) / 0.225
    hi = (1 - min(IMAGENET_MEAN)) / 0.224
    assert out1.min() >= lo - 1e-5 and out1.max() <= hi + 1e-5


def test_augment_components():
    images = torch.randint(0, 256, (4, 3, 32, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    flipped = augment_batch(images, g, flip_prob=1.0, padding=0, erase_prob=0.0)
    torch.testing.assert_close(flipped, normalize(images.flip(-1)))
    # Pad + crop: every output is a shifted copy of its input, zero (black) where it left the image.
    shifted = augment_batch(images, torch.Generator().manual_seed(2), flip_prob=0.0, padding=3, erase_prob=0.0)
    black = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))
    ref = normalize(images)
    for b in range(4):
        matches = []
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                canvas = black.expand(1, 3, 32 + 6, 16 + 6).clone()
                canvas[..., 3:35, 3:19] = ref[b : b + 1]
                matches.append(torch.equal(canvas[..., 3 + dy : 35 + dy, 3 + dx : 19 + dx], shifted[b : b + 1]))
        assert any(matches)
    # Erasing with p = 1: one box of the fill values, 2-40 % of the image.
    erased = augment_batch(images, torch.Generator().manual_seed(3), flip_prob=0.0, padding=0, erase_prob=1.0)
    fill = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    box = (erased == fill).all(1)  # (B, H, W)
    for b in range(4):
        area = box[b].sum().item()
        assert 0.02 * 512 * 0.5 <= area <= 0.4 * 512 * 1.1
        rows, cols = box[b].nonzero(as_tuple=True)
        assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a rectangle
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(images.float(), g)


def _write_images(folder, n, size=(40, 20)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i + 1:04d}_c1s1_000001_01.jpg"
        Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_load_images_resizes_and_caches(tmp_path, monkeypatch):
    paths = _write_images(tmp_path / "imgs", 3)
    images = load_images(paths, (32, 16), cache_dir=tmp_path / "cache", num_workers=2, progress=False)
    assert images.shape == (3, 3, 32, 16) and images.dtype == torch.uint8
    assert len(list((tmp_path / "cache").glob("images-*-32x16.npy"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(bot_data, "_decode", no_decoding)
    assert torch.equal(load_images(paths, (32, 16), cache_dir=tmp_path / "cache", progress=False), images)
    with pytest.raises(AssertionError):  # another size is another cache entry
        load_images(paths, (64, 32), cache_dir=tmp_path / "cache", progress=False)


def test_load_images_names_a_bad_file(tmp_path):
    bad = tmp_path / "0001_c1s1_000001_01.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=str(bad)):
        load_images([bad], (32, 16), progress=False)


def test_extract_features_matches_eval_forward():
    torch.manual_seed(0)
    model = build_bot(3, "resnet18").train()
    images = torch.randint(0, 256, (5, 3, 32, 16), dtype=torch.uint8)
    feats = extract_features(model, images, batch_size=2)
    assert feats.shape == (5, 512) and feats.dtype == torch.float32
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(feats, model(normalize(images)), rtol=1e-4, atol=1e-5)
        flipped = extract_features(model, images, batch_size=5, flip=True)
        expected = (model(normalize(images)) + model(normalize(images.flip(-1)))) / 2
    torch.testing.assert_close(flipped, expected, rtol=1e-4, atol=1e-5)
