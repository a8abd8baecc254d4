"""The Table-2 report of a fraction sweep: markdown, CSV, LaTeX (booktabs) and a PNG plot.

Reads the layout :mod:`reid_aug.sweep` writes::

    RUN_DIR/manifest.json                          experiment config (protocol header)
    RUN_DIR/runs/<method>/frac<F>/seed<S>/metrics.json

``<F>`` is the fraction formatted with ``:g`` (``frac0.2``, ``frac1``). A cell
without ``metrics.json`` is unfinished and left out (the report counts them).
Rows are Standard and every augmentation method found, columns the real-data
fractions, cells "mean ± std" in percent over seeds. ``±`` is the sample
standard deviation (ddof 1); a cell with a single seed shows its value alone,
since a spread of one run is undefined rather than 0. The paper's published
figures (:mod:`reid_aug.published`) appear in their own labelled block, never
in our rows.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from pcdms.io import atomic_path, read_json_object, write_text_atomic
from reid_aug.evaluate import METRICS_NAME
from reid_aug.layout import STANDARD, fraction_dirname, seed_dirname
from reid_aug.manifest import MANIFEST_NAME, read_manifest
from reid_aug.published import BOT_MARKET, BOT_SOURCE, TABLE2_FRACTIONS, TABLE2_RANK1, TABLE2_SOURCE, display_name

CONFIG_BLOCK_START = "<details><summary>Full experiment config (run manifest)</summary>"
CONFIG_BLOCK_END = "</details>"

METRIC_COLUMNS = ("rank1", "rank5", "rank10", "mAP", "mINP")
TABLE_METRICS = (("rank1", "Rank-1"), ("mAP", "mAP"))
_FRAC_RE = re.compile(r"^frac(\d+(?:\.\d+)?(?:e-?\d+)?)$")
_SEED_RE = re.compile(r"^seed(\d+)$")


class ReportError(ValueError):
    """A run folder does not have the layout or contents the report expects."""


def _entries(folder: Path) -> list[Path]:
    # Hidden names (.DS_Store, interrupted atomic writes) are not part of the layout.
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _subdirs(folder: Path, what: str) -> list[Path]:
    out = []
    for p in _entries(folder):
        if not p.is_dir():
            raise ReportError(f"{p}: unexpected file; {folder} should hold only {what} folders")
        out.append(p)
    return out


def _parse_fraction(path: Path) -> float:
    m = _FRAC_RE.match(path.name)
    value = float(m.group(1)) if m else math.nan
    # The name must be the canonical f"frac{f:g}", so "frac0.20" cannot duplicate "frac0.2".
    if not m or not 0.0 < value <= 1.0 or fraction_dirname(value) != path.name:
        raise ReportError(f"{path}: expected a fraction folder named like 'frac0.2' or 'frac1' (fraction in (0, 1])")
    return value


def _parse_seed(path: Path) -> int:
    m = _SEED_RE.match(path.name)
    if not m or seed_dirname(int(m.group(1))) != path.name:
        raise ReportError(f"{path}: expected a seed folder named like 'seed0'")
    return int(m.group(1))


def _read_metrics(path: Path) -> dict[str, Any]:
    try:
        data = read_json_object(path)
    except (OSError, ValueError) as exc:
        raise ReportError(f"unreadable metrics file: {exc}") from None
    row: dict[str, Any] = {}
    for key in METRIC_COLUMNS:
        value = data.get(key)
        if value is None and key in ("rank1", "mAP"):
            raise ReportError(f"{path}: missing '{key}'")
        if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ReportError(f"{path}: '{key}' must be a fraction in [0, 1], got {value!r}")
        row[key] = math.nan if value is None else float(value)
    rerank = data.get("rerank") or {}
    row["rerank_rank1"] = float(rerank.get("rank1", math.nan))
    row["rerank_mAP"] = float(rerank.get("mAP", math.nan))
    row["num_valid_queries"] = data.get("num_valid_queries")
    row["protocol"] = data.get("protocol")
    row["distance"] = data.get("distance")
    row["flip"] = data.get("flip")
    return row


def scan_cells(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """(finished cell rows, unfinished cell folders) under ``run_dir/runs``; strict on folder names."""
    runs = Path(run_dir) / "runs"
    if not runs.is_dir():
        raise ReportError(f"{runs}: no runs folder; expected RUN_DIR/runs/<method>/frac<F>/seed<S>/metrics.json")
    rows, unfinished = [], []
    for method_dir in _subdirs(runs, "method"):
        for frac_dir in _subdirs(method_dir, "frac<F>"):
            fraction = _parse_fraction(frac_dir)
            for seed_dir in _subdirs(frac_dir, "seed<S>"):
                seed = _parse_seed(seed_dir)
                metrics = seed_dir / METRICS_NAME
                if not metrics.is_file():
                    unfinished.append(seed_dir)
                    continue
                row = {"method": method_dir.name, "fraction": fraction, "seed": seed}
                row.update(_read_metrics(metrics))
                row["path"] = str(metrics)
                rows.append(row)
    return rows, unfinished


def collect_results(run_dir: str | Path) -> pd.DataFrame:
    """One row per finished cell: method, fraction, seed, rank1, rank5, rank10, mAP, mINP (fractions),
    rerank_rank1, rerank_mAP (NaN without re-ranking), num_valid_queries, protocol, distance, flip, path.

    Sorted by method (standard first), fraction, seed. Unexpected folder names raise
    :class:`ReportError` naming the path; unfinished cells (no metrics.json) are left out.
    """
    rows, _ = scan_cells(run_dir)
    columns = ["method", "fraction", "seed", *METRIC_COLUMNS, "rerank_rank1", "rerank_mAP",
               "num_valid_queries", "protocol", "distance", "flip", "path"]
    df = pd.DataFrame(rows, columns=columns)
    if df.empty:
        return df
    df["_order"] = df["method"] != STANDARD
    return df.sort_values(["_order", "method", "fraction", "seed"]).drop(columns="_order").reset_index(drop=True)


def _read_manifest(run_dir: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(run_dir)
    except (OSError, ValueError) as exc:
        raise ReportError(f"unreadable run manifest: {exc}") from None


def _method_order(df: pd.DataFrame, manifest: dict[str, Any] | None) -> list[str]:
    found = list(dict.fromkeys(df["method"]))
    declared = [m.get("name") for m in ((manifest or {}).get("config") or {}).get("methods") or [] if isinstance(m, dict)]
    ordered = [STANDARD] if STANDARD in found else []
    ordered += [m for m in declared if m in found and m not in ordered]
    return ordered + sorted(m for m in found if m not in ordered)


def summarize(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """(method, fraction) -> mean, std (ddof 1; NaN for one seed), n of ``metric`` in percent."""
    g = df.groupby(["method", "fraction"])[metric]
    out = pd.DataFrame({"mean": g.mean() * 100.0, "std": g.std(ddof=1) * 100.0, "n": g.count()})
    return out.reset_index()


def _cell(mean: float, std: float, n: int, pm: str = "±") -> str:
    if n == 0 or math.isnan(mean):
        return "–"
    return f"{mean:.1f}" if n < 2 or math.isnan(std) else f"{mean:.1f} {pm} {std:.1f}"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _grid(summary: pd.DataFrame, methods: list[str], fractions: list[float], pm: str = "±") -> list[list[str]]:
    index = {(r.method, r.fraction): r for r in summary.itertuples()}
    rows = []
    for m in methods:
        cells = [_cell(index[(m, f)].mean, index[(m, f)].std, index[(m, f)].n, pm) if (m, f) in index else "–"
                 for f in fractions]
        rows.append([display_name(m), *cells])
    return rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _flatten(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={v}")
    return out


def _budget_line(bot: dict[str, Any], methods: list) -> str:
    """The training-budget rule that makes Standard and augmented rows comparable (or says they are not)."""
    shares = sorted({str(m.get("synthetic_share")) for m in methods
                     if isinstance(m, dict) and m.get("synthetic_share") is not None})
    if shares:
        return (f"- Budget: a fixed share of every batch is synthetic ({', '.join(shares)}), the rest real; an epoch "
                "is the real subset's, so augmented runs make the Standard run's optimizer steps")
    if bot.get("epoch_steps", "all") == "real":
        return ("- Budget: real and synthetic images pooled; an epoch has as many batches as the real subset alone "
                "gives (`epoch_steps: real`), so augmented runs make the Standard run's optimizer steps and drop "
                "the lr at the same steps: a gain is not longer training")
    return ("- Budget: real and synthetic images pooled and every image seen once per epoch (`epoch_steps: all`): "
            "augmented runs make **more optimizer steps** than Standard, so part of a gain may be longer training")


def _protocol_lines(run_dir: Path, df: pd.DataFrame, manifest: dict[str, Any] | None) -> list[str]:
    lines = []
    if manifest is None:
        lines.append(f"- Run manifest: **missing** ({run_dir / MANIFEST_NAME}); the training protocol is unknown.")
        config: dict[str, Any] = {}
    else:
        config = manifest.get("config") or {}
        data = (manifest.get("sources") or {}).get("data") or config.get("data")
        facts = [manifest.get("layout")]
        if manifest.get("num_train_images") is not None:
            facts.append(f"{manifest['num_train_images']:,} training images")
        if manifest.get("num_train_pids") is not None:
            facts.append(f"{manifest['num_train_pids']:,} identities")
        lines.append(f"- Dataset: `{data}` ({', '.join(str(f) for f in facts if f)})")
        bot = config.get("bot")
        if isinstance(bot, dict):
            lines.append("- BoT: " + ", ".join(_flatten(bot)))
        if config.get("methods"):
            lines.append(_budget_line(bot if isinstance(bot, dict) else {}, config["methods"]))
        for m in config.get("methods") or []:
            if isinstance(m, dict):
                rest = {k: v for k, v in m.items() if k != "name"}
                lines.append(f"- Method `{m.get('name')}`: " + ", ".join(_flatten(rest)))
                kept = _kept_line(run_dir, str(m.get("name")))
                if kept:
                    lines.append(kept)
        lines.append(f"- Created {manifest.get('created')}, git commit {manifest.get('git_commit')}")
    return lines + _evaluation_lines(df)


def _kept_line(run_dir: Path, method: str) -> str | None:
    """What the identity filter kept of a method's synthetic images, per cell (None: no filtered cell)."""
    cells = []
    for path in sorted((run_dir / "filtered" / method).glob("*/*/" + MANIFEST_NAME)):
        data = read_json_object(path)
        if data.get("complete"):
            cells.append((path.parent.parent.name, path.parent.name, data["kept"], data["images"]))
    if not cells:
        return None
    kept, total = sum(c[2] for c in cells), sum(c[3] for c in cells)
    per_cell = ", ".join(f"{f}/{s} {100 * k / max(1, n):.0f} %" for f, s, k, n in cells)
    return (f"- Method `{method}`: the identity filter kept {kept:,} of {total:,} synthetic images "
            f"({100 * kept / max(1, total):.1f} %; {per_cell}); its rows train on the kept ones only")


