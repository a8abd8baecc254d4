"""BoT training loop: schedule, exact resume, synthetic identities, the train-bot command (tiny, CPU)."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from reid_aug.bot import train as bot_train
from reid_aug.bot.features import extract_features
from reid_aug.bot.data import load_images
from reid_aug.bot.model import load_bot
from reid_aug.bot.train import BotConfig, lr_factor, train_bot
from reid_aug.cli import main
from reid_aug.data.market import read_image_folder, read_market
from reid_aug.data.subset import make_subset, write_subset_csv

REPO = Path(__file__).resolve().parents[1]
TINY = BotConfig(
    backbone="resnet18",
    image_size=(32, 16),
    epochs=4,
    batch_size=8,
    num_instances=4,
    warmup_epochs=2,
    milestones=(3,),
    padding=2,
    num_workers=1,
    log_every=1,
)


def _person(pid: int, rng: np.random.Generator) -> np.ndarray:
    """A 32x16 'person': a colour per identity over noise, so identities are learnable."""
    base = np.random.default_rng(pid).integers(0, 256, 3)
    img = np.clip(base + rng.normal(0, 25, (32, 16, 3)), 0, 255).astype(np.uint8)
    return img


def _write(folder: Path, pid: int, cam: int, frame: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_person(pid, rng)).save(folder / f"{pid:04d}_c{cam}s1_{frame:06d}_01.jpg")


@pytest.fixture()
def market(tmp_path: Path) -> Path:
    """Tiny Market layout: 4 train ids x 4 images; query 2, gallery 4 (2 test ids)."""
    root = tmp_path / "market"
    rng = np.random.default_rng(0)
    for pid in (1, 3, 5, 7):
        for k in range(4):
            _write(root / "bounding_box_train", pid, 1 + k % 2, 100 + k, rng)
    for pid in (2, 4):
        _write(root / "query", pid, 1, 1, rng)
        _write(root / "bounding_box_test", pid, 2, 2, rng)
        _write(root / "bounding_box_test", pid, 3, 3, rng)
    return root


def test_lr_schedule_follows_the_reference_code():
    cfg = BotConfig()
    assert lr_factor(0, cfg) == pytest.approx(0.01 * 0.9 + 0.1)  # epoch 1 = 0.109 x
    assert lr_factor(8, cfg) == pytest.approx(0.01 * 0.1 + 0.9)
    assert [lr_factor(e, cfg) for e in (9, 38)] == [1.0, 1.0]
    assert lr_factor(39, cfg) == pytest.approx(0.1)  # x0.1 from the 40th epoch
    assert lr_factor(68, cfg) == pytest.approx(0.1)
    assert lr_factor(69, cfg) == pytest.approx(0.01)
    assert lr_factor(119, cfg) == pytest.approx(0.01)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_instances"):
        BotConfig(batch_size=30)
    with pytest.raises(ValueError, match="synthetic_share"):
        BotConfig(synthetic_share=0.01)
    with pytest.raises(ValueError, match="backbone"):
        BotConfig(backbone="vit")


class _Killed(Exception):
    pass


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def _log(out: Path, name: str = "log.csv") -> list[dict[str, str]]:
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_after_a_kill_is_bit_exact(market, tmp_path, monkeypatch, capsys):
    records = list(read_market(market).train)
    straight = train_bot(TINY, records, tmp_path / "a", device="cpu", progress=False)

    calls = {"n": 0}
    real_augment = bot_train.augment_batch

    def killed_in_epoch_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # 2 batches per epoch: the 2nd batch of epoch 3
            raise _Killed
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(bot_train, "augment_batch", killed_in_epoch_3)
    with pytest.raises(_Killed):
        train_bot(TINY, records, tmp_path / "b", device="cpu", progress=False)
    monkeypatch.setattr(bot_train, "augment_batch", real_augment)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert [r["epoch"] for r in _log(tmp_path / "b")] == ["1", "2"]
    capsys.readouterr()
    resumed = train_bot(TINY, records, tmp_path / "b", device="cpu", progress=True)
    said = capsys.readouterr()
    assert "resuming from epoch 3 of 4 (epochs 1-2 done" in said.out + said.err

    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["epoch"] for r in log_b] == ["1", "2", "3", "4"]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    # The per-iteration log: one row per optimizer step, none lost or repeated by the kill and resume.
    iters_a, iters_b = (_log(d, bot_train.ITER_LOG_NAME) for d in (tmp_path / "a", tmp_path / "b"))
    assert iters_a == iters_b and [int(r["iteration"]) for r in iters_a] == list(range(1, 9))
    assert iters_a[-1]["epoch"] == "4" and float(iters_a[-1]["loss"]) > 0
    assert [float(r["lr"]) for r in log_a] == pytest.approx([3.5e-4 * f for f in (0.505, 1.0, 0.1, 0.1)])
    assert straight == tmp_path / "a" / "model" and resumed == tmp_path / "b" / "model"

    # A finished run is not redone; a different config on the same folder is refused.
    monkeypatch.setattr(bot_train, "build_bot", lambda *a, **k: pytest.fail("retrained a finished run"))
    said = []
    assert train_bot(TINY, records, tmp_path / "a", device="cpu", progress=False, log=said.append) == straight
    assert len(said) == 1 and "already trained (4 epochs" in said[0]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="another config"):
        train_bot(dataclasses.replace(TINY, lr=1e-3), records, tmp_path / "a", device="cpu", progress=False)


def test_trained_model_has_manifest_and_loads(market, tmp_path):
    records = list(read_market(market).train)
    cfg = dataclasses.replace(TINY, epochs=1, center_loss_weight=0.0, keep_checkpoint=False)
    model_dir = train_bot(cfg, records, tmp_path / "run", device="cpu", progress=False, sources={"data": market})
    model, config = load_bot(model_dir)
    assert config["pids"] == [1, 3, 5, 7] and config["image_size"] == [32, 16] and config["num_classes"] == 4
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["step"] == "train-bot" and manifest["seed"] == 0
    assert manifest["sources"]["data"] == str(market) and manifest["num_real_images"] == 16
    cpu_amp = bot_train.autocast_dtype(torch.device("cpu"))  # cfg.amp is on: bf16 where the CPU has it
    assert manifest["autocast_dtype"] == ("bfloat16" if cpu_amp is not None else "float32")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    feats = extract_features(model, load_images([r.path for r in records], (32, 16), progress=False))
    assert feats.shape == (16, 512) and torch.isfinite(feats).all()


def test_cpu_autocast_only_with_native_bf16(monkeypatch):
    for avx512_bf16, amx, expected in ((True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, None)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert bot_train.autocast_dtype(torch.device("cpu")) is expected


def test_synthetic_identity_outside_the_training_set_is_rejected(market, tmp_path):
    records = list(read_market(market).train)
    rng = np.random.default_rng(1)
    _write(tmp_path / "syn", 3, 1, 900, rng)
    _write(tmp_path / "syn", 2, 1, 901, rng)  # pid 2 is a query/gallery identity
    synthetic = read_image_folder(tmp_path / "syn", relabel=False, keep_distractors=False)
    with pytest.raises(ValueError, match="person id 2 is not among the 4 real training identities"):
        train_bot(TINY, records, tmp_path / "run", synthetic_records=synthetic, device="cpu", progress=False)
    assert not (tmp_path / "run").exists()


def test_train_bot_command_one_epoch(market, tmp_path):
    rng = np.random.default_rng(2)
    for pid in (1, 3, 5, 7):
        for k in range(2):
            _write(tmp_path / "syn", pid, 3, 500 + k, rng)
    subset = tmp_path / "subset.csv"
    write_subset_csv(subset, make_subset(read_market(market).train, 0.5, seed=0))
    out = tmp_path / "run"
    args = [
        "train-bot", "--config", str(REPO / "configs" / "bot_toy.yaml"), "--data", str(market),
        "--subset", str(subset),
        "--synthetic", str(tmp_path / "syn"), "--out", str(out), "--epochs", "1", "--batch-size", "8",
        "--image-size", "32x16", "--pretrained", "none", "--synthetic-share", "0.5", "--device", "cpu",
        "--cache-dir", str(tmp_path / "cache"),
    ]
    dry = CliRunner().invoke(main, args + ["--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert not out.exists()  # nothing trained or written
    assert "backbone: resnet18" in dry.output and "synthetic_share: 0.5" in dry.output
    planned = re.search(r"# plan: 8 real images / 4 ids \+ 8 synthetic; (\d+) iterations per epoch of 8 images",
                        dry.output)
    assert planned, dry.output

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "model in" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["backbone"] == "resnet18" and manifest["config"]["synthetic_share"] == 0.5
    assert manifest["num_synthetic_images"] == 8 and manifest["sources"]["synthetic_0"] == str(tmp_path / "syn")
    assert manifest["num_real_images"] == 8 and manifest["sources"]["subset"] == str(subset)
    assert len(_log(out)) == 1
    assert _log(out)[0]["iteration"] == planned.group(1)  # the plan is what training then did
    assert list((tmp_path / "cache").glob("*.npy"))
    _, config = load_bot(out / "model")
    assert config["image_size"] == [32, 16]

    bad = CliRunner().invoke(main, ["train-bot", "--data", str(market), "--out", str(tmp_path / "x"),
                                    "--pretrained", str(tmp_path / "resnet50-0676ba61.pth"), "--device", "cpu"])
    assert bad.exit_code != 0 and "resnet50-0676ba61.pth" in bad.output


def test_epoch_steps_real_gives_augmented_runs_the_standard_step_count(market, tmp_path, one_thread):
    """Pooled synthetic images lengthen an epoch; epoch_steps "real" keeps the real subset's batches per epoch."""
    records = list(read_market(market).train)
    rng = np.random.default_rng(3)
    for pid in (1, 3, 5, 7):
        for k in range(8):
            _write(tmp_path / "syn", pid, 2, 700 + k, rng)
    synthetic = read_image_folder(tmp_path / "syn", relabel=False, keep_distractors=False)
    cfg = dataclasses.replace(TINY, epochs=1)
    iterations = {}
    for name, syn, steps in (("standard", [], "all"), ("all", synthetic, "all"), ("real", synthetic, "real")):
        out = tmp_path / name
        train_bot(dataclasses.replace(cfg, epoch_steps=steps), records, out, synthetic_records=syn, device="cpu",
                  progress=False)
        iterations[name] = int(_log(out)[-1]["iteration"])
    assert iterations["all"] > iterations["standard"] == iterations["real"] > 0
    with pytest.raises(ValueError, match="epoch_steps"):
        BotConfig(epoch_steps="some")


