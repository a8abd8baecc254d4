"""Conversion of the official PCDMs release (DeepSpeed ``mp_rank_00_model_states.pt``) into our networks.

The official layouts are rebuilt here from the release's module structure
(``Stage1_PriorTransformer``; ``SDModel`` = diffusers UNet + ControlNet
conditioning embedding + MLP) independently of :mod:`pcdms.models`, at the
tiny size for values and at the paper size (meta device) for key names and
shapes listed in DESIGN section 5.
"""

from __future__ import annotations

import torch
from click.testing import CliRunner
from diffusers import UNet2DConditionModel
from torch import nn

import pytest
from pcdms import build_model, load_model
from pcdms.convert import from_official, load_official
from pcdms.presets import get_preset

TINY = get_preset("tiny")


pytestmark = pytest.mark.usefixtures("one_thread")


def official_prior_shapes(width: int, embed: int, layers: int, pose_hidden=(512, 1024), tokens: int = 6) -> dict:
    """Key -> shape of the release's Stage1_PriorTransformer (read from its source)."""
    shapes = {"positional_embedding": (1, tokens, width), "prd_embedding": (1, 1, width)}

    def linear(name, i, o):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (o, i), (o,)

    def norm(name, n):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (n,), (n,)

    for enc in ("pose_encoder", "pose_encoder1"):  # Linear, GELU, Dropout, LayerNorm, Linear, Dropout, LayerNorm
        linear(f"{enc}.net.0", 36, pose_hidden[0])
        norm(f"{enc}.net.3", pose_hidden[0])
        linear(f"{enc}.net.4", pose_hidden[0], pose_hidden[1])
        norm(f"{enc}.net.6", pose_hidden[1])
    linear("time_embedding.linear_1", width, width)
    linear("time_embedding.linear_2", width, width)
    linear("proj_in", embed, width)
    linear("embedding_proj", embed, width)
    linear("encoder_hidden_states_proj", pose_hidden[1], width)
    linear("encoder_hidden_states_proj1", pose_hidden[1], width)
    for i in range(layers):
        b = f"transformer_blocks.{i}"
        norm(f"{b}.norm1", width)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            linear(f"{b}.attn1.{proj}", width, width)
        norm(f"{b}.norm3", width)
        linear(f"{b}.ff.net.0.proj", width, 4 * width)
        linear(f"{b}.ff.net.2", 4 * width, width)
    norm("norm_out", width)
    linear("proj_to_clip_embeddings", width, embed)
    return shapes


class OfficialSDModel(nn.Module):
    """The release's stage-2/3 training wrapper, rebuilt from its source with diffusers parts."""

    def __init__(self, cfg, inpaint: bool) -> None:
        super().__init__()
        try:
            from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
        except ImportError:  # pragma: no cover
            from diffusers.models.controlnet import ControlNetConditioningEmbedding
        self.image_proj_model_p = nn.Module()
        self.image_proj_model_p.net = nn.Sequential(
            nn.Linear(cfg.dino_dim, cfg.mlp_hidden), nn.GELU(), nn.Dropout(0.0), nn.LayerNorm(cfg.mlp_hidden),
            nn.Linear(cfg.mlp_hidden, cfg.cross_attention_dim), nn.Dropout(0.0),
        )
        self.unet = UNet2DConditionModel(
            in_channels=cfg.in_channels, block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block, attention_head_dim=cfg.attention_head_dim,
            cross_attention_dim=cfg.cross_attention_dim, down_block_types=cfg.down_block_types,
            up_block_types=cfg.up_block_types, norm_num_groups=cfg.norm_num_groups, use_linear_projection=True,
            class_embed_type="projection" if inpaint else None,
            projection_class_embeddings_input_dim=cfg.clip_dim if inpaint else None,
        )
        if inpaint:
            self.pose_proj = ControlNetConditioningEmbedding(
                conditioning_embedding_channels=cfg.block_out_channels[0], block_out_channels=cfg.pose_channels
            )