def _evaluation_lines(df: pd.DataFrame, rerank_shown: str = "tables show the plain ranking") -> list[str]:
    """How the rows of ``df`` were evaluated (protocol, distance, flip, re-ranking), and a warning if mixed."""
    protocols = sorted({str(p) for p in df["protocol"].dropna()})
    distances = sorted({str(p) for p in df["distance"].dropna()})
    flips = sorted({str(p) for p in df["flip"].dropna()})
    lines = [f"- Evaluation: {'; '.join(protocols) or 'protocol not recorded in metrics.json'}"
             + (f"; distance {', '.join(distances)}" if distances else "")
             + (f"; flip-averaged features {', '.join(flips)}" if flips else "")
             + f"; re-ranked results {'also computed' if df['rerank_rank1'].notna().any() else 'not computed'}"
             f" ({rerank_shown})"]
    if len(protocols) > 1:
        lines.append("- **Warning**: cells were evaluated under different protocols; the table mixes them.")
    return lines


def _markdown(run_dir: Path, df: pd.DataFrame, unfinished: list[Path], manifest, methods, fractions) -> str:
    parts = [
        "# Re-ID with synthetic training data: Table-2 layout",
        "",
        f"Run folder `{run_dir}`: {len(df)} finished cells, {len(unfinished)} unfinished (left out).",
        "",
        "## Protocol run here",
        "",
        *_protocol_lines(run_dir, df, manifest),
    ]
    header = ["Method", *(_pct(f) for f in fractions)]
    for metric, title in TABLE_METRICS:
        parts += ["", f"## Ours: {title} (%), mean ± std over seeds", "",
                  _md_table(header, _grid(summarize(df, metric), methods, fractions))]
    seeds = df.groupby(["method", "fraction"])["seed"].count()
    parts += ["", f"Columns: share of the real training images used. ± is the sample standard deviation over seeds; "
              f"a cell from a single seed shows its value alone. Seeds per cell: {seeds.min()}–{seeds.max()}."]
    if df["rerank_rank1"].notna().any():
        parts += ["Re-ranked (k-reciprocal) figures are in results.csv (rerank_rank1, rerank_mAP)."]
    pub_header = ["Method", *(_pct(f) for f in TABLE2_FRACTIONS)]
    pub_rows = [[name, *(f"{v:.1f}" for v in values)] for name, values in TABLE2_RANK1.items()]
    bot = "; ".join(f"{k}: Rank-1 {v['rank1']:.1f}, mAP {v['mAP']:.1f}" for k, v in BOT_MARKET.items())
    parts += [
        "",
        f"## Published figures ({TABLE2_SOURCE})",
        "",
        "Copied from the paper, not measured here; shown for comparison only.",
        "",
        _md_table(pub_header, pub_rows),
        "",
        f"{BOT_SOURCE}: {bot}.",
        "",
        "The paper's Standard row at 100 % (76.7) is far below BoT's own published 94.1 with the same network, "
        "and the paper does not say which training schedule or evaluation it used. Compare trends "
        "(the gain from synthetic images at each fraction), not absolute values.",
    ]
    if manifest is not None:
        parts += ["", CONFIG_BLOCK_START, "", "```json",
                  json.dumps(manifest.get("config"), indent=2, default=str), "```", "", CONFIG_BLOCK_END]
    return "\n".join(parts) + "\n"


