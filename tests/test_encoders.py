"""Frozen encoders (pcdms.encoders): shapes, preprocessing, loading from local paths, offline errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pcdms.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipImageEncoder,
    DinoEncoder,
    VaeCodec,
    WeightsNotFoundError,
    build_encoders,
    check_images,
    clip_config,
    clip_preprocess,
    dino_config,
    dino_input_size,
    dino_preprocess,
    dino_token_shape,
    encoder_param_counts,
    vae_config,
)
from pcdms.presets import get_preset

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return build_encoders(TINY, allow_random=True)


def test_output_shapes(encoders):
    images = torch.rand(3, 3, 128, 64, generator=torch.Generator().manual_seed(0))
    assert encoders.clip(images).shape == (3, TINY.clip_embed_dim)
    # Tiny DINOv2 is fed 56x28 -> 4x2 patches + CLS.
    assert encoders.dino(images).shape == (3, 1 + 8, TINY.dino_dim) == (3, *dino_token_shape(TINY))
    # Read off the config alone (benchmarks fake the cache with it): DINOv2-G at 224x112 px -> 16x8 patches.
    assert dino_token_shape(get_preset("paper")) == (1 + 16 * 8, 1536)
    latents = encoders.vae.encode(images)
    assert latents.shape == (3, TINY.latent_channels, 16, 8)
    decoded = encoders.vae.decode(latents)
    assert decoded.shape == (3, 3, 128, 64)
    assert decoded.min() >= 0 and decoded.max() <= 1


def test_vae_mean_is_deterministic_and_sampling_uses_generator(encoders):
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    assert torch.equal(encoders.vae.encode(images), encoders.vae.encode(images))
    a = encoders.vae.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
    b = encoders.vae.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
    c = encoders.vae.encode(images, sample=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_encoders_are_frozen(encoders):
    assert not any(p.requires_grad for p in encoders.parameters())
    encoders.train()
    assert not any(m.training for m in encoders.modules())


def test_clip_preprocess_pads_with_mean_and_normalises():
    images = torch.ones(2, 3, 128, 64)
    out = clip_preprocess(images, 56)
    assert out.shape == (2, 3, 56, 56)
    # Left/right padding is the CLIP mean colour -> exactly 0 after normalisation.
    assert torch.allclose(out[..., :, :4], torch.zeros(1), atol=1e-6)
    assert torch.allclose(out[..., :, -4:], torch.zeros(1), atol=1e-6)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[0, :, 28, 28], white, atol=1e-4)


def test_dino_preprocess_keeps_aspect_ratio():
    assert dino_input_size(128, 64, 224, 14) == (224, 112)
    assert dino_input_size(128, 128, 224, 14) == (224, 224)
    images = torch.full((1, 3, 128, 64), 0.5)
    out = dino_preprocess(images, 224, 14)
    assert out.shape == (1, 3, 224, 112)
    want = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[0, :, 100, 50], want, atol=1e-4)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(2, 1, 8, 8), r"\(B, 3, H, W\)"),
        (torch.rand(3, 8, 8), r"\(B, 3, H, W\)"),
        (torch.full((1, 3, 8, 8), 255.0), r"\[0, 1\]"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating point"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
    ],
)
def test_check_images_rejects_bad_batches(images, message):
    with pytest.raises(ValueError, match=message):
        check_images(images)


def test_random_weights_need_explicit_permission():
    with pytest.raises(WeightsNotFoundError, match="open_clip_pytorch_model.bin.*laion/CLIP-ViT-H-14-laion2B"):
        build_encoders(TINY)


def test_missing_paths_name_the_needed_files(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nope.bin: file not found.*laion/CLIP-ViT-H-14"):
        ClipImageEncoder.from_pretrained(tmp_path / "nope.bin")
    with pytest.raises(WeightsNotFoundError, match="open_clip_pytorch_model.bin"):
        ClipImageEncoder.from_pretrained(tmp_path)  # a folder without the checkpoint
    with pytest.raises(WeightsNotFoundError, match="config.json.*facebook/dinov2-giant"):
        DinoEncoder.from_pretrained(tmp_path)
    with pytest.raises(WeightsNotFoundError, match="vae/config.json.*stable-diffusion-2-1-base"):
        VaeCodec.from_pretrained(tmp_path)
    # A CLIP path given but no DINOv2 folder: the error names the DINOv2 folder, before loading anything.
    with pytest.raises(WeightsNotFoundError, match="DINOv2.*facebook/dinov2-giant"):
        build_encoders(TINY, clip_path=tmp_path / "open_clip_pytorch_model.bin", vae_path=tmp_path)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_clip_loads_only_visual_weights_from_full_checkpoint(tmp_path, suffix):
    config = clip_config(TINY.clip_embed_dim, full_size=False)
    torch.manual_seed(1)
    source = ClipImageEncoder(config)
    state = {f"visual.{k}": v.contiguous() for k, v in source.visual.state_dict().items()}
    state["text_projection"] = torch.randn(4, 4)  # the text tower is in the file but never built
    path = tmp_path / f"open_clip_model{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = ClipImageEncoder.from_pretrained(path, config=config)
    images = torch.rand(2, 3, 128, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(images), source(images))

    torch.save({"text_projection": torch.randn(4, 4)}, tmp_path / "text_only.bin")
    with pytest.raises(ValueError, match="no 'visual"):
        ClipImageEncoder.from_pretrained(tmp_path / "text_only.bin", config=config)


def test_dino_and_vae_load_from_local_folders(tmp_path):
    torch.manual_seed(2)
    dino = DinoEncoder.from_config(dino_config(TINY.dino_dim, full_size=False))
    dino.model.save_pretrained(tmp_path / "dino")
    vae = VaeCodec.from_config(vae_config(TINY.latent_channels, TINY.vae_scale_factor, full_size=False))
    vae.vae.save_pretrained(tmp_path / "sd" / "vae")  # SD layout
    vae.vae.save_pretrained(tmp_path / "bare_vae")  # bare VAE folder

    images = torch.rand(2, 3, 128, 64, generator=torch.Generator().manual_seed(0))
    # Same long side as the randomly built tiny encoder, so the token grids match.
    loaded = DinoEncoder.from_pretrained(tmp_path / "dino", long_side=dino.long_side).eval()
    assert torch.allclose(loaded(images), dino.eval()(images), atol=1e-6)
    for folder in (tmp_path / "sd", tmp_path / "bare_vae"):
        assert torch.allclose(VaeCodec.from_pretrained(folder).encode(images), vae.encode(images), atol=1e-6)


def test_loaded_encoder_must_match_preset_dims(tmp_path):
    torch.manual_seed(3)
    DinoEncoder.from_config(dino_config(48, full_size=False)).model.save_pretrained(tmp_path / "dino48")
    with pytest.raises(ValueError, match="DINOv2 hidden size is 48 but preset 'tiny' expects 32"):
        build_encoders(TINY, dino_path=tmp_path / "dino48", allow_random=True)


def test_param_counts_on_meta_device():
    tiny = encoder_param_counts(TINY)
    assert set(tiny) == {"clip", "dino", "vae"} and all(n > 0 for n in tiny.values())
    paper = encoder_param_counts(get_preset("paper"))
    # OpenCLIP ViT-H/14 vision tower, DINOv2-g/14 and the SD 2.1 VAE have these published sizes.
    assert paper["clip"] == 632_076_800
    assert 1_130_000_000 < paper["dino"] < 1_140_000_000
    assert 83_000_000 < paper["vae"] < 84_000_000
