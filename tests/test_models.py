"""PCDMs stage networks, presets and checkpoint I/O (tiny preset on CPU; paper preset on meta)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from pcdms import build_model, load_model, save_model
from pcdms.models import InpaintModel, PosePriorTransformer, RefineModel, stage_parameter_counts
from pcdms.presets import PriorConfig, get_preset

TINY = get_preset("tiny")
B = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(stage: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(stage, "tiny").eval()


def _prior_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = TINY.clip_embed_dim
    return dict(
        noisy_embeds=torch.randn(B, d, generator=g),
        timestep=torch.tensor([5, 700]),
        source_embeds=torch.randn(B, d, generator=g),
        source_pose=torch.rand(B, 36, generator=g),
        target_pose=torch.rand(B, 36, generator=g),
    )


def _inpaint_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w2 = TINY.canvas_latent_size
    H, W2 = TINY.canvas_size
    mask = torch.cat([torch.ones(B, 1, h, w2 // 2), torch.zeros(B, 1, h, w2 // 2)], dim=3)
    return dict(
        sample=torch.randn(B, 4, h, w2, generator=g),
        timestep=torch.tensor([10, 900]),
        mask=mask,
        masked_latent=torch.randn(B, 4, h, w2, generator=g),
        pose_canvas=torch.rand(B, 3, H, W2, generator=g),
        dino_tokens=torch.randn(B, 7, TINY.dino_dim, generator=g),
        global_embed=torch.randn(B, TINY.clip_embed_dim, generator=g),
    )


def _refine_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w = TINY.latent_size
    return dict(
        sample=torch.randn(B, 4, h, w, generator=g),
        timestep=torch.tensor([10, 900]),
        coarse_latent=torch.randn(B, 4, h, w, generator=g),
        dino_tokens=torch.randn(B, 7, TINY.dino_dim, generator=g),
    )


INPUTS = {"prior": _prior_inputs, "inpaint": _inpaint_inputs, "refine": _refine_inputs}


# --- presets -------------------------------------------------------------------------------------


def test_presets_sizes_and_unknown_name():
    paper = get_preset("paper")
    assert paper.image_size == (128, 64) and paper.canvas_size == (128, 128)
    assert paper.canvas_latent_size == (16, 16) and paper.latent_size == (16, 8)
    assert paper.prior == PriorConfig(num_layers=20, width=2048, num_heads=32, embed_dim=1024)
    assert paper.inpaint.block_out_channels == (320, 640, 1280, 1280)
    assert paper.inpaint.attention_head_dim == (5, 10, 20, 20)
    assert (paper.inpaint.in_channels, paper.refine.in_channels) == (9, 8)
    with pytest.raises(ValueError, match=r"'paper', 'tiny'"):
        get_preset("huge")
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper.name = "x"  # type: ignore[misc]


def test_invalid_stage_configs_are_rejected():
    with pytest.raises(ValueError, match="clip_dim"):
        dataclasses.replace(TINY.inpaint, clip_dim=TINY.inpaint.cross_attention_dim + 1)
    with pytest.raises(ValueError, match="attention_head_dim"):
        dataclasses.replace(TINY.refine, attention_head_dim=(2,))
    with pytest.raises(ValueError, match="divisible"):
        PriorConfig(num_layers=1, width=30, num_heads=4, embed_dim=8)
    with pytest.raises(ValueError, match="vae_scale_factor"):
        dataclasses.replace(TINY, vae_scale_factor=4)
    with pytest.raises(ValueError, match="pose_channels"):
        InpaintModel(TINY.refine)
    with pytest.raises(ValueError, match="refine"):
        RefineModel(TINY.inpaint)
    with pytest.raises(ValueError, match="unknown PCDMs stage"):
        build_model("decoder", "tiny")


# --- forward contract ----------------------------------------------------------------------------


def test_forward_shapes_at_market_size():
    h, w = TINY.latent_size
    prior, inpaint, refine = _model("prior"), _model("inpaint"), _model("refine")
    assert isinstance(prior, PosePriorTransformer) and prior.stage == "prior" and prior.preset_name == "tiny"
    with torch.no_grad():
        assert prior(**_prior_inputs()).shape == (B, TINY.clip_embed_dim)
        assert inpaint(**_inpaint_inputs()).shape == (B, 4, h, 2 * w)
        assert refine(**_refine_inputs()).shape == (B, 4, h, w)


def test_prior_scalar_timestep_broadcasts_and_float_is_accepted():
    prior = _model("prior")
    x = _prior_inputs()
    with torch.no_grad():
        batched = prior(**{**x, "timestep": torch.tensor([123, 123])})
        scalar = prior(**{**x, "timestep": 123})
        floats = prior(**{**x, "timestep": torch.tensor([123.0, 123.0])})
    torch.testing.assert_close(batched, scalar)
    torch.testing.assert_close(batched, floats)


def test_prior_embedding_standardisation_round_trips():
    prior = _model("prior")
    x = torch.randn(4, TINY.clip_embed_dim)
    z = prior.normalize_embeds(x)
    torch.testing.assert_close(z, (x + 0.016) / 0.415)
    torch.testing.assert_close(prior.denormalize_embeds(z), x)


def test_prior_reads_every_token():
    """Each condition, the timestep and the noisy input all change the prediction (full attention)."""
    prior = _model("prior")
    x = _prior_inputs()
    with torch.no_grad():
        base = prior(**x)
        for key in x:
            other = {**x, key: torch.tensor([300, 40]) if key == "timestep" else x[key] + 1.0}
            assert not torch.allclose(prior(**other), base), key


def test_bad_shapes_raise_naming_the_input():
    with pytest.raises(ValueError, match="source_pose"):
        _model("prior")(**{**_prior_inputs(), "source_pose": torch.zeros(B, 34)})
    with pytest.raises(ValueError, match="pose_canvas"):
        _model("inpaint")(**{**_inpaint_inputs(), "pose_canvas": torch.zeros(B, 3, 64, 64)})
    with pytest.raises(ValueError, match="global_embed"):
        _model("inpaint")(**{**_inpaint_inputs(), "global_embed": torch.zeros(B, 7)})
    with pytest.raises(ValueError, match="dino_tokens"):
        _model("refine")(**{**_refine_inputs(), "dino_tokens": torch.zeros(B, 7, 5)})


def test_pose_encoder_starts_at_zero_and_its_residual_is_added_after_conv_in():
    inpaint = _model("inpaint")
    x = _inpaint_inputs()
    other_pose = {**x, "pose_canvas": torch.rand_like(x["pose_canvas"])}
    with torch.no_grad():
        # Zero-initialised output conv: a fresh model ignores the pose, like ControlNet.
        torch.testing.assert_close(inpaint(**x), inpaint(**other_pose), rtol=0, atol=0)
        torch.nn.init.normal_(inpaint.pose_proj.conv_out.weight, std=0.1)
        assert not torch.allclose(inpaint(**x), inpaint(**other_pose))
        # Same result as adding the pose features to conv_in's output by hand.
        pose_feat = inpaint.pose_proj(x["pose_canvas"] * 2 - 1)
        expected_in = inpaint.unet.conv_in(torch.cat([x["sample"], x["mask"], x["masked_latent"]], 1)) + pose_feat
    seen = {}
    def grab(_module, args, kwargs):
        seen["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    probe = inpaint.unet.down_blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        inpaint(**x)
    probe.remove()
    torch.testing.assert_close(seen["h"], expected_in)
    assert not inpaint.unet.conv_in._forward_hooks  # the temporary hook is gone


# --- null conditions / dropout -------------------------------------------------------------------


def test_null_conditions_are_zeros_and_change_the_prediction():
    prior, inpaint, refine = _model("prior"), _model("inpaint"), _model("refine")
    xp, xi, xr = _prior_inputs(), _inpaint_inputs(), _refine_inputs()
    nulls_p = prior.null_condition(xp["source_embeds"], xp["source_pose"], xp["target_pose"])
    nulls_i = inpaint.null_condition(xi["dino_tokens"], xi["global_embed"])
    nulls_r = refine.null_condition(xr["coarse_latent"], xr["dino_tokens"])
    for n, ref in zip(nulls_p + nulls_i + nulls_r, [xp["source_embeds"], xp["source_pose"], xp["target_pose"],
                                                    xi["dino_tokens"], xi["global_embed"],
                                                    xr["coarse_latent"], xr["dino_tokens"]]):
        assert n.shape == ref.shape and not n.any()
    with torch.no_grad():
        up = prior(**{**xp, **dict(zip(["source_embeds", "source_pose", "target_pose"], nulls_p))})
        ui = inpaint(**{**xi, **dict(zip(["dino_tokens", "global_embed"], nulls_i))})
        ur = refine(**{**xr, **dict(zip(["coarse_latent", "dino_tokens"], nulls_r))})
        assert not torch.allclose(up, prior(**xp))
        assert not torch.allclose(ui, inpaint(**xi))
        assert not torch.allclose(ur, refine(**xr))


def test_drop_conditions_drop_to_the_null_reproducibly():
    inpaint, refine, prior = _model("inpaint"), _model("refine"), _model("prior")
    n = 400
    tokens, glob = torch.randn(n, 3, TINY.dino_dim), torch.randn(n, TINY.clip_embed_dim)
    kept_t, kept_g = inpaint.drop_conditions(tokens, glob, p=0.0)
    assert torch.equal(kept_t, tokens) and torch.equal(kept_g, glob)
    all_t, all_g = inpaint.drop_conditions(tokens, glob, p=1.0)
    assert not all_t.any() and not all_g.any()
    a = inpaint.drop_conditions(tokens, glob, p=0.5, generator=torch.Generator().manual_seed(3))
    b = inpaint.drop_conditions(tokens, glob, p=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    dropped_t = ~a[0].flatten(1).any(1)
    dropped_g = ~a[1].any(1)
    assert 100 < dropped_t.sum() < 300 and not torch.equal(dropped_t, dropped_g)  # independent draws
    # Rows are either untouched or fully null.
    assert torch.equal(a[0][~dropped_t], tokens[~dropped_t])
    j = inpaint.drop_conditions(tokens, glob, p=0.5, generator=torch.Generator().manual_seed(3), joint=True)
    assert torch.equal(~j[0].flatten(1).any(1), ~j[1].any(1))
    # Refine: one draw drops the coarse latent and the tokens together (Eq. 8's null).
    coarse = torch.randn(n, 4, 2, 2)
    c, t = refine.drop_conditions(coarse, tokens, p=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(~c.flatten(1).any(1), ~t.flatten(1).any(1)) and (~c.flatten(1).any(1)).any()
    # Prior: three independent draws, or one with joint=True.
    s, ps, pt = torch.randn(n, 32), torch.rand(n, 36) + 0.1, torch.rand(n, 36) + 0.1
    out = prior.drop_conditions(s, ps, pt, p=0.5, generator=torch.Generator().manual_seed(1))
    masks = [~o.any(1) for o in out]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    out = prior.drop_conditions(s, ps, pt, p=0.5, generator=torch.Generator().manual_seed(1), joint=True)
    masks = [~o.any(1) for o in out]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
    with pytest.raises(ValueError, match="probability"):
        refine.drop_conditions(coarse, tokens, p=1.5)


# --- meta build / paper size ---------------------------------------------------------------------


def test_paper_preset_builds_on_meta_with_the_papers_sizes():
    counts = stage_parameter_counts("paper")
    assert counts["prior"]["total"] == pytest.approx(1.03e9, rel=0.02)
    assert counts["inpaint"]["total"] == pytest.approx(0.87e9, rel=0.02)
    assert counts["refine"]["total"] == pytest.approx(0.87e9, rel=0.02)
    assert counts["prior"]["parts"]["positional_embedding"] == 6 * 2048
    assert set(counts["inpaint"]["parts"]) == {"unet", "pose_proj", "image_proj_model_p"}
    with torch.device("meta"):
        prior = build_model("prior", "paper")
        inpaint = build_model("inpaint", "paper")
    assert all(p.is_meta for p in prior.parameters()) and all(p.is_meta for p in inpaint.parameters())
    assert len(prior.transformer_blocks) == 20 and prior.transformer_blocks[0].attn1.heads == 32


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["prior", "inpaint", "refine"])
def test_save_load_round_trip_is_bit_exact(tmp_path, stage):
    model = _model(stage, seed=7)
    with torch.no_grad():  # make the zero-initialised parts non-trivial too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    folder = save_model(model, tmp_path / stage)
    meta = json.loads((folder / "config.json").read_text())
    assert meta["stage"] == stage and meta["preset"] == "tiny"
    loaded = load_model(folder)
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.requires_grad for p in loaded.parameters())
    x = INPUTS[stage]()
    with torch.no_grad():
        assert torch.equal(model(**x), loaded(**x))
    half = load_model(folder, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_custom_config_round_trips(tmp_path):
    from pcdms.models import build_stage

    cfg = dataclasses.replace(TINY.prior, num_layers=1, pose_hidden=(8, 16))
    torch.manual_seed(0)
    model = build_stage("prior", cfg)
    loaded = load_model(save_model(model, tmp_path / "c"))
    assert loaded.config == cfg and loaded.preset_name == "custom"


def test_load_errors_name_the_missing_or_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")
    folder = save_model(_model("refine"), tmp_path / "r")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(folder)
    save_model(_model("refine"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["config"]["blocks"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown UNetStageConfig keys"):
        load_model(folder)
    # Weights of another stage under this config: strict load fails with the file named.
    save_model(_model("refine"), folder)
    save_model(_model("inpaint"), tmp_path / "i")
    (tmp_path / "i" / "model.safetensors").replace(folder / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(folder)


def test_save_refuses_meta_model(tmp_path):
    with torch.device("meta"):
        model = build_model("refine", "tiny")
    with pytest.raises(ValueError, match="meta"):
        save_model(model, tmp_path / "m")


# --- Stable Diffusion start --------------------------------------------------------------------


def test_init_from_stable_diffusion_widens_conv_in_with_zeros(tmp_path):
    from diffusers import UNet2DConditionModel

    from pcdms.models import init_from_stable_diffusion

    cfg = TINY.refine
    torch.manual_seed(3)
    sd_unet = UNet2DConditionModel(
        in_channels=4, block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim, cross_attention_dim=cfg.cross_attention_dim,
        down_block_types=cfg.down_block_types, up_block_types=cfg.up_block_types,
        norm_num_groups=cfg.norm_num_groups, use_linear_projection=True,
    ).eval()
    sd_unet.save_pretrained(tmp_path / "sd" / "unet")
    refine, inpaint = _model("refine"), _model("inpaint")
    class_before = inpaint.unet.class_embedding.linear_1.weight.clone()
    report = init_from_stable_diffusion(refine, tmp_path / "sd")
    assert report == {"widened": ["conv_in.weight"], "kept_init": []}
    report = init_from_stable_diffusion(inpaint, tmp_path / "sd" / "unet")
    assert report["widened"] == ["conv_in.weight"]
    assert report["kept_init"] and all(k.startswith("class_embedding.") for k in report["kept_init"])
    assert torch.equal(inpaint.unet.class_embedding.linear_1.weight, class_before)
    assert not refine.unet.conv_in.weight[:, 4:].any()
    x = _refine_inputs()
    with torch.no_grad():
        context = refine.image_proj_model_p(x["dino_tokens"])
        expected = sd_unet(x["sample"], x["timestep"], encoder_hidden_states=context).sample
        torch.testing.assert_close(refine(**x), expected)
    with pytest.raises(FileNotFoundError, match="stable-diffusion-2-1-base"):
        init_from_stable_diffusion(refine, tmp_path / "nothing")
    with pytest.raises(ValueError, match="does not fit"):
        init_from_stable_diffusion(build_model("refine", dataclasses.replace(
            TINY, refine=dataclasses.replace(TINY.refine, block_out_channels=(32, 32)))), tmp_path / "sd")


# --- model card ----------------------------------------------------------------------------------


def test_pcdms_info_prints_parameter_counts():
    from reid_aug.cli import main

    result = CliRunner().invoke(main, ["pcdms-info", "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.output)
    expected = stage_parameter_counts("tiny")
    for stage in ("prior", "inpaint", "refine"):
        assert card["trainable"][stage]["total"] == sum(p.numel() for p in _model(stage).parameters())
        assert card["trainable"][stage] == expected[stage]
    assert set(card["frozen_encoders"]) == {"clip", "dino", "vae"}
    assert all(v > 0 for v in card["frozen_encoders"].values())
    assert card["canvas_size"] == [128, 128]
    bad = CliRunner().invoke(main, ["pcdms-info", "--preset", "huge"])
    assert bad.exit_code != 0 and "tiny" in bad.output