def _random_state(shapes: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _official_state(stage: str, seed: int = 0) -> dict:
    if stage == "prior":
        p = TINY.prior
        return _random_state(official_prior_shapes(p.width, p.embed_dim, p.num_layers, p.pose_hidden), seed)
    torch.manual_seed(seed)
    return OfficialSDModel(getattr(TINY, stage), inpaint=stage == "inpaint").state_dict()


def _deepspeed_file(state: dict) -> dict:
    """What DeepSpeed's save_checkpoint writes, reduced to entries the safe loader accepts."""
    return {"module": state, "epoch": 3, "last_global_step": 1200, "global_steps": 1200, "dp_world_size": 8}


@pytest.mark.parametrize("stage", ["prior", "inpaint", "refine"])
def test_official_layout_converts_and_loads_strictly(stage):
    official = _official_state(stage)
    ours = from_official(_deepspeed_file(official), stage, "tiny")
    model = build_model(stage, "tiny")
    model.load_state_dict(ours, strict=True)
    for key, value in official.items():
        assert torch.equal(model.state_dict()[key], value), key
    # The bare module dict and a DDP "module." prefix are accepted too.
    assert from_official(official, stage, "tiny").keys() == ours.keys()
    prefixed = {f"module.{k}": v for k, v in official.items()}
    assert from_official({"module": prefixed}, stage, "tiny").keys() == ours.keys()


def test_errors_list_unknown_missing_and_mis_shaped_keys():
    official = _official_state("inpaint")
    extra = {**official, "unet.extra_head.weight": torch.zeros(3), "ip_adapter.scale": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unmapped keys in the file: ip_adapter\.scale, unet\.extra_head\.weight"):
        from_official(extra, "inpaint", "tiny")
    missing = {k: v for k, v in official.items() if not k.startswith("pose_proj.conv_out")}
    with pytest.raises(ValueError, match=r"lacks: pose_proj\.conv_out\.bias, pose_proj\.conv_out\.weight"):
        from_official(missing, "inpaint", "tiny")
    # A stage-3 file given as stage 2: conv_in has 8 input channels, pose/class keys are missing.
    with pytest.raises(ValueError, match=r"unet\.conv_in\.weight: file \(32, 8, 3, 3\) vs model \(32, 9, 3, 3\)"):
        from_official(_official_state("refine"), "inpaint", "tiny")
    with pytest.raises(ValueError, match="not tensors"):
        from_official({"module": {**official, "note": "hello"}}, "inpaint", "tiny")
    with pytest.raises(ValueError, match="unknown PCDMs stage"):
        from_official(official, "stage2", "tiny")


def test_paper_key_set_and_shapes_match_the_release():
    with torch.device("meta"):
        prior = {k: tuple(v.shape) for k, v in build_model("prior", "paper").state_dict().items()}
        inpaint = {k: tuple(v.shape) for k, v in build_model("inpaint", "paper").state_dict().items()}
        refine = {k: tuple(v.shape) for k, v in build_model("refine", "paper").state_dict().items()}
        official = OfficialSDModel(get_preset("paper").inpaint, inpaint=True)
        official_inpaint = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert prior == official_prior_shapes(2048, 1024, 20)
    assert prior["positional_embedding"] == (1, 6, 2048) and prior["prd_embedding"] == (1, 1, 2048)
    assert inpaint == official_inpaint
    assert inpaint["unet.conv_in.weight"] == (320, 9, 3, 3)
    assert inpaint["unet.class_embedding.linear_1.weight"] == (1280, 1024)
    assert inpaint["image_proj_model_p.net.0.weight"] == (768, 1536)
    assert inpaint["image_proj_model_p.net.3.weight"] == (768,)
    assert inpaint["image_proj_model_p.net.4.weight"] == (1024, 768)
    assert inpaint["pose_proj.conv_in.weight"] == (16, 3, 3, 3)
    assert {k.split(".")[2] for k in inpaint if k.startswith("pose_proj.blocks.")} == {str(i) for i in range(6)}
    assert inpaint["pose_proj.conv_out.weight"] == (320, 256, 3, 3)
    assert refine["unet.conv_in.weight"] == (320, 8, 3, 3)
    assert not any(k.startswith(("pose_proj", "unet.class_embedding")) for k in refine)
    assert {k.split(".")[0] for k in refine} == {"unet", "image_proj_model_p"}


def test_load_official_file_and_cli(tmp_path):
    from reid_aug.cli import main

    official = _official_state("refine", seed=5)
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(_deepspeed_file(official), path)
    model = load_official(path, "refine", "tiny", dtype=torch.float32)
    assert not model.training and all(torch.equal(model.state_dict()[k], v) for k, v in official.items())
    out = tmp_path / "refine"
    result = CliRunner().invoke(
        main, ["convert-official", str(path), "--stage", "refine", "--preset", "tiny", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    loaded = load_model(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in official.items())
    half = CliRunner().invoke(
        main, ["convert-official", str(path), "--stage", "refine", "--preset", "tiny", "--dtype", "float16",
               "--out", str(tmp_path / "half")]
    )
    assert half.exit_code == 0 and next(load_model(tmp_path / "half").parameters()).dtype == torch.float16
    wrong = CliRunner().invoke(main, ["convert-official", str(path), "--stage", "inpaint", "--preset", "tiny",
                                      "--out", str(tmp_path / "x")])
    assert wrong.exit_code != 0 and "pose_proj" in wrong.output and not (tmp_path / "x").exists()


class _Opaque:
    pass


def test_unsafe_or_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="mp_rank_00_model_states.pt"):
        load_official(tmp_path / "absent.pt", "prior", "tiny")
    path = tmp_path / "pickled.pt"
    torch.save({"module": _official_state("prior"), "args": _Opaque()}, path)
    with pytest.raises(ValueError, match="trust_pickle"):
        load_official(path, "prior", "tiny")
    model = load_official(path, "prior", "tiny", trust_pickle=True)
    assert model.stage == "prior"
