"""Image-quality metrics and the `reid-aug quality` job (reid_aug.quality, DESIGN.md §9)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from skimage.metrics import structural_similarity

from pcdms.encoders import WeightsNotFoundError
from pcdms.pose import read_annotation_csv, read_pairs_csv
from reid_aug.cli import main
from reid_aug.data import toy
from reid_aug.quality import l1, pose_mask, ssim
from reid_aug.quality.fid import add_images, build_fid, compute_fid
from reid_aug.quality.job import (
    QualityError, QualitySettings, prediction_files, read_test_pairs, run_quality,
)
from reid_aug.quality.table import markdown_table
from reid_aug.quality.perceptual import load_lpips, lpips_distances, to_lpips_input

NO_FID = QualitySettings(allow_random_weights=True, fid=())


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    return toy.make_toy_market(tmp_path_factory.mktemp("toy") / "market", num_ids=6, images_per_id=(3, 4), seed=0)


@pytest.fixture(scope="module")
def pairs(market):
    return read_test_pairs(market)


def _image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --------------------------------------------------------------------------- SSIM, L1, mask


def test_ssim_is_scikit_images_with_the_community_settings(pairs):
    for src, tgt in list(zip(pairs.sources, pairs.targets))[:4]:
        p, t = _image(src.path), _image(tgt.path)
        pf, tf = p.astype(np.float64), t.astype(np.float64)
        for sigma in (1.5, 1.2):
            want = structural_similarity(pf, tf, gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
                                         channel_axis=-1, data_range=pf.max() - pf.min())
            assert ssim(p, t, sigma=sigma) == pytest.approx(want, abs=1e-12)
        assert ssim(t, t) == pytest.approx(1.0)
    # The sigma matters (the two columns of the table are different numbers).
    assert ssim(p, t, sigma=1.2) != pytest.approx(ssim(p, t, sigma=1.5), abs=1e-4)


def test_pose_mask_draws_limbs_and_joints_and_skips_missing_ones():
    kp = np.full((18, 2), -1)
    assert not pose_mask(kp, (128, 64)).any()
    kp[1], kp[8] = (32, 20), (32, 80)  # neck, right hip: a vertical limb
    mask = pose_mask(kp, (128, 64))
    assert mask[20:81, 29:36].all()  # the rectangle, half-width 4, around x = 32
    assert not mask[50, :26].any() and not mask[50, 39:].any()
    assert mask[80 + 3, 32] and not mask[80 + 5, 32]  # the hip's disc, radius 4 (skimage: distance < 4)
    lone = np.full((18, 2), -1)
    lone[4] = (10, 10)  # a wrist alone: its disc only (no limb has both ends)
    assert pose_mask(lone, (128, 64)).sum() < 60


def test_masked_l1_ignores_what_the_mask_leaves_out():
    a = np.zeros((8, 4, 3), np.uint8)
    b = a.copy()
    b[:4] = 200
    mask = np.zeros((8, 4), bool)
    mask[4:] = True
    assert l1(a, b) == pytest.approx(100.0)
    assert l1(a, b, mask) == 0.0


# --------------------------------------------------------------------------- LPIPS


def test_lpips_scales_to_minus_one_one_and_is_deterministic(pairs):
    x = np.stack([_image(r.path) for r in pairs.targets[:3]])
    y = np.stack([_image(r.path) for r in pairs.sources[:3]])
    t = to_lpips_input(x)
    assert t.shape == (3, 3, 128, 64) and t.min() >= -1 and t.max() <= 1
    assert to_lpips_input(np.full((1, 2, 2, 3), 255, np.uint8)).eq(1).all()
    assert to_lpips_input(np.zeros((1, 2, 2, 3), np.uint8)).eq(-1).all()
    a, b = load_lpips(None, allow_random_weights=True), load_lpips(None, allow_random_weights=True)
    d = lpips_distances(a, y, x)
    assert np.array_equal(d, lpips_distances(b, y, x))  # same seed, same random backbone
    assert np.allclose(lpips_distances(a, x, x), 0.0, atol=1e-6)
    with torch.no_grad():  # [0, 1] inputs (the PCDMs script's slip) give another number
        unscaled = a(torch.from_numpy(y).permute(0, 3, 1, 2).float() / 255,
                     torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).flatten().numpy()
    assert not np.allclose(d, unscaled, rtol=1e-3)


def test_lpips_backbone_loads_from_a_local_torchvision_file(tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(1)
    state = alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    model = load_lpips(path)
    assert torch.equal(getattr(model.net.slice2, "3").weight, state["features.3.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").bias, state["features.10.bias"])
    with pytest.raises(WeightsNotFoundError, match="alexnet-owt-7be5be79.pth"):
        load_lpips(None)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_lpips(tmp_path / "nothere.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_lpips(junk)
    torch.save({"classifier.1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="missing features"):
        load_lpips(tmp_path / "other.pth")


# --------------------------------------------------------------------------- FID


@pytest.mark.parametrize("variant", ["community", "standard"])
def test_fid_of_a_set_with_itself_is_zero_and_stable_when_singular(variant, one_thread):
    torch.manual_seed(0)
    images = (torch.rand(10, 3, 128, 64) * 255).to(torch.uint8)  # 10 images: rank-9 covariances of 2048 dims
    metric = build_fid(variant, None, allow_random_weights=True)
    add_images(metric, images, real=True)
    add_images(metric, images, real=False)
    same = compute_fid(metric)
    metric.reset()  # the reference is kept
    add_images(metric, torch.flip(images, dims=[2])[:6], real=False)
    other = compute_fid(metric)
    # Random features are large (FIDs in the thousands): "zero" is zero up to float64 rounding of those.
    assert np.isfinite(same) and np.isfinite(other) and abs(same) < 1e-5 * other
    metric.reset()
    add_images(metric, images[:1], real=False)
    with pytest.raises(ValueError, match="at least 2"):
        compute_fid(metric)


def test_fid_reads_local_weight_files_and_names_a_wrong_one(tmp_path, one_thread):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    torch.save(net.state_dict(), tmp_path / "tf.pth")
    metric = build_fid("standard", tmp_path / "tf.pth")
    assert metric.inception.Mixed_7c.branch1x1.conv.weight.equal(net.Mixed_7c.branch1x1.conv.weight)
    with pytest.raises(ValueError, match="inception_v3_google"):  # a TF-Inception file is not torchvision's
        build_fid("community", tmp_path / "tf.pth")
    with pytest.raises(WeightsNotFoundError, match="--fid-tf-weights"):
        build_fid("standard", None)


# --------------------------------------------------------------------------- the job


def _copy_targets_as_predictions(pairs, folder: Path) -> None:
    """A 'perfect generator': each pair's real target, named as synthesize --strategy file names it."""
    from reid_aug.quality.job import pair_ks
    from reid_aug.synthesis import synthetic_name

    folder.mkdir(parents=True)
    for src, tgt, k in zip(pairs.sources, pairs.targets, pair_ks(pairs)):
        Image.open(tgt.path).convert("RGB").save(folder / synthetic_name(src, k, ".png"))


