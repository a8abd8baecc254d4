"""Three-stage PCDMs sampling (pcdms.pipeline) on the tiny preset: ablations, CFG, seeds, schedulers, I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pcdms import build_model, get_preset
from pcdms.encoders import build_encoders
from pcdms.pipeline import (
    SCHEDULERS,
    PCDMsPipeline,
    canvas_conditions,
    classifier_free_guidance,
    denoise,
    latent_schedule_config,
    make_scheduler,
    prior_schedule_config,
    sampler_start,
)
from pcdms.pose import draw_skeleton_batch

TINY = get_preset("tiny")
STEPS = 2


def _keypoints(batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kp = np.stack([rng.integers(0, 64, (batch, 18)), rng.integers(0, 128, (batch, 18))], axis=-1)
    kp[:, 4] = -1  # a missing joint
    return kp


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    models = [build_model(stage, TINY).eval() for stage in ("prior", "inpaint", "refine")]
    return PCDMsPipeline(*models, build_encoders(TINY, allow_random=True), TINY)


@pytest.fixture(scope="module")
def inputs():
    images = torch.rand(2, 3, 128, 64, generator=torch.Generator().manual_seed(0))
    return images, _keypoints(2, 1), _keypoints(2, 2)


def _run(pipe, inputs, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(*inputs, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("stages", ["full", "B1", "B2", "B3"])
def test_every_ablation_gives_target_sized_images(pipe, inputs, stages):
    out = _run(pipe, inputs, stages=stages)
    assert out.images.shape == (2, 3, 128, 64)
    assert out.coarse_images.shape == (2, 3, 128, 64)
    assert torch.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1
    with_prior = stages in ("full", "B2")
    assert (out.global_embeds is not None) == with_prior
    if with_prior:
        assert out.global_embeds.shape == (2, TINY.clip_embed_dim)
    if stages in ("B1", "B2"):  # no refining: the coarse image is the result
        assert torch.equal(out.images, out.coarse_images)


def test_ablations_share_noise_and_compose(pipe, inputs):
    full, b1 = _run(pipe, inputs, stages="full"), _run(pipe, inputs, stages="B1")
    b2, b3 = _run(pipe, inputs, stages="B2"), _run(pipe, inputs, stages="B3")
    # Initial noises are drawn up front, so stages compose: full = B2 then refine, B3 = B1 then refine.
    assert torch.equal(full.coarse_images, b2.images)
    assert torch.equal(b3.coarse_images, b1.images)
    assert torch.equal(full.global_embeds, b2.global_embeds)
    # The prior's global embedding changes the inpainting result (B1 uses the null embedding).
    assert not torch.allclose(b1.images, b2.images)
    assert not torch.allclose(full.images, full.coarse_images)


@pytest.mark.parametrize("batch", [1, 3])
def test_arbitrary_batch_sizes(pipe, batch):
    images = torch.rand(batch, 3, 128, 64, generator=torch.Generator().manual_seed(batch))
    out = _run(pipe, (images, _keypoints(batch, 3), _keypoints(batch, 4)))
    assert out.images.shape == (batch, 3, 128, 64)


def test_same_seed_same_images_different_seed_different(pipe, inputs):
    a, b, c = _run(pipe, inputs, seed=7), _run(pipe, inputs, seed=7), _run(pipe, inputs, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.global_embeds, b.global_embeds)
    assert not torch.allclose(a.images, c.images)


def test_per_sample_generators_make_results_batch_independent(pipe, inputs):
    images, src, tgt = inputs
    gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    batched = pipe(images, src, tgt, num_inference_steps=STEPS, generator=gens).images
    alone = pipe(images[1:], src[1:], tgt[1:], num_inference_steps=STEPS,
                 generator=[torch.Generator().manual_seed(12)]).images
    assert torch.allclose(batched[1:], alone, atol=1e-4)


class _Recorder(torch.nn.Module):
    """Wraps a stage model: records forward batch sizes; its null condition can be poisoned with NaN."""

    def __init__(self, model, poison: bool):
        super().__init__()
        self.model, self.poison, self.batches = model, poison, []

    def forward(self, sample, *args):
        self.batches.append(sample.shape[0])
        self.last_args = args
        return self.model(sample, *args)

    def denormalize_embeds(self, x0):
        self.denormalized = x0
        return self.model.denormalize_embeds(x0)

    def null_condition(self, *conds):
        nulls = self.model.null_condition(*conds)
        return tuple(torch.full_like(n, float("nan")) for n in nulls) if self.poison else nulls


def _wrapped(pipe, poison):
    p = PCDMsPipeline(_Recorder(pipe.prior, poison), _Recorder(pipe.inpaint, poison), _Recorder(pipe.refine, poison),
                      pipe.encoders, pipe.preset)
    return p, (p.prior, p.inpaint, p.refine)


def test_guidance_one_is_the_pure_conditional_path(pipe, inputs):
    reference = _run(pipe, inputs, guidance_scale=1.0)
    poisoned, recorders = _wrapped(pipe, poison=True)
    out = _run(poisoned, inputs, guidance_scale=1.0)
    # The unconditional inputs are NaN, so any use of them would show; one B-sized forward per step.
    assert torch.equal(out.images, reference.images) and torch.equal(out.global_embeds, reference.global_embeds)
    for rec in recorders:
        assert rec.batches == [2] * STEPS
    # With guidance the (poisoned) unconditional branch is used, in the same forward as the conditional one.
    poisoned_guided, recorders = _wrapped(pipe, poison=True)
    out = _run(poisoned_guided, inputs, guidance_scale=(1.0, 2.0, 1.0), stages="B2")
    assert torch.isnan(out.images).any()
    assert recorders[1].batches == [4] * STEPS and recorders[0].batches == [2] * STEPS


def test_stage_two_gets_the_denormalised_prior_embedding(pipe, inputs):
    wrapped, (prior, inpaint, _) = _wrapped(pipe, poison=False)
    out = _run(wrapped, inputs, stages="B2", guidance_scale=1.0)
    assert torch.equal(inpaint.last_args[-1], out.global_embeds)
    # The prior works in its standardised space; stage 2 gets raw CLIP embeddings back.
    assert torch.equal(out.global_embeds, pipe.prior.denormalize_embeds(prior.denormalized))
    assert not torch.allclose(out.global_embeds, prior.denormalized)
    _run(wrapped, inputs, stages="B1", guidance_scale=1.0)
    assert not inpaint.last_args[-1].any()  # B1: the null (zero) global embedding


def test_guidance_changes_images(pipe, inputs):
    plain, guided = _run(pipe, inputs, guidance_scale=1.0), _run(pipe, inputs, guidance_scale=2.0)
    assert not torch.allclose(plain.images, guided.images)
    assert not torch.allclose(plain.global_embeds, guided.global_embeds)


def test_batched_guidance_equals_separate_forwards(pipe, inputs):
    images, src, tgt = inputs
    out = _run(pipe, inputs, return_intermediates=True)
    it = out.intermediates
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor(500)
    cond = (it["mask"], it["masked_latent"], it["pose_canvas"], it["dino_tokens"], out.global_embeds)
    uncond = (*cond[:3], *pipe.inpaint.null_condition(cond[3], cond[4]))
    with torch.no_grad():
        eps_c = pipe.inpaint(x, t.expand(2), *cond)
        eps_u = pipe.inpaint(x, t.expand(2), *uncond)
        guided = classifier_free_guidance(pipe.inpaint, x, t, cond, uncond, 2.0)
    # Conditional and unconditional predictions differ, and one batched call gives Eq. 6.
    assert not torch.allclose(eps_c, eps_u, atol=1e-4)
    assert torch.allclose(guided, 2.0 * eps_c + (1 - 2.0) * eps_u, atol=1e-5)


def test_conditional_and_unconditional_predictions_differ_for_prior_and_refine(pipe, inputs):
    out = _run(pipe, inputs, return_intermediates=True)
    it = out.intermediates
    t = torch.full((2,), 300)
    with torch.no_grad():
        prior_cond = (it["source_embeds"], torch.rand(2, 36), torch.rand(2, 36))
        x = torch.randn(2, TINY.clip_embed_dim, generator=torch.Generator().manual_seed(0))
        prior_null = pipe.prior.null_condition(*prior_cond)
        assert not torch.allclose(pipe.prior(x, t, *prior_cond), pipe.prior(x, t, *prior_null))
        refine_cond = (it["coarse_latents"], it["dino_tokens"])
        z = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(0))
        refine_null = pipe.refine.null_condition(*refine_cond)
        assert not torch.allclose(pipe.refine(z, t, *refine_cond), pipe.refine(z, t, *refine_null))


def test_intermediates(pipe, inputs):
    images, src, tgt = inputs
    it = _run(pipe, inputs, return_intermediates=True).intermediates
    assert it["pose_canvas"].shape == (2, 3, 128, 128)
    assert torch.equal(it["pose_canvas"][..., :64], draw_skeleton_batch(src, (128, 64), (128, 64)))
    assert torch.equal(it["pose_canvas"][..., 64:], draw_skeleton_batch(tgt, (128, 64), (128, 64)))
    assert torch.equal(it["masked_canvas"][..., :64], images) and not it["masked_canvas"][..., 64:].any()
    assert it["mask"].shape == (2, 1, 16, 16)
    assert it["mask"][..., :8].eq(1).all() and it["mask"][..., 8:].eq(0).all()
    assert it["canvas_latents"].shape == (2, 4, 16, 16) and it["coarse_canvas"].shape == (2, 3, 128, 128)
    assert it["coarse_latents"].shape == (2, 4, 16, 8) and it["latents"].shape == (2, 4, 16, 8)
    assert it["source_embeds"].shape == (2, TINY.clip_embed_dim)
    assert _run(pipe, inputs).intermediates is None


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_each_scheduler_runs(pipe, inputs, name):
    out = _run(pipe, inputs, scheduler=name)
    assert out.images.shape == (2, 3, 128, 64) and torch.isfinite(out.images).all()
    if name != "ddim":
        assert not torch.equal(out.images, _run(pipe, inputs, scheduler="ddim").images)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("preset", ["tiny", "toy"])
def test_strength_starts_from_the_noised_init_and_runs_the_last_steps(name, preset):
    schedule = latent_schedule_config(get_preset(preset))
    init, noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)).chunk(2)
    seen = []

    def model(sample, t, cond):
        seen.append((int(t[0]), sample.clone()))
        return cond * 0.1

    cond = (torch.ones_like(init),)
    full_steps = make_scheduler(name, schedule)
    full_steps.set_timesteps(5)
    out = denoise(model, make_scheduler(name, schedule), noise, cond, cond, 1.0, 5, init=init, strength=0.4)
    assert [t for t, _ in seen] == [int(t) for t in full_steps.timesteps[3:]]  # int(5 x 0.4) = 2 steps
    start = make_scheduler(name, schedule)
    start.set_timesteps(5)
    if hasattr(start, "set_begin_index"):
        start.set_begin_index(3)
    t0 = start.timesteps[3:4]
    torch.testing.assert_close(seen[0][1], start.scale_model_input(start.add_noise(init, noise, t0), t0[0]))
    assert torch.isfinite(out).all()
    # strength 1 is the plain run from noise, whatever init is given
    plain = denoise(model, make_scheduler(name, schedule), noise, cond, cond, 1.0, 5)
    torch.testing.assert_close(denoise(model, make_scheduler(name, schedule), noise, cond, cond, 1.0, 5,
                                       init=init, strength=1.0), plain)


def test_refine_strength(pipe, inputs):
    base = _run(pipe, inputs, num_inference_steps=4, return_intermediates=True)
    torch.testing.assert_close(_run(pipe, inputs, num_inference_steps=4, refine_strength=1.0).images, base.images)
    half = _run(pipe, inputs, num_inference_steps=4, refine_strength=0.5)
    torch.testing.assert_close(half.coarse_images, base.coarse_images)  # only the refining stage changes
    assert not torch.allclose(half.images, base.images)
    assert sampler_start(5, 0.6) == 2 and sampler_start(10, 0.3) == 7 and sampler_start(50, 1.0) == 0
    images, src, tgt = inputs
    for bad, match in ((0.0, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]"), (float("nan"), "in"),
                       (0.1, "runs no step; use at least 0.25")):
        with pytest.raises(ValueError, match=match):
            pipe(images, src, tgt, num_inference_steps=4, refine_strength=bad)


def test_prior_schedule_is_cosine_x0():
    sched = make_scheduler("dpmsolver++", prior_schedule_config())
    assert sched.config.beta_schedule == "squaredcos_cap_v2" and sched.config.prediction_type == "sample"
    assert sched.config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match="unknown scheduler 'pndm'"):
        make_scheduler("pndm", prior_schedule_config())


def test_output_types(pipe, inputs):
    out = _run(pipe, inputs, output_type="np")
    assert out.images.shape == (2, 128, 64, 3) and out.images.dtype == np.float32
    pil = _run(pipe, inputs, output_type="pil")
    assert len(pil.images) == 2 and isinstance(pil.images[0], Image.Image) and pil.images[0].size == (64, 128)


def test_bad_inputs_raise_clear_errors(pipe, inputs):
    images, src, tgt = inputs
    with pytest.raises(ValueError, match=r"expects \(128, 64\)"):
        pipe(torch.rand(2, 3, 64, 32), src, tgt)
    with pytest.raises(ValueError, match=r"target_keypoints must have shape \(2, 18, 2\)"):
        pipe(images, src, tgt[:1])
    with pytest.raises(ValueError, match="stages must be one of"):
        pipe(images, src, tgt, stages="B4")
    with pytest.raises(ValueError, match="unknown scheduler"):
        pipe(images, src, tgt, scheduler="heun", num_inference_steps=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe(images * 255, src, tgt)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(images, src, tgt, guidance_scale=(2.0, 2.0))
    no_prior = PCDMsPipeline(None, pipe.inpaint, pipe.refine, pipe.encoders, TINY)
    with pytest.raises(ValueError, match="needs the prior"):
        no_prior(images, src, tgt, stages="full")
    assert no_prior(images, src, tgt, stages="B3", num_inference_steps=1).images.shape == (2, 3, 128, 64)


def test_canvas_conditions_mask_resolution():
    images = torch.rand(3, 3, 128, 64)
    pose, masked, mask = canvas_conditions(images, _keypoints(3, 0), _keypoints(3, 1), 8)
    assert pose.shape == masked.shape == (3, 3, 128, 128) and mask.shape == (3, 1, 16, 16)
    assert pose.min() >= 0 and pose.max() <= 1


def test_save_and_load_pretrained(pipe, inputs, tmp_path):
    pipe.save_pretrained(tmp_path / "pcdms")
    assert (tmp_path / "pcdms" / "model_index.json").is_file()
    loaded = PCDMsPipeline.from_pretrained(tmp_path / "pcdms", encoders=pipe.encoders)
    assert loaded.latent_schedule["beta_schedule"] == "scaled_linear"
    assert torch.equal(_run(loaded, inputs).images, _run(pipe, inputs).images)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        PCDMsPipeline.from_pretrained(tmp_path / "missing", encoders=pipe.encoders)


def test_noise_schedule_and_prediction_type_are_preset_properties():
    """The paper presets keep Sec. 5's SD schedule (epsilon, scaled_linear); the toy preset trains from scratch
    with v-prediction on a cosine schedule rescaled to zero terminal SNR, and the pipeline samples with it."""
    from diffusers import DDPMScheduler

    from pcdms.presets import get_preset

    paper = latent_schedule_config(get_preset("paper"))
    assert paper == latent_schedule_config() and paper["prediction_type"] == "epsilon"
    assert paper["beta_schedule"] == "scaled_linear" and "rescale_betas_zero_snr" not in paper
    toy = latent_schedule_config(get_preset("toy"))
    assert toy["prediction_type"] == "v_prediction" and toy["beta_schedule"] == "squaredcos_cap_v2"
    assert toy["rescale_betas_zero_snr"] and toy["timestep_spacing"] == "trailing"
    assert float(DDPMScheduler.from_config(toy).alphas_cumprod[-1]) == 0.0  # pure noise at t = 999
    for name in ("ddim", "dpmsolver++", "unipc", "euler"):
        sampler = make_scheduler(name, toy)
        sampler.set_timesteps(10)
        assert int(sampler.timesteps[0]) == 999 and sampler.config.prediction_type == "v_prediction"
    tiny = get_preset("tiny")
    pipe = PCDMsPipeline(None, build_model("inpaint", tiny), None, build_encoders(tiny, allow_random=True), tiny)
    assert pipe.latent_schedule == latent_schedule_config(tiny)
