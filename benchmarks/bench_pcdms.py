"""Time PCDMs sampling (Shen et al., ICLR 2024, Sec. 3.2-3.4) per stage and end to end, random weights.

On one H100 (paper sizes: SD 2.1-base UNets, 20-layer prior, ViT-H/14, DINOv2-G, SD VAE):

    python benchmarks/bench_pcdms.py --device cuda --preset paper --batch 32 --dtype bfloat16 --steps 50

A trained generator instead of random weights (any device; the demo's synthesis setting):

    python benchmarks/bench_pcdms.py --pipeline builtin:toy --batch 64 --dtype float32 --steps 5 \
        --guidance 2,2,1 --refine-strength 0.4 --threads 2

On CPU (the tiny preset only; the paper preset, 4.6 B parameters = 9.2 GB in bfloat16, 18.5 GB in
float32, would take hours per call there, so it is refused):

    python benchmarks/bench_pcdms.py --device cpu --preset tiny --batch 32 --dtype float32 --steps 50 --threads 2

How the stages are timed: each timed call is one real ``PCDMsPipeline.__call__`` with
``stages="full"``; a clock wrapped around three of its parts (the CLIP encoder, the
``_denoise`` loop, the VAE decoder) synchronises the device and reads the time at the
stage boundaries, so the three stages come out of the same call and add up to it:

- stage 1, prior: from the CLIP image embedding of the source, through the pose
  vectors, to the end of the prior loop;
- stage 2, inpainting: the rest up to the decoded canvas: noise draw, DINOv2 tokens,
  pose and masked canvases (skeletons are drawn on the CPU), the VAE encode of the
  masked canvas, the inpainting loop, the VAE decode of the canvas;
- stage 3, refining: from there to the end: the VAE encode of the coarse image, the
  refining loop, the final VAE decode and the output conversion.

(Timing the ablations B1/B2/B3 and subtracting was tried first: a stage as small as
the tiny prior drowns in the run-to-run noise of the others and comes out negative.)

One warm-up call (kernel selection, allocator, lazy CUDA init), then ``--repeats``
timed calls; the median of each figure is kept. images/s = batch / seconds. The
handful of synchronisations per call cost nothing next to 3 x 50 network steps.
Weights are random (speed does not depend on their values). Peak GPU memory is
``torch.cuda.max_memory_allocated`` over all calls. Classifier-free guidance as in
the paper (w = 2: one batched forward pass of 2 x batch per step), DDIM.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import pcdms
from _results import device_name, print_json, record, resolve_device
from pcdms.encoders import build_encoders
from pcdms.pipeline import SCHEDULERS, PCDMsPipeline
from reid_aug.generators import resolve_pipeline
from reid_aug.synthesis import guidance_text, parse_guidance

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# A standing person, OpenPose-18 order, as fractions of (W, H): keypoints the skeleton drawer sees as real limbs.
_POSE = np.array([
    (0.50, 0.12), (0.50, 0.20), (0.35, 0.21), (0.30, 0.35), (0.28, 0.48), (0.65, 0.21), (0.70, 0.35),
    (0.72, 0.48), (0.42, 0.50), (0.41, 0.70), (0.40, 0.90), (0.58, 0.50), (0.59, 0.70), (0.60, 0.90),
    (0.47, 0.10), (0.53, 0.10), (0.44, 0.11), (0.56, 0.11),
])


def random_keypoints(rng: np.random.Generator, batch: int, height: int, width: int) -> np.ndarray:
    """(batch, 18, 2) int pixel (x, y): the template jittered, ~10 % of joints missing (-1)."""
    xy = _POSE[None] + rng.normal(0, 0.03, (batch, 18, 2))
    px = np.rint(np.clip(xy, 0, 1) * [width - 1, height - 1]).astype(np.int64)
    px[rng.random((batch, 18)) < 0.1] = -1
    return px


def build_pipeline(preset_name: str, device: torch.device, dtype: torch.dtype) -> PCDMsPipeline:
    """The three stage networks and the frozen encoders of ``preset_name``, random weights, on ``device``."""
    preset = pcdms.get_preset(preset_name)
    # Build directly on the device: random init of the paper sizes (4.6 B parameters) takes minutes on CPU.
    with torch.device(device):
        prior, inpaint, refine = (pcdms.build_model(stage, preset) for stage in ("prior", "inpaint", "refine"))
        encoders = build_encoders(preset, allow_random=True, device=device, dtype=dtype)
    pipe = PCDMsPipeline(prior, inpaint, refine, encoders, preset)
    pipe.to(device=device, dtype=dtype)
    for model in (prior, inpaint, refine):
        model.eval()
    return pipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Synchronised timestamps at the stage boundaries of a pipeline call (see the module docstring).

    Wraps ``pipe.encoders.clip`` (hooks), ``pipe._denoise`` and ``pipe.encoders.vae.decode``
    (instance attributes); the pipeline code itself is unchanged.
    """

    def __init__(self, pipe: PCDMsPipeline, device: torch.device):
        self.device = device
        self.marks: dict[str, float] = {}
        pipe.encoders.clip.register_forward_pre_hook(lambda *_: self.mark("clip_start"))
        denoise, decode = pipe._denoise, pipe.encoders.vae.decode

        def timed_denoise(*args, **kwargs):
            name = args[7]  # "inpaint" | "refine": the loop's name argument
            if name == "inpaint":  # the prior samples through sample_prior, which ends right before this loop
                self.mark("prior_end")
            self.mark(f"{name}_start")
            out = denoise(*args, **kwargs)
            self.mark(f"{name}_end")
            return out

        def timed_decode(*args, **kwargs):
            out = decode(*args, **kwargs)
            self.mark("canvas_decode_end")  # the first decode is the canvas's; the final one is the call's end
            return out

        pipe._denoise = timed_denoise
        pipe.encoders.vae.decode = timed_decode

    def mark(self, name: str, keep_first: bool = True) -> None:
        _sync(self.device)
        if not (keep_first and name in self.marks):
            self.marks[name] = time.perf_counter()

    def time_call(self, call) -> dict[str, float]:
        """Run ``call()`` (one full pipeline call); seconds of each stage and of the whole call."""
        self.marks = {}
        self.mark("start")
        call()
        self.mark("end")
        m = self.marks
        missing = {"clip_start", "prior_end", "canvas_decode_end"} - set(m)
        if missing:
            raise RuntimeError(f"PCDMsPipeline.__call__ no longer passes through {sorted(missing)}; "
                               "update StageClock to its new structure")
        prior = m["prior_end"] - m["clip_start"]
        return {"stage1_prior": prior, "stage2_inpaint": m["canvas_decode_end"] - m["start"] - prior,
                "stage3_refine": m["end"] - m["canvas_decode_end"], "full": m["end"] - m["start"]}


