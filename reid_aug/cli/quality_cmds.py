"""``reid-aug quality``: SSIM / LPIPS / FID of generated test pairs, PCDMs Table 1 and the stage ablation."""

from __future__ import annotations

from pathlib import Path

import click

from reid_aug.cli.app import main
from reid_aug.cli.config import GuidanceParam
from reid_aug.data.market import DatasetError


def _predictions(generated: tuple[str, ...], baselines: tuple[str, ...]) -> dict[str, str]:
    """``--generated [LABEL=]DIR`` (label default: the folder name) and ``--baseline NAME`` -> label -> source."""
    out: dict[str, str] = {}
    for spec in generated:
        label, sep, folder = spec.partition("=")
        if not sep:
            label, folder = Path(spec).name or spec, spec
        if label in out:
            raise click.BadParameter(f"two predictions are labelled {label!r}; name them LABEL=DIR",
                                     param_hint="--generated")
        out[label] = folder
    for name in baselines:
        out[name] = name
    return out


@main.command("quality")
@click.option("--data", "data_root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Market-style root with the test images (default: the workspace's data).")
@click.option("--pairs", "pairs_csv", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="from,to pairs csv (default ROOT/market-pairs-test.csv).")
@click.option("--poses", "poses_csv", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Annotation csv of the test images (default ROOT/market-annotation-test.csv).")
@click.option("--generated", multiple=True, metavar="[LABEL=]DIR",
              help="A folder of predicted targets (repeatable). Files are found through --mapping, DIR/generated.csv, "
                   "DIR/synthesis.csv or the names <source stem>_synKK.png|jpg of `synthesize --strategy file`.")
@click.option("--mapping", "mapping_csv", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="from,to,file csv naming each pair's predicted image.")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(["copy-source", "toy-oracle"]),
              help="Repeatable. copy-source: the source image as the prediction (the floor); toy-oracle: the toy "
                   "renderer's exact person (toy Market only; the ceiling).")
@click.option("--generate", "pipeline", default=None, metavar="PIPELINE",
              help="Run this PCDMs pipeline folder (or builtin:toy) on the pairs first, into OUT/generated/<stages>/.")
@click.option("--stages", default="full", show_default=True,
              help="With --generate: comma-separated stage settings, e.g. B1,B2,B3,full (the Table-3 ablation).")
@click.option("--steps", type=int, default=50, show_default=True, help="Sampler steps per stage.")
@click.option("--guidance", type=GuidanceParam(), default="2.0", show_default=True,
              help="Classifier-free guidance scale, one for all stages or prior,inpaint,refine.")
@click.option("--refine-strength", type=float, default=1.0, show_default=True,
              help="Refining stage: 1 samples from noise (the paper); below 1 from the noised coarse image (SDEdit).")