def test_job_scores_every_variant_and_a_perfect_prediction_scores_perfectly(tmp_path, market, pairs):
    _copy_targets_as_predictions(pairs, tmp_path / "perfect")
    record = run_quality(market, tmp_path / "q", {"perfect": tmp_path / "perfect", "copy-source": "copy-source",
                                                  "toy-oracle": "toy-oracle"}, NO_FID, progress=False,
                         log=lambda _m: None)
    n = len(read_pairs_csv(market / "market-pairs-test.csv"))
    assert record["pairs"] == n
    rows = pd.read_csv(tmp_path / "q" / "quality.csv")
    assert len(rows) == 3 * n and list(rows["variant"].unique()) == ["perfect", "copy-source", "toy-oracle"]
    perfect, copy, oracle = (record["variants"][v] for v in ("perfect", "copy-source", "toy-oracle"))
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["l1"] == 0 and perfect["lpips"] == pytest.approx(0, abs=1e-6)
    # The oracle draws the target person exactly: the person (masked) error is far below copying the source.
    assert oracle["masked_l1"] < copy["masked_l1"]
    saved = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert saved["random_weights"] == ["lpips"] and "fid_community" not in saved["variants"]["perfect"]
    assert "LPIPS *" in (tmp_path / "q" / "quality.md").read_text()
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["step"] == "quality"


