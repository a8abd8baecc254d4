"""The quality tables as markdown: PCDMs Table 1 (one row per generator or baseline) and the
stage ablation (Sec. 4.2: B1, B2, B3, full). Reads only the ``quality.json`` record, so
``reid-aug report`` can show it without loading any network."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

STAGE_NAMES = {"B1": "inpaint only", "B2": "prior + inpaint", "B3": "inpaint + refine", "full": "prior + inpaint + refine"}
#: Column titles, in table order.
TITLES = {"ssim": "SSIM", "ssim_sigma1.2": "SSIM (σ1.2)", "lpips": "LPIPS", "masked_lpips": "masked LPIPS",
          "fid_community": "FID (community)", "fid_standard": "FID (TF-Inception)", "l1": "L1",
          "masked_l1": "masked L1"}
RANDOM_NOTE = "\\* random network weights (smoke run): these columns do not measure anything."


def _fmt(col: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if col.startswith(("fid", "l1", "masked_l1")) and value >= 10 else f"{value:.4f}"


def markdown_table(variants: Mapping[str, Mapping[str, Any]], random_parts: Sequence[str] = ()) -> str:
    """One row per variant (stage settings get their description), a column per metric present;
    columns computed with random network weights are marked ``*`` and explained under the table."""
    cols = [c for c in TITLES if any(c in v for v in variants.values())]
    randomized = set(random_parts) | ({"masked_lpips"} if "lpips" in random_parts else set())
    head = [TITLES[c] + (" *" if c in randomized else "") for c in cols]
    lines = ["| images | pairs | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(cols)]
    for name, v in variants.items():
        label = f"{name} ({STAGE_NAMES[name]})" if name in STAGE_NAMES else name
        lines.append(f"| {label} | {v['pairs']:,} | " + " | ".join(_fmt(c, v.get(c)) for c in cols) + " |")
    if randomized & set(cols):
        lines += ["", RANDOM_NOTE]
    return "\n".join(lines)


def report_blocks(quality_json: str | Path) -> list[str]:
    """Markdown lines for a report: the Table-1 block (baselines, generated folders and ``full``),
    the Table-3 block (the stage settings, when two or more were scored) and the published
    Market-1501 rows of PCDMs Table 1 in their own labelled block."""
    from reid_aug.published import TABLE1_MARKET, TABLE1_SOURCE

    path = Path(quality_json)
    record = json.loads(path.read_text())
    variants, random_parts = record["variants"], record.get("random_weights", [])
    stages = {k: v for k, v in variants.items() if k in STAGE_NAMES}
    main_rows = {k: v for k, v in variants.items() if k not in STAGE_NAMES or k == "full"}
    size = "x".join(str(x) for x in record.get("image_size", []))
    parts = ["", f"## Image quality, Table-1 layout (measured here: `{path}`)", "",
             f"{record['pairs']:,} test pairs at {size}, one sample per pair; FID against the training images. "
             "SSIM, LPIPS and both FIDs follow the protocol in quality.json.", "",
             markdown_table(main_rows, random_parts)]
    if len(stages) >= 2:
        parts += ["", "## Stage ablation, Table-3 layout (PCDMs Sec. 4.2)", "", markdown_table(stages, random_parts)]
    pub = ["| Method | SSIM | LPIPS | FID |", "|---|---:|---:|---:|"]
    pub += [f"| {name} | {s:.4f} | {lp:.4f} | {fid:.3f} |" for name, (s, lp, fid) in TABLE1_MARKET.items()]
    parts += ["", f"## Published image quality ({TABLE1_SOURCE})", "",
              "Copied from the paper, not measured here. The paper names neither its SSIM window nor its FID "
              "network; the PIDM/PCDMs scripts use sigma 1.2 (our σ1.2 column) and the community FID "
              "(DESIGN.md §9).", "", *pub]
    return parts