class _TinyBot(torch.nn.Module):
    """A linear 'backbone' and classifier returning ``(logits, feat)`` like the BoT model."""

    def __init__(self):
        super().__init__()
        self.backbone, self.classifier = torch.nn.Linear(12, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        feat = self.backbone(x)
        return self.classifier(feat), feat


def _bot_losses_and_grads(images: torch.Tensor, labels: torch.Tensor, ddp: bool):
    """BoT's three losses combined as the training loop combines them; the losses and all gradients."""
    from reid_aug.bot.losses import CenterLoss, CrossEntropyLabelSmooth, TripletLoss, gather_batch

    torch.manual_seed(0)
    model, center = _TinyBot(), CenterLoss(3, 6)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    logits, feat = net(images)
    feat_all, y_all = gather_batch(feat, labels)
    loss_id = CrossEntropyLabelSmooth(3)(logits, labels)
    loss_tri, loss_center = TripletLoss(0.3)(feat_all, y_all), center(feat_all, y_all)
    (loss_id + loss_tri + 5e-4 * loss_center).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["centers"] = center.centers.grad.clone()
    return [loss_tri.item(), loss_center.item()], grads


def _bot_ddp_worker(rank: int, world: int, pg_file: str, feats, labels, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=world)
    try:
        per_rank = len(labels) // world
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        losses, grads = _bot_losses_and_grads(feats[part], labels[part], ddp=True)
        torch.save({"losses": losses, "grads": grads}, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_mine_triplets_over_the_global_batch(tmp_path):
    """Global batch 8 with K = 4 on 2 ranks: each rank holds one identity (no negatives of its own).

    With the features gathered across ranks, the triplet and center losses and every gradient (backbone,
    classifier, centers) after DDP's averaging equal one process's on the whole batch.
    """
    feats = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2])
    one_losses, one_grads = _bot_losses_and_grads(feats, labels, ddp=False)
    out = str(tmp_path / "ddp")
    torch.multiprocessing.spawn(_bot_ddp_worker, args=(2, str(tmp_path / "pg"), feats, labels, out), nprocs=2,
                                join=True)
    for rank in (0, 1):
        two = torch.load(f"{out}.rank{rank}", weights_only=True)
        assert two["losses"] == pytest.approx(one_losses, rel=1e-5)
        assert one_losses[0] > 0  # there are negatives to mine: a per-rank triplet would see none
        for name, grad in one_grads.items():
            torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _train_bot_ddp_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cfg = dataclasses.replace(TINY, epochs=1, amp=False, num_workers=0, keep_checkpoint=False)
    train_bot(cfg, list(read_market(Path(root)).train), Path(out), device="cpu", progress=False)