def without_config_block(markdown: str, note: str) -> str:
    """``markdown`` (a report.md) with its collapsed full-config block replaced by ``note``: the
    tables for a terminal, where the long JSON would push them off screen."""
    start = markdown.find(CONFIG_BLOCK_START)
    if start < 0:
        return markdown
    end = markdown.index(CONFIG_BLOCK_END, start) + len(CONFIG_BLOCK_END)
    return markdown[:start] + note + markdown[end:]


def _latex(run_dir: Path, df: pd.DataFrame, methods, fractions) -> str:
    ncol = 1 + len(fractions)

    def esc(s: str) -> str:
        return re.sub(r"([_%&#$])", r"\\\1", s)

    lines = [
        f"% Generated by `reid-aug report` from {esc(str(run_dir))}. Needs \\usepackage{{booktabs}}.",
        "\\begin{table}[t]",
        "\\centering",
        "\\caption{Re-ID on the query/gallery split with a fraction of the real training images: "
        "Rank-1 and mAP (\\%), mean $\\pm$ std over seeds.}",
        "\\begin{tabular}{l" + "c" * len(fractions) + "}",
        "\\toprule",
        "Method & " + " & ".join(esc(_pct(f)) for f in fractions) + " \\\\",
    ]
    for metric, title in TABLE_METRICS:
        lines += ["\\midrule", f"\\multicolumn{{{ncol}}}{{l}}{{\\emph{{{title}}}}} \\\\"]
        for row in _grid(summarize(df, metric), methods, fractions, pm="$\\pm$"):
            lines.append(" & ".join([esc(row[0]), *(c.replace("–", "--") for c in row[1:])]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def _wide_csv(df: pd.DataFrame, metric: str, methods, fractions) -> str:
    summary = summarize(df, metric)
    index = {(r.method, r.fraction): r for r in summary.itertuples()}
    rows = []
    for m in methods:
        row: dict[str, Any] = {"method": m}
        for f in fractions:
            r = index.get((m, f))
            row[f"frac{f:g}_mean_pct"] = None if r is None else round(r.mean, 4)
            row[f"frac{f:g}_std_pct"] = None if r is None or math.isnan(r.std) else round(r.std, 4)
            row[f"frac{f:g}_n"] = 0 if r is None else int(r.n)
        rows.append(row)
    return pd.DataFrame(rows).to_csv(index=False)


def _plot(path: Path, df: pd.DataFrame, methods, fractions) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, (metric, title) in zip(axes, TABLE_METRICS):
        summary = summarize(df, metric)
        for m in methods:
            s = summary[summary["method"] == m].sort_values("fraction")
            ax.errorbar(100 * s["fraction"], s["mean"], yerr=s["std"].fillna(0.0), marker="o", capsize=3,
                        color=colors[m], label=display_name(m))
        ax.set_title(f"{title} on query/gallery")
        ax.set_xlabel("real training images used (%)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_xticks([100 * f for f in sorted(set(fractions) | set(TABLE2_FRACTIONS))])
        ax.grid(alpha=0.3)
    # The paper reports Rank-1 only, so its lines go on the Rank-1 panel alone.
    spare = iter(f"C{i}" for i in range(len(methods), len(methods) + 10))
    for name, key in (("Standard", STANDARD), ("PCDMs", "pcdms")):
        color = colors.get(key) or next(spare)
        axes[0].plot([100 * f for f in TABLE2_FRACTIONS], TABLE2_RANK1[name], linestyle="--", marker="x",
                     color=color, alpha=0.8, label=f"{name} (paper)")
    handles, labels = axes[0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i].endswith("(paper)"))
    axes[0].legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="lower right")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("Re-ID vs share of real training data (mean ± std over seeds; dashed: Shen et al. 2024, Table 2)",
                 fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def collect_folder(folder: str | Path) -> pd.DataFrame:
    """One row per ``metrics.json`` anywhere under ``folder`` (a ``train-bot``/``evaluate`` folder,
    or any folder of them): ``run`` (its folder relative to ``folder``, "." for ``folder`` itself),
    the metric columns of :func:`collect_results`, and ``path``; sorted by ``run``. Files under a
    ``report`` folder are skipped (a report's own output). ReportError when there is none."""
    folder = Path(folder)
    rows = []
    for path in sorted(folder.rglob(METRICS_NAME)):
        rel = path.parent.relative_to(folder)
        if "report" in rel.parts:
            continue
        rows.append({"run": str(rel), **_read_metrics(path), "path": str(path)})
    if not rows:
        raise ReportError(f"{folder}: no {METRICS_NAME} in it or below (an evaluate/train-bot folder or a sweep's "
                          "RUN_DIR/runs/<method>/frac<F>/seed<S>/ is expected)")
    return pd.DataFrame(rows)


def _flat_markdown(folder: Path, df: pd.DataFrame) -> str:
    names = [("rank1", "Rank-1"), ("rank5", "Rank-5"), ("rank10", "Rank-10"), ("mAP", "mAP"), ("mINP", "mINP"),
             ("rerank_rank1", "Rank-1 (re-ranked)"), ("rerank_mAP", "mAP (re-ranked)")]
    shown = [(k, label) for k, label in names if df[k].notna().any()]
    rows = [[f"`{r['run']}`", *("" if math.isnan(r[k]) else f"{100 * r[k]:.1f}" for k, _ in shown)]
            for _, r in df.iterrows()]
    return "\n".join([
        "# Re-ID results", "", f"Folder `{folder}`: {len(df)} evaluated model(s); metrics in %.", "",
        _md_table(["Run", *(label for _, label in shown)], rows), "",
        *_evaluation_lines(df, "in their own columns when computed"),
        "- Published figures for comparison: see a sweep's report (Table-2 layout).", ""])


def _quality_markdown(run_dir: Path) -> str:
    """The image-quality blocks of every ``quality.json`` in ``RUN_DIR/quality*/`` ("" when none)."""
    from reid_aug.quality.table import report_blocks

    files = sorted(p / "quality.json" for p in run_dir.glob("quality*") if (p / "quality.json").is_file())
    return "".join("\n".join(report_blocks(f)) + "\n" for f in files)


def make_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the report of ``run_dir`` into ``out_dir`` (default ``RUN_DIR/report``).

    A sweep (``RUN_DIR/runs`` exists) gets the Table-2 report: ``{"markdown": report.md,
    "results_csv": results.csv, "table_rank1_csv": table_rank1.csv, "table_map_csv": table_mAP.csv,
    "latex": table.tex, "plot": curves.png}``. Any other folder gets one row per ``metrics.json``
    found in it or below (:func:`collect_folder`): ``{"markdown", "results_csv"}``. Image-quality
    results (``RUN_DIR/quality*/quality.json`` of ``reid-aug quality``) add the Table-1 and
    Table-3 blocks to report.md (a folder with only those gets just them). Written atomically.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    quality = _quality_markdown(run_dir)
    if not (run_dir / "runs").is_dir():
        paths = {"markdown": out / "report.md"}
        try:
            flat = collect_folder(run_dir)
        except ReportError:
            if not quality:
                raise
            write_text_atomic(paths["markdown"], f"# Image quality\n{quality}")
            return paths
        paths["results_csv"] = out / "results.csv"
        write_text_atomic(paths["markdown"], _flat_markdown(run_dir, flat) + quality)
        write_text_atomic(paths["results_csv"], flat.to_csv(index=False))
        return paths
    df = collect_results(run_dir)
    _, unfinished = scan_cells(run_dir)
    if df.empty:
        raise ReportError(f"{run_dir / 'runs'}: no finished cell (no metrics.json) to report")
    manifest = _read_manifest(run_dir)
    methods = _method_order(df, manifest)
    fractions = sorted(df["fraction"].unique().tolist())
    paths = {
        "markdown": out / "report.md",
        "results_csv": out / "results.csv",
        "table_rank1_csv": out / "table_rank1.csv",
        "table_map_csv": out / "table_mAP.csv",
        "latex": out / "table.tex",
        "plot": out / "curves.png",
    }
    write_text_atomic(paths["markdown"], _markdown(run_dir, df, unfinished, manifest, methods, fractions) + quality)
    write_text_atomic(paths["results_csv"], df.to_csv(index=False))
    write_text_atomic(paths["table_rank1_csv"], _wide_csv(df, "rank1", methods, fractions))
    write_text_atomic(paths["table_map_csv"], _wide_csv(df, "mAP", methods, fractions))
    write_text_atomic(paths["latex"], _latex(run_dir, df, methods, fractions))
    _plot(paths["plot"], df, methods, fractions)
    return paths


__all__ = ["ReportError", "collect_folder", "collect_results", "make_report", "scan_cells", "summarize"]