@click.option("--scheduler", default="ddim", show_default=True, help="ddim | dpmsolver++ | unipc | euler.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generation noise.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per pipeline/metric call.")
@click.option("--clip-checkpoint", type=click.Path(path_type=Path), default=None, help="OpenCLIP ViT-H/14 checkpoint.")
@click.option("--dino", "dino_path", type=click.Path(path_type=Path), default=None, help="DINOv2 folder.")
@click.option("--vae", "vae_path", type=click.Path(path_type=Path), default=None, help="SD 2.1-base (or VAE) folder.")
@click.option("--lpips-weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="torchvision's AlexNet file alexnet-owt-7be5be79.pth (LPIPS backbone).")
@click.option("--fid-weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="torchvision's Inception-v3 file inception_v3_google-0cc3c7bd.pth (community FID).")
@click.option("--fid-tf-weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (standard TF-Inception FID).")
@click.option("--fid", "fid_variants", default="community,standard", show_default=True,
              help="FID variants to compute (comma-separated), or 'none'; community needs --fid-weights, standard "
                   "--fid-tf-weights (or --allow-random-weights).")
@click.option("--max-pairs", type=int, default=None, help="Score N pairs evenly spaced over the file (default: all).")
@click.option("--allow-random-weights", is_flag=True,
              help="Random networks for metrics (and encoders) without weights: smoke runs and tests ONLY.")
@click.option("--device", default=None, help="torch device (default cuda if available, else cpu).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Output folder (default: quality/ in the workspace).")
@click.option("--overwrite", is_flag=True, help="Replace generated images made with other settings.")
def quality_cmd(data_root, pairs_csv, poses_csv, generated, mapping_csv, baselines, pipeline, stages, steps, guidance,
                refine_strength, scheduler, seed, batch_size, clip_checkpoint, dino_path, vae_path, lpips_weights,
                fid_weights,
                fid_tf_weights, fid_variants, max_pairs, allow_random_weights, device, out, overwrite) -> None:
    """Score predicted target images of test pairs against the real targets (PCDMs Table 1 protocol).

    \b
    OUT/quality.csv    one row per variant and pair: SSIM (sigma 1.5 and 1.2), LPIPS, masked
                       LPIPS, L1, masked L1
    OUT/quality.json   means, FID (community and TF-Inception, against the training images),
                       protocol, package versions, weight hashes
    OUT/quality.md     the table (also printed); `reid-aug report` shows it for a workspace
    OUT/generated/     with --generate: the images, one folder per --stages setting (resumable)
    \b
    Example, the stage ablation (Table 3) with the floor, as a smoke run (random metric networks):
      reid-aug quality --generate builtin:toy --stages B1,B2,B3,full --steps 20 --baseline copy-source \\
        --allow-random-weights
    """
    from pcdms.devices import resolve_device
    from pcdms.io import FolderBusyError
    from reid_aug.quality.job import QualityError, QualitySettings, quality_job, read_test_pairs
    from reid_aug.synthesis import SynthesisConfig, SynthesisError

    if data_root is None or out is None:
        from reid_aug.cli.workspace_cmds import load_workspace

        ws = load_workspace()
        data_root = data_root or ws.config.data
        out = out or ws.root / "quality"
    fid = () if fid_variants.strip() == "none" else tuple(v.strip() for v in fid_variants.split(",") if v.strip())
    try:
        device = str(resolve_device(device))
        settings = QualitySettings(lpips_weights, fid_weights, fid_tf_weights, allow_random_weights, fid, max_pairs,
                                   batch_size, device)
        predictions = _predictions(generated, baselines)
        pairs = read_test_pairs(data_root, pairs_csv, poses_csv, max_pairs)
        cfg, stage_list = None, ["full"]
        if pipeline is not None:
            stage_list = [s.strip() for s in stages.split(",") if s.strip()]
            cfg = SynthesisConfig(pipeline=pipeline, clip_checkpoint=clip_checkpoint, dino_path=dino_path,
                                  vae_path=vae_path, allow_random_weights=allow_random_weights,
                                  num_inference_steps=steps, guidance_scale=guidance,
                                  refine_strength=refine_strength, scheduler=scheduler, seed=seed,
                                  batch_size=batch_size, device=device)
            from pcdms.pipeline import STAGES

            unknown = [st for st in stage_list if st not in STAGES]
            if unknown or not stage_list:
                raise click.BadParameter(f"{unknown or stages!r}: choose from {', '.join(STAGES)}",
                                         param_hint="--stages")
        elif stages != "full":
            raise click.UsageError("--stages applies to --generate")
        elif not predictions:
            raise click.UsageError("nothing to score: give --generated DIR, --generate PIPELINE and/or --baseline")
        record = quality_job(data_root, out, predictions, settings, pairs, cfg, stage_list, overwrite=overwrite,
                             mapping_csv=mapping_csv, log=click.echo)
    except (QualityError, DatasetError, SynthesisError, FolderBusyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    from reid_aug.quality.table import generation_line, markdown_table

    if record.get("generation"):
        click.echo(generation_line(record["generation"]))
    click.echo(markdown_table(record["variants"], record["random_weights"]))
    click.echo(f"{out}: quality.csv, quality.json, quality.md ({record['pairs']:,} pairs)")