def test_train_bot_under_two_gloo_processes(market, tmp_path):
    """The loop under DDP (as torchrun starts it): batch 8, K 4, so each rank holds a single identity;
    the gathered triplet loss still has negatives, and rank 0 writes the model."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_train_bot_ddp_worker, args=(2, port, str(market), str(tmp_path / "run")),
                                nprocs=2, join=True)
    (row,) = _log(tmp_path / "run")
    assert float(row["loss_triplet"]) > 0.0
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["world_size"] == 2
    load_bot(tmp_path / "run" / "model")


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_events_survive_a_kill_without_duplicates(market, tmp_path, monkeypatch):
    """Killed while saving epoch 3's checkpoint (after that epoch's events were written): the resumed run's
    events equal an uninterrupted run's, one value per iteration (the interrupted epoch's are purged)."""
    pytest.importorskip("tensorboard")  # the test extra installs it; the package itself does not need it
    records = list(read_market(market).train)
    train_bot(TINY, records, tmp_path / "a", device="cpu", progress=False, tensorboard=True)
    real_rng_state, calls = bot_train._rng_state, {"n": 0}

    def killed_at_checkpoint_3():
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Killed
        return real_rng_state()

    monkeypatch.setattr(bot_train, "_rng_state", killed_at_checkpoint_3)
    with pytest.raises(_Killed):
        train_bot(TINY, records, tmp_path / "b", device="cpu", progress=False, tensorboard=True)
    assert [s for s, _ in _scalars(tmp_path / "b", "train/loss")] == list(range(1, 7))  # epoch 3 was written
    monkeypatch.setattr(bot_train, "_rng_state", real_rng_state)
    # TensorBoard reads a folder's event files in name order, and names start with the creation second
    # and end with a per-process counter: a resume in the same second of the same (test) process could
    # sort before the run it resumes. A real resume is a new process, later.
    import time

    time.sleep(1.1)
    train_bot(TINY, records, tmp_path / "b", device="cpu", progress=False, tensorboard=True)
    a, b = _scalars(tmp_path / "a", "train/loss"), _scalars(tmp_path / "b", "train/loss")
    assert [s for s, _ in b] == list(range(1, 9)) and a == b
    assert [v for _, v in b] == pytest.approx([float(r["loss"]) for r in _log(tmp_path / "b", "log_iterations.csv")])
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["tensorboard"] is True
    train_bot(dataclasses.replace(TINY, epochs=1), records, tmp_path / "c", device="cpu", progress=False,
              tensorboard=False)
    assert not (tmp_path / "c" / "tensorboard").exists()