def test_predictions_are_found_by_mapping_or_name_and_missing_ones_are_named(tmp_path, pairs):
    folder = tmp_path / "gen"
    _copy_targets_as_predictions(pairs, folder)
    by_name = prediction_files(folder, pairs)
    assert all(f.is_file() for f in by_name)
    # A mapping csv wins over the names.
    shuffled = [f.name for f in by_name][::-1]
    pd.DataFrame({"from": [r.name for r in pairs.sources], "to": [r.name for r in pairs.targets],
                  "file": shuffled}).to_csv(tmp_path / "map.csv", index=False)
    assert [f.name for f in prediction_files(folder, pairs, tmp_path / "map.csv")] == shuffled
    by_name[0].unlink()
    with pytest.raises(QualityError, match=f"1 of {len(by_name)} predicted images are missing .*{by_name[0].name}"):
        prediction_files(folder, pairs)


def test_a_prediction_of_another_size_is_refused(tmp_path, market, pairs):
    folder = tmp_path / "gen"
    _copy_targets_as_predictions(pairs, folder)
    first = prediction_files(folder, pairs)[0]
    Image.open(first).resize((32, 64)).save(first)
    with pytest.raises(QualityError, match=f"{first.name}: 64x32 image, but its target is 128x64"):
        run_quality(market, tmp_path / "q", {"gen": folder}, NO_FID, progress=False, log=lambda _m: None)


def test_pairs_with_unknown_images_are_refused(tmp_path, market):
    bad = tmp_path / "pairs.csv"
    bad.write_text("from,to\n0001_c1s1_000001_00.jpg,9999_c1s1_000001_00.jpg\n")
    with pytest.raises(QualityError, match="pairs.csv: 2 image\\(s\\) are not in"):
        read_test_pairs(market, bad)


def test_generate_runs_each_stage_setting_resumes_and_refuses_other_settings(tmp_path, market, tiny_pipeline,
                                                                            one_thread):
    args = ["quality", "--data", str(market), "--generate", str(tiny_pipeline), "--stages", "B1,full",
            "--steps", "2", "--refine-strength", "0.5", "--batch-size", "4", "--max-pairs", "5",
            "--baseline", "copy-source",
            "--allow-random-weights", "--fid", "none", "--device", "cpu", "--out", str(tmp_path / "q")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "| B1 (inpaint only) | 5 |" in res.output and "| copy-source | 5 |" in res.output
    assert "2 steps, guidance 2.0, refine strength 0.5, seed 0" in res.output  # the generation line, as in quality.md
    b1_config = json.loads((tmp_path / "q" / "generated" / "B1" / "manifest.json").read_text())["config"]
    assert b1_config["refine_strength"] == 1.0  # no refining stage: the strength asked does not split its job
    gen = tmp_path / "q" / "generated"
    made = {st: sorted(p.name for p in (gen / st).glob("*.png")) for st in ("B1", "full")}
    assert len(made["B1"]) == 5 and made["B1"] == made["full"]
    b1 = _image(gen / "B1" / made["B1"][0])
    assert not np.array_equal(b1, _image(gen / "full" / made["full"][0]))
    # A killed run: one image gone; the rerun makes exactly that one again, bit-identical.
    lost = gen / "full" / made["full"][2]
    before = lost.read_bytes()
    lost.unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in (gen / "B1").glob("*.png")}
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "generating 1 of 5 images (full)" in res.output and "(B1)" not in res.output
    assert lost.read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in (gen / "B1").glob("*.png")} == mtimes
    other = [a if a != "2" else "3" for a in args]  # --steps 3
    res = CliRunner().invoke(main, other)
    assert res.exit_code == 1 and "another generation job (num_inference_steps: 2 -> 3)" in res.output