def time_pipeline(pipe, inputs, args, device: torch.device) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Warm-up + ``args.repeats`` timed full calls; (median seconds per figure, every call's seconds)."""
    images, src_kp, tgt_kp = inputs
    clock = StageClock(pipe, device)

    def call():
        gen = torch.Generator(device).manual_seed(0)
        out = pipe(images, src_kp, tgt_kp, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   generator=gen, stages="full", scheduler=args.scheduler, refine_strength=args.refine_strength)
        if not torch.isfinite(out.images).all():  # random weights in half precision may overflow
            print("warning: non-finite output images (random weights); timings still valid", flush=True)

    clock.time_call(call)  # warm-up
    runs = [clock.time_call(call) for _ in range(args.repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["paper", "tiny"], default=None,
                        help="stage/encoder sizes (default: paper on CUDA, tiny on CPU)")
    parser.add_argument("--batch", type=int, default=32, help="source images per pipeline call (default 32)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps per stage (paper: 50)")
    parser.add_argument("--pipeline", default=None,
                        help="a trained generator folder or builtin:toy instead of a preset's random weights")
    parser.add_argument("--guidance", type=parse_guidance, default=2.0,
                        help="classifier-free guidance w, or prior,inpaint,refine (paper: 2.0)")
    parser.add_argument("--refine-strength", type=float, default=1.0,
                        help="refining stage from noise (1, the paper) or from the noised coarse image (< 1)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls, median kept (default 3)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the inputs")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    device = resolve_device(parser, args.device, args.threads)
    cuda = device.type == "cuda"
    preset_name = args.preset or ("paper" if cuda else "tiny")
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    if args.pipeline is not None and args.preset is not None:
        parser.error("--pipeline brings its own preset; leave out --preset")
    if preset_name == "paper" and not cuda and args.pipeline is None:
        parser.error("the paper preset (4.6 B parameters) takes hours per call on CPU; use --preset tiny or a GPU")
    if args.batch < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--batch, --steps and --repeats must be >= 1")

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    if args.pipeline is not None:
        folder = resolve_pipeline(args.pipeline)
        pipe = PCDMsPipeline.from_pretrained(folder, device=device, dtype=DTYPES[dtype_name])
        preset_name = pipe.preset.name
    else:
        pipe = build_pipeline(preset_name, device, DTYPES[dtype_name])
    build_s = time.perf_counter() - start
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    h, w = pipe.preset.image_size
    rng = np.random.default_rng(args.seed)
    images = torch.rand(args.batch, 3, h, w, generator=torch.Generator().manual_seed(args.seed)).to(device)
    inputs = (images, random_keypoints(rng, args.batch, h, w), random_keypoints(rng, args.batch, h, w))

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sec, runs = time_pipeline(pipe, inputs, args, device)
    ips = {k: args.batch / v for k, v in sec.items()}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    for k in sec:
        print(f"{k}: {sec[k]:.3f} s per batch of {args.batch}, {ips[k]:.2f} img/s", flush=True)
    settings = (f"preset {preset_name}, batch {args.batch}, {dtype_name}, {args.steps} {args.scheduler} steps/stage, "
                f"CFG w {guidance_text(args.guidance)}"
                + (f", refine strength {args.refine_strength:g}" if args.refine_strength != 1.0 else "")
                + (f", weights {args.pipeline}" if args.pipeline else ", random weights")
                + f", median of {args.repeats} after 1 warm-up"
                + (f", peak GPU mem {peak:.1f} GiB (weights {weights_gib:.1f} GiB)" if cuda else ""))
    name = device_name(device)
    print_json({
        "benchmark": "bench_pcdms", "device": name, "preset": preset_name, "batch": args.batch, "dtype": dtype_name,
        "steps": args.steps, "scheduler": args.scheduler, "guidance": guidance_text(args.guidance),
        "refine_strength": args.refine_strength, "pipeline": args.pipeline, "repeats": args.repeats,
        "build_seconds": build_s, "weights_gib": weights_gib, "peak_mem_gib": peak,
        "stage_seconds": sec, "images_per_s": ips, "runs": runs,
    })
    rows = [
        ("bench_pcdms stage 1 prior (CLIP embed + prior loop)", "stage1_prior"),
        ("bench_pcdms stage 2 inpaint (encode + loop + decode)", "stage2_inpaint"),
        ("bench_pcdms stage 3 refine (encode + loop + decode)", "stage3_refine"),
        ("bench_pcdms full pipeline", "full"),
    ]
    record([(bench, f"{ips[key]:.2f} img/s ({sec[key]:.3f} s/batch)", settings) for bench, key in rows],
           name, args.no_write)


if __name__ == "__main__":
    main()