def test_quality_cli_errors_are_one_line(tmp_path, market):
    res = CliRunner().invoke(main, ["quality", "--data", str(market), "--generated", str(tmp_path / "none"),
                                    "--fid", "none", "--allow-random-weights", "--out", str(tmp_path / "q")])
    assert res.exit_code == 1 and "generated-image folder not found" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["quality", "--data", str(market), "--baseline", "copy-source", "--fid", "none",
                                    "--out", str(tmp_path / "q")])
    assert res.exit_code == 1 and "alexnet-owt-7be5be79.pth" in res.output


def test_markdown_table_marks_random_columns_and_names_stages():
    table = markdown_table({"B2": {"pairs": 3, "ssim": 0.5, "lpips": 0.2, "masked_lpips": 0.1, "fid_community": 12.5}},
                           ["lpips", "fid_community"])
    assert "| B2 (prior + inpaint) | 3 |" in table
    assert "LPIPS *" in table and "masked LPIPS *" in table and "FID (community) *" in table and "SSIM |" in table


def test_report_shows_table1_and_the_stage_ablation_beside_the_published_rows(tmp_path):
    from reid_aug.report import make_report

    q = tmp_path / "ws" / "quality"
    q.mkdir(parents=True)
    row = {"pairs": 4, "ssim": 0.4, "ssim_sigma1.2": 0.42, "lpips": 0.2, "masked_lpips": 0.05, "l1": 50.0,
           "masked_l1": 40.0, "fid_community": 30.0}
    variants = {st: dict(row, ssim=0.3 + 0.01 * i) for i, st in enumerate(("B1", "B2", "B3", "full"))}
    variants["copy-source"] = dict(row, ssim=0.25)
    (q / "quality.json").write_text(json.dumps({"variants": variants, "pairs": 4, "image_size": [128, 64],
                                                "random_weights": ["lpips", "fid_community"]}))
    text = make_report(tmp_path / "ws")["markdown"].read_text()
    table1 = text[text.index("Table-1 layout"):text.index("Stage ablation")]
    assert "| full (prior + inpaint + refine) | 4 | 0.3300" in table1 and "| copy-source | 4 | 0.2500" in table1
    assert "B1 (" not in table1
    ablation = text[text.index("Stage ablation"):text.index("Published image quality")]
    assert all(f"| {st} (" in ablation for st in ("B1", "B2", "B3", "full")) and "LPIPS *" in ablation
    assert "| PCDMs | 0.3169 | 0.2238 | 13.897 |" in text[text.index("Published image quality"):]


def test_quality_refuses_another_steps_folder_and_missing_weights_before_generating(tmp_path, market, tiny_pipeline):
    before = (market / "manifest.json").read_bytes()
    res = CliRunner().invoke(main, ["quality", "--data", str(market), "--baseline", "copy-source", "--fid", "none",
                                    "--allow-random-weights", "--out", str(market)])
    assert res.exit_code == 1 and "holds the output of 'make-toy-market'" in res.output
    assert (market / "manifest.json").read_bytes() == before
    res = CliRunner().invoke(main, ["quality", "--data", str(market), "--generate", str(tiny_pipeline), "--steps", "1",
                                    "--fid", "none", "--out", str(tmp_path / "q")])  # no LPIPS weights
    assert res.exit_code == 1 and "alexnet-owt-7be5be79.pth" in res.output and "generating" not in res.output
    assert not (tmp_path / "q").exists()


def test_a_pair_gets_the_same_sample_whichever_pairs_are_scored(tmp_path, market, pairs):
    from reid_aug.quality.job import _pair_items

    every = {(it.source.name, it.target): it.seed for it in _pair_items(pairs, 0)}
    names = [s.name for s in pairs.sources]
    src = next(n for n in names if names.count(n) > 1)
    second = [t.name for s, t in zip(pairs.sources, pairs.targets) if s.name == src][1]
    (tmp_path / "one.csv").write_text(f"from,to\n{src},{second}\n")  # its 2nd pair alone: k 0 here, 1 there
    (item,) = _pair_items(read_test_pairs(market, tmp_path / "one.csv"), 0)
    assert item.seed == every[(src, second)]
